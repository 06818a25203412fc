"""The planner: GPU memory per rank and phase, host memory, checkpoint disk, step time and scaling of a run, before
it is submitted (`python -m avsd_megatron plan --config FILE`, `plan_run(cfg, ...)`).

| module        | what it holds                                                                              |
|---------------|--------------------------------------------------------------------------------------------|
| `hardware`    | `GPUSpec` per GPU type (datasheet figures) and `Assumptions` (efficiencies, overheads)     |
| `shapes`      | the Qwen3 sizes in code, this rank's parameter tensors, the FLOP count of `gpu_step.py`    |
| `estimate`    | the memory / time / disk formulas (its docstring lists every one) and the scaling rows     |
| `report`      | `plan_run` (the callers' entry point) and the text table                                  |
| `cli`         | `python -m avsd_megatron plan`                                                             |

Measured vs modelled. Checked against real objects on CPU (tests/training/test_plan.py, test_trainer.py): the
parameter tensors and counts of every rank (a real `GPTModel` at TP1, TP2 and PP2), the distributed optimizer's fp32
shard and DDP's fp32 grad buffer (DP2), the checkpoint's size on disk (a trainer checkpoint), the FLOP formula
(`benchmarks/gpu_step.py`'s and torch's FLOP counter on a real forward), the published Qwen3 parameter counts.
Modelled, not measured (no GPU run here yet): activation and logit sizes (from the tensors the code keeps, see
`estimate`), vLLM's split of its memory share, CUDA context / NCCL / allocator overheads, host process size, and
every time: they follow from `GPUSpec` and `Assumptions` (MFU per phase, bandwidth efficiencies), which are explicit
fields (`plan --assume NAME=VALUE`). Memory uses the length caps (the worst micro-batch); time uses the caps times
`prompt_fill` / `completion_fill` (default 1: an upper bound).

Importing this package imports neither Megatron nor torch.distributed: recipes call it on a login node.
"""

from avsd_megatron.training.plan.estimate import (
    PHASES,
    TIME_PHASES,
    Estimate,
    PhaseMemory,
    estimate,
    scaling_rows,
)
from avsd_megatron.training.plan.hardware import (
    GPUS,
    Assumptions,
    GPUSpec,
    gpu_for_device,
    parse_assumptions,
)
from avsd_megatron.training.plan.report import (
    format_table,
    parse_time_limit,
    plan_run,
    scaling_markdown,
    write_plan,
)
from avsd_megatron.training.plan.shapes import (
    QWEN3_SIZES,
    ModelSource,
    RankParameters,
    ddp_buffer_elements,
    forward_flops,
    model_dims,
    rank_parameters,
    total_parameters,
)

__all__ = [
    "GPUS",
    "PHASES",
    "QWEN3_SIZES",
    "TIME_PHASES",
    "Assumptions",
    "Estimate",
    "GPUSpec",
    "ModelSource",
    "PhaseMemory",
    "RankParameters",
    "ddp_buffer_elements",
    "estimate",
    "format_table",
    "forward_flops",
    "gpu_for_device",
    "model_dims",
    "parse_assumptions",
    "parse_time_limit",
    "plan_run",
    "rank_parameters",
    "scaling_markdown",
    "scaling_rows",
    "total_parameters",
    "write_plan",
]
