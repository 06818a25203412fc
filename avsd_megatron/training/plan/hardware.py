"""The hardware model and the planner's modelled assumptions: one `GPUSpec` per GPU type, one `Assumptions`.

Every figure here is an input of the planner, not something it measures. `GPUSpec` values are vendor datasheet
numbers (dense BF16 without sparsity; HBM; NVLink per GPU per direction; one InfiniBand NIC per GPU as on DGX /
HGX nodes; PCIe per direction) except `memory_gib`, the capacity `torch.cuda.mem_get_info` reports (slightly less
than the marketing size). `Assumptions` are efficiencies (achieved / peak) and fixed overheads; none is measured
on a GPU here yet (benchmarks/README.md). Both are frozen dataclasses: change a value with
`dataclasses.replace` or, on the command line, `plan --assume mfu_update=0.3`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["GPUS", "Assumptions", "GPUSpec", "gpu_for_device", "parse_assumptions"]


@dataclass(frozen=True)
class GPUSpec:
    """One GPU type and the node it sits in (datasheet figures; see the module docstring)."""

    name: str
    memory_gib: float
    """Device memory the CUDA driver reports (GiB)."""
    bf16_tflops: float
    """Dense BF16 tensor-core peak (TFLOP/s, no sparsity)."""
    hbm_gbps: float
    """HBM bandwidth (GB/s)."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU per direction (GB/s): what a ring collective inside a node moves per GPU."""
    ib_gbps: float
    """Inter-node bandwidth per GPU (GB/s; one NIC per GPU: 400 Gb/s NDR = 50 GB/s)."""
    pcie_gbps: float
    """Host <-> device bandwidth per GPU per direction (GB/s), for the pinned teacher swap."""
    host_gib_per_node: float
    """Host memory of one node (GiB)."""


GPUS: dict[str, GPUSpec] = {
    "h100-80gb": GPUSpec("h100-80gb", memory_gib=79.6, bf16_tflops=989.0, hbm_gbps=3350.0, nvlink_gbps=450.0,
                         ib_gbps=50.0, pcie_gbps=64.0, host_gib_per_node=1900.0),  # DGX H100: 2 TB host memory
    "h200-141gb": GPUSpec("h200-141gb", memory_gib=139.8, bf16_tflops=989.0, hbm_gbps=4800.0, nvlink_gbps=450.0,
                          ib_gbps=50.0, pcie_gbps=64.0, host_gib_per_node=1900.0),
    "a100-80gb": GPUSpec("a100-80gb", memory_gib=79.1, bf16_tflops=312.0, hbm_gbps=2039.0, nvlink_gbps=300.0,
                         ib_gbps=25.0, pcie_gbps=32.0, host_gib_per_node=1900.0),  # DGX A100: 200 Gb/s HDR
    "b200-180gb": GPUSpec("b200-180gb", memory_gib=178.0, bf16_tflops=2250.0, hbm_gbps=8000.0, nvlink_gbps=900.0,
                          ib_gbps=50.0, pcie_gbps=64.0, host_gib_per_node=3700.0),  # DGX B200: 4 TB
}


def gpu_for_device(device_name: str, memory_gib: float) -> str | None:
    """The `GPUS` key of a CUDA device (`torch.cuda.get_device_name()`, total memory), or None if unknown."""
    family = next((key for key in GPUS if key.split("-")[0] in device_name.lower()), None)
    if family is None:
        return None
    same = [key for key in GPUS if key.split("-")[0] == family.split("-")[0]]
    return min(same, key=lambda key: abs(GPUS[key].memory_gib - memory_gib))


@dataclass(frozen=True)
class Assumptions:
    """What the planner assumes rather than knows. All modelled; change them when a GPU run measures better ones."""

    # -- compute efficiency (achieved FLOP/s / peak), per phase
    mfu_prefill: float = 0.45
    """vLLM prompt prefill."""
    mfu_decode: float = 0.30
    """vLLM decode when compute-bound (large batches); small batches are HBM-bound (`hbm_efficiency`)."""
    mfu_scoring: float = 0.40
    """Teacher scoring: forward-only over the M view rows."""
    mfu_update: float = 0.35
    """Student forward + backward (+ the recomputed forward)."""
    # -- bandwidth efficiency (achieved / datasheet)
    hbm_efficiency: float = 0.75
    """Decode weight + KV reads, teacher swap on device, optimizer step, refit copies."""
    collective_efficiency: float = 0.75
    """Ring collectives over NVLink / InfiniBand (grad reduce-scatter, param all-gather, refit TP gather)."""
    pcie_efficiency: float = 0.75
    """Pinned host <-> device copies (teacher swap with teacher_storage=cpu)."""
    tp_allreduce_latency_us: float = 10.0
    """Latency of one small TP all-reduce in a decode step (2 per layer); dominates tiny decode batches."""
    # -- lengths used by the time model (memory always uses the caps: the worst micro-batch)
    prompt_fill: float = 1.0
    """Mean prompt length / prompts.max_prompt_tokens for the time model (1 = every prompt at the cap)."""
    completion_fill: float = 1.0
    """Mean completion length / rollout.max_new_tokens for the time model (1 = every completion at the cap)."""
    # -- fixed memory overheads
    cuda_context_gib: float = 0.6
    """CUDA context + cuBLAS / cuDNN workspaces per process."""
    nccl_gib: float = 1.0
    """NCCL communicator buffers of the TP, DP, PP and model-parallel groups together."""
    allocator_slack: float = 0.05
    """Share of the tensors' size the caching allocator loses to fragmentation (applied to the whole phase)."""
    vllm_asleep_gib: float = 1.0
    """What a sleeping vLLM engine still holds (CUDA graph pool, sampler buffers); 0.3 with enforce_eager."""
    vllm_activation_gib: float = 2.0
    """vLLM's profiled activation peak inside its gpu_memory_utilization budget (not available to KV)."""
    host_process_gib: float = 6.0
    """Host memory of one training process (Python, torch, CUDA libraries, vLLM, tokenizer, data) without the
    pinned teacher copies."""
    # -- fixed times
    refit_overhead_s: float = 1.0
    """Per weight sync: engine wake-up, name checks, prefix-cache reset."""
    checkpoint_write_gbps: float = 2.0
    """Checkpoint write bandwidth per node to the shared filesystem (GB/s)."""
    startup_s: float = 600.0
    """Job start: imports, model build, loading the start checkpoint, vLLM start-up."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"assumptions.{f.name}={value!r} must be a number >= 0")
        for name in ("mfu_prefill", "mfu_decode", "mfu_scoring", "mfu_update", "hbm_efficiency",
                     "collective_efficiency", "pcie_efficiency", "prompt_fill", "completion_fill"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"assumptions.{name}={getattr(self, name)!r} must be in (0, 1]")
        if self.checkpoint_write_gbps <= 0:
            raise ValueError(f"assumptions.checkpoint_write_gbps={self.checkpoint_write_gbps!r} must be > 0")


def parse_assumptions(items: list[str] | tuple[str, ...], base: Assumptions | None = None) -> Assumptions:
    """`Assumptions` with each 'name=value' item applied (`plan --assume`); ValueError names a bad item."""
    base = base or Assumptions()
    names = {f.name for f in dataclasses.fields(Assumptions)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--assume {item!r}: expected NAME=NUMBER with NAME one of {sorted(names)}")
        try:
            changes[key] = float(raw)
        except ValueError:
            raise ValueError(f"--assume {item!r}: {raw!r} is not a number") from None
    return dataclasses.replace(base, **changes)
