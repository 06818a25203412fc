"""Convert Qwen3 checkpoints between Hugging Face (safetensors) and Megatron-Core (torch_dist dist checkpoint).

    python tools/convert_checkpoint.py hf-to-megatron --hf Qwen3-8B/ --out ckpt/qwen3-8b --tp 2 --pp 2 --dtype bf16
    python tools/convert_checkpoint.py megatron-to-hf --megatron ckpt/run/ --out Qwen3-8B-avsd/ [--hf-reference DIR]

Runs in one process on CPU, no torchrun: the Megatron checkpoint holds global tensors that Megatron loads at any
TP/PP (`avsd_megatron.convert.load_megatron_checkpoint`); `--tp/--pp` are checked to divide the model and TP sets
the vocab padding. Memory stays near one layer (plus the embedding), not the model. A failed conversion leaves no
output directory. The logic lives in `avsd_megatron.convert`; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from avsd_megatron.convert.convert import DTYPES, convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    to_mcore = commands.add_parser("hf-to-megatron", help="HF Qwen3 directory -> Megatron dist checkpoint")
    # --- input / output
    to_mcore.add_argument("--hf", required=True, type=Path, help="HF directory: config.json, *.safetensors, tokenizer")
    to_mcore.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    # --- intended training layout
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size: checked, sets the vocab padding")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size: checked to divide the layers")
    to_mcore.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype (default bf16)")
    to_mcore.add_argument(
        "--vocab-divisible-by", type=int, default=128, help="Megatron-LM --make-vocab-size-divisible-by (per TP rank)"
    )

    to_hf = commands.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF Qwen3 directory")
    # --- input / output
    to_hf.add_argument(
        "--megatron", required=True, type=Path, help="dist checkpoint dir, or a Megatron-LM save dir (latest iter)"
    )
    to_hf.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    to_hf.add_argument(
        "--hf-reference",
        type=Path,
        default=None,
        help="HF directory giving config.json and tokenizer; needed if the checkpoint has no hf_conversion.json",
    )
    # --- output format
    to_hf.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: config.json's dtype)"
    )
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size cap in GB (1e9 bytes)")
    for command in (to_mcore, to_hf):
        command.add_argument("--no-progress", action="store_true", help="no tqdm bar (bytes written, rate, ETA)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # bad input files or arguments: no traceback
        parser.exit(2, f"{args.command}: error: {exc}\n")
    print(f"{args.command}: wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def _run(args: argparse.Namespace) -> Path:
    if args.command == "hf-to-megatron":
        return convert_hf_to_megatron(
            args.hf,
            args.out,
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            dtype=DTYPES[args.dtype],
            make_vocab_size_divisible_by=args.vocab_divisible_by,
            progress=not args.no_progress,
        )
    return convert_megatron_to_hf(
        args.megatron,
        args.out,
        hf_reference_dir=args.hf_reference,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(main())
