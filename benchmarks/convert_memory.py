"""Peak host memory of the checkpoint converter vs loading the whole model, on a mid-size random Qwen3.

    .venv/bin/python benchmarks/convert_memory.py [--layers 12 --hidden 2048 --ffn 5504 --vocab 32000 --shard-mb 256]

Writes a random bf16 HF checkpoint (safetensors shards of --shard-mb), then runs each step in a fresh process and
reports two peaks above the level right after imports:
  RSS   the resident-set high-water mark (`VmHWM`, reset after imports); counts file-backed mmap pages, which the
        kernel reclaims under pressure
  anon  the peak of `RssAnon` (anonymous memory: what cannot be dropped, and what bounds a conversion), sampled
        every millisecond by a thread (torch kernels release the GIL), so a peak shorter than that can be missed
Steps:
  baseline           `safetensors.torch.load_file` of every shard, materialised (a non-streaming converter)
  hf->mcore          `convert_hf_to_megatron(..., tp=2, pp=2)` (reads with `safetensors.safe_open`)
  hf->mcore readinto the same with the hand-written reader it replaced (header parsed with struct/json, each tensor
                     `readinto` a fresh buffer, no mmap), for the comparison
  mcore->hf          `convert_megatron_to_hf(..., max_shard_bytes=--shard-mb)`
and prints each as MiB and as a ratio to the baseline, next to the sizes that bound it (largest HF shard, largest
layer, embedding). Streaming means the converter's peak tracks one shard + one layer, not the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1024**2


def _status_mb(field: str) -> float:
    """`VmRSS` (current resident set), `VmHWM` (its high-water mark) or `RssAnon` (its anonymous part) from
    /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_high_water_mark() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (imports peak above their floor)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _AnonPeak:
    """Peak `RssAnon` while the `with` block runs, sampled every `interval_s` by a daemon thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))


def _use_readinto_reader() -> None:
    """Swap in the hand-written reader that avsd_megatron/convert/safetensors_io.py used before safetensors.safe_open
    (kept here only to measure against): header length and JSON parsed by hand, each tensor `readinto` a fresh
    buffer, no mmap."""
    import torch

    from avsd_megatron.convert import convert as convert_module
    from avsd_megatron.convert.safetensors_io import _DTYPES, SafetensorsReader

    offsets: dict[tuple[Path, str], tuple[int, int, torch.dtype]] = {}  # (file, tensor) -> start, nbytes, dtype

    def read_header(path: Path) -> None:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            offsets[(path, name)] = (8 + header_len + begin, end - begin, _DTYPES[entry["dtype"]])

    class ReadintoReader(SafetensorsReader):
        def read(self, name: str):
            info = self.tensors[name]
            if (info.file, name) not in offsets:
                read_header(info.file)
            start, nbytes, dtype = offsets[(info.file, name)]
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            with open(info.file, "rb") as f:
                f.seek(start)
                f.readinto(memoryview(buffer.numpy()))
            return buffer.view(dtype).reshape(info.shape)

    convert_module.SafetensorsReader = ReadintoReader


def _step(kind: str, work: Path, shard_bytes: int) -> dict:
    """Run in a child process: import, note RSS and RssAnon, do `kind`, report both peaks above those."""
    import megatron.core.dist_checkpointing.core  # noqa: F401
    import torch  # noqa: F401  (imports count towards the floor, not the step)

    from avsd_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    if kind == "hf->mcore readinto":
        _use_readinto_reader()
    floor, anon_floor = _status_mb("VmRSS"), _status_mb("RssAnon")
    _reset_high_water_mark()
    with _AnonPeak() as anon:
        _run_step(kind, work, shard_bytes, convert_hf_to_megatron, convert_megatron_to_hf)
    peak = _status_mb("VmHWM")
    return {"floor_mb": floor, "peak_mb": peak, "above_floor_mb": peak - floor,
            "anon_above_floor_mb": anon.peak_mb - anon_floor}


def _run_step(kind: str, work: Path, shard_bytes: int, convert_hf_to_megatron, convert_megatron_to_hf) -> None:
    if kind == "baseline":
        from safetensors.torch import load_file

        state = {}  # materialised (load_file alone returns lazily paged mmap views)
        for path in sorted((work / "hf").glob("*.safetensors")):
            state.update({name: t.clone() for name, t in load_file(path).items()})
    elif kind.startswith("hf->mcore"):
        layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
        out = work / ("mcore" if kind == "hf->mcore" else "mcore-readinto")
        convert_hf_to_megatron(work / "hf", out, **layout)
    else:
        convert_megatron_to_hf(work / "mcore", work / "hf-out", max_shard_bytes=shard_bytes)


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
        for kind in ("baseline", "hf->mcore", "hf->mcore readinto", "mcore->hf"):
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
    base, anon_base = results["baseline"]["above_floor_mb"], results["baseline"]["anon_above_floor_mb"]
    print(f"{'step':<19} {'peak RSS (MiB)':>15} {'/ baseline':>11} {'peak anon (MiB)':>16} {'/ baseline':>11} "
          f"{'anon / model':>13}")
    for kind, r in results.items():
        mb, anon = r["above_floor_mb"], r["anon_above_floor_mb"]
        print(f"{kind:<19} {mb:>15.0f} {mb / base:>11.2f} {anon:>16.0f} {anon / anon_base:>11.2f} "
              f"{anon / facts['model_mb']:>13.2f}")


if __name__ == "__main__":
    main()
