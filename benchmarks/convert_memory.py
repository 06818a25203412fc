"""Peak host memory of the checkpoint converter vs loading the whole model, on a mid-size random Qwen3.

    .venv/bin/python benchmarks/convert_memory.py [--layers 12 --hidden 2048 --ffn 5504 --vocab 32000 --shard-mb 256]

Writes a random bf16 HF checkpoint (safetensors shards of --shard-mb), then runs each step in a fresh process and
reads its RSS high-water mark (`VmHWM`, reset after imports) minus the RSS right after imports:
  baseline  `safetensors.torch.load_file` of every shard (what a non-streaming converter holds: the whole model)
  hf->mcore `convert_hf_to_megatron(..., tp=2, pp=2)`
  mcore->hf `convert_megatron_to_hf(..., max_shard_bytes=--shard-mb)`
and prints each as MB and as a ratio to the baseline, next to the sizes that bound it (largest HF shard, largest
layer, embedding). Streaming means the converter's peak tracks one shard + one layer, not the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1024**2


def _status_mb(field: str) -> float:
    """`VmRSS` (current resident set) or `VmHWM` (its high-water mark) from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_high_water_mark() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (imports peak above their floor)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _step(kind: str, work: Path, shard_bytes: int) -> dict:
    """Run in a child process: import, note RSS, do `kind`, report the high-water mark above that."""
    import megatron.core.dist_checkpointing.core  # noqa: F401
    import torch  # noqa: F401  (imports count towards the floor, not the step)

    from avsd_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    floor = _status_mb("VmRSS")
    _reset_high_water_mark()
    if kind == "baseline":
        from safetensors.torch import load_file

        state = {}  # materialised (load_file alone returns lazily paged mmap views)
        for path in sorted((work / "hf").glob("*.safetensors")):
            state.update({name: t.clone() for name, t in load_file(path).items()})
    elif kind == "hf->mcore":
        layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
        convert_hf_to_megatron(work / "hf", work / "mcore", **layout)
    else:
        convert_megatron_to_hf(work / "mcore", work / "hf-out", max_shard_bytes=shard_bytes)
    peak = _status_mb("VmHWM")
    return {"floor_mb": floor, "peak_mb": peak, "above_floor_mb": peak - floor}


def _write_random_hf(work: Path, args) -> dict:
    """A random bf16 Qwen3 HF checkpoint written one tensor at a time; returns the size facts."""
    import torch

    from avsd_megatron.convert.mapping import expected_hf_shapes, hf_tensor_order
    from avsd_megatron.convert.qwen3_config import Qwen3Dims
    from avsd_megatron.convert.safetensors_io import SafetensorsShardWriter, write_json

    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 128,
        "num_key_value_heads": max(1, args.hidden // 256),
        "head_dim": 128,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }
    dims = Qwen3Dims.from_hf_config(config)
    shapes = expected_hf_shapes(dims)
    order = hf_tensor_order(dims)
    nbytes = {name: 2 * torch.Size(shapes[name]).numel() for name in order}
    (work / "hf").mkdir()
    writer = SafetensorsShardWriter(work / "hf", [(n, nbytes[n]) for n in order], args.shard_mb * MB)
    gen = torch.Generator().manual_seed(0)
    for name in order:
        writer.add(name, torch.randn(shapes[name], generator=gen).to(torch.bfloat16))
    writer.finish()
    write_json(work / "hf" / "config.json", config)
    layer = sum(v for k, v in nbytes.items() if k.startswith("model.layers.0."))
    shard_sizes = [p.stat().st_size for p in (work / "hf").glob("*.safetensors")]
    return {
        "model_mb": sum(nbytes.values()) / MB,
        "largest_shard_mb": max(shard_sizes) / MB,
        "shards": len(shard_sizes),
        "layer_mb": layer / MB,
        "embedding_mb": nbytes["model.embed_tokens.weight"] / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="num_hidden_layers")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden_size (heads = hidden / 128)")
    parser.add_argument("--ffn", type=int, default=5504, help="intermediate_size")
    parser.add_argument("--vocab", type=int, default=32000, help="vocab_size")
    parser.add_argument("--shard-mb", type=int, default=256, help="HF shard size, input and output (MiB)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(_step(args.step, Path(args.work), args.shard_mb * MB)))
        return

    work = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        facts = _write_random_hf(work, args)
        results = {}
        for kind in ("baseline", "hf->mcore", "mcore->hf"):
            cmd = [sys.executable, __file__, "--step", kind, "--work", str(work), "--shard-mb", str(args.shard_mb)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[kind] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, bf16 = "
        f"{facts['model_mb']:.0f} MiB in {facts['shards']} shards (largest {facts['largest_shard_mb']:.0f} MiB); "
        f"one layer {facts['layer_mb']:.0f} MiB, embedding {facts['embedding_mb']:.0f} MiB"
    )
    base = results["baseline"]["above_floor_mb"]
    print(f"{'step':<10} {'peak RSS above imports (MiB)':>30} {'/ baseline':>11} {'/ model size':>13}")
    for kind, r in results.items():
        mb = r["above_floor_mb"]
        print(f"{kind:<10} {mb:>30.0f} {mb / base:>11.2f} {mb / facts['model_mb']:>13.2f}")


if __name__ == "__main__":
    main()
