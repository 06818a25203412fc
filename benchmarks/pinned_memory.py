"""How much pinned host memory the frozen teacher's per-tensor `pin_memory()` really reserves (GPU machine).

    python benchmarks/pinned_memory.py [--tp 2] [--layers 2] [--json out.json]

torch's caching host allocator (what `Tensor.pin_memory()` uses) serves each request from a block rounded up to a
power of two, so a teacher that pins every parameter shard separately (`hook/teacher_kinds.py`: θ₀ / the EMA and the
swap buffer, one `pin_memory()` per tensor) can reserve much more page-locked memory than its tensors hold. This pins
one bf16 host tensor per distinct Qwen3-8B parameter shard shape at `--tp` (a decoder layer's tensors, the embedding
and output-layer shards, the final norm), in `--layers` copies of the layer set, and reports requested bytes vs
`torch.cuda.host_memory_stats()["allocated_bytes.current"]` (the rounded block bytes, torch/cuda/memory.py:408)
and the VmLck / VmRSS growth, then extrapolates both to the 36 layers of Qwen3-8B (x 2: θ₀ plus the swap
buffer). Needs CUDA (pinning needs the driver); without it it exits.
"""

from __future__ import annotations

import argparse
import json


def shard_shapes(tp: int) -> dict[str, tuple[int, ...]]:
    """Qwen3-8B parameter shard shapes on one TP rank (Megatron layout: fused QKV, SwiGLU fc1 = [gate; up])."""
    h, f, q, kv, v = 4096, 12288, 32 * 128, 8 * 128, 151_936
    return {
        "layer.linear_qkv": ((q + 2 * kv) // tp, h),
        "layer.linear_proj": (h, q // tp),
        "layer.linear_fc1": (2 * f // tp, h),
        "layer.linear_fc2": (h, f // tp),
        "layer.input_layernorm": (h,),
        "layer.pre_mlp_layernorm": (h,),
        "layer.q_layernorm": (128,),
        "layer.k_layernorm": (128,),
        "embedding": (v // tp, h),
        "output_layer": (v // tp, h),
        "final_layernorm": (h,),
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="copies of the decoder-layer tensor set to pin")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/pinned_memory.py needs CUDA (pinned memory needs the driver)")
    torch.cuda.init()
    shapes = shard_shapes(args.tp)
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    lck0, rss0 = _status_kib("VmLck"), _status_kib("VmRSS")
    held, rows = [], []
    for name, shape in shapes.items():
        copies = args.layers if name.startswith("layer.") else 1
        for _ in range(copies):
            reserved_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
            t = torch.empty(shape, dtype=torch.bfloat16).pin_memory()
            held.append(t)
            reserved = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - reserved_before
        rows.append({"tensor": name, "shape": list(shape), "requested": t.numel() * 2, "reserved": reserved})
    total_reserved = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - before
    total_requested = sum(t.numel() * t.element_size() for t in held)
    per_layer_req = sum(r["requested"] for r in rows if r["tensor"].startswith("layer."))
    per_layer_res = sum(r["reserved"] for r in rows if r["tensor"].startswith("layer."))
    rest_req = sum(r["requested"] for r in rows if not r["tensor"].startswith("layer."))
    rest_res = sum(r["reserved"] for r in rows if not r["tensor"].startswith("layer."))
    result = {
        "tp": args.tp, "rows": rows, "requested": total_requested, "reserved": total_reserved,
        "vmlck_growth": (_status_kib("VmLck") - lck0) * 1024, "vmrss_growth": (_status_kib("VmRSS") - rss0) * 1024,
        "qwen3_8b_requested": 2 * (36 * per_layer_req + rest_req),  # θ₀ + swap buffer
        "qwen3_8b_reserved": 2 * (36 * per_layer_res + rest_res),
    }
    gib = 2**30
    print(f"# pinned host memory per tensor, Qwen3-8B shards at TP {args.tp} (bf16)")
    print("| tensor | shape | requested (MiB) | reserved (MiB) | reserved / requested |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["reserved"] / r["requested"] if r["requested"] else float("nan")
        print(f"| {r['tensor']} | {tuple(r['shape'])} | {r['requested'] / 2**20:.2f} | {r['reserved'] / 2**20:.2f} | "
              f"{ratio:.2f} |")
    print(f"pinned here: requested {total_requested / gib:.2f} GiB, reserved {total_reserved / gib:.2f} GiB, "
          f"VmLck +{result['vmlck_growth'] / gib:.2f} GiB, VmRSS +{result['vmrss_growth'] / gib:.2f} GiB")
    print(f"Qwen3-8B frozen teacher (θ₀ + swap buffer, 36 layers): requested "
          f"{result['qwen3_8b_requested'] / gib:.1f} GiB, reserved {result['qwen3_8b_reserved'] / gib:.1f} GiB "
          "per rank")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
