"""Checks of a run's inputs that the trainer makes before it builds anything heavy (model, conversion, optimizer,
rollout engine), so that a bad tokenizer, data row, view or memory plan fails in seconds instead of after minutes of
GPU time.

| check                          | raises                                                                          |
|--------------------------------|---------------------------------------------------------------------------------|
| `load_checked_tokenizer`       | ValueError: no chat template, no pad token, more tokens than config.json's vocab |
| `check_prompts_encode`         | what the task's encode raises (a view that cannot be built, a template error)   |
| `check_teacher_storage_fits`   | ConfigError: avsd.teacher_storage='device' with a GPU memory estimate over the GPU |

The data rows themselves are loaded and validated by `data.examples.load_examples` (every row, with
`data.on_bad_row`), which the trainer calls first of all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from avsd_megatron.convert.mapping import expected_hf_shapes
from avsd_megatron.convert.qwen3_config import Qwen3Dims
from avsd_megatron.data.prompts import PromptReport
from avsd_megatron.training.config import ConfigError, TrainConfig
from avsd_megatron.training.megatron_model import DTYPES

__all__ = ["GPU_RESERVE_FRACTION", "check_prompts_encode", "check_teacher_storage_fits", "gpu_memory_estimate",
           "load_checked_tokenizer"]

PROBE_EXAMPLES = 8
"""Examples whose prompts (student + every view) are built at construction."""
GPU_RESERVE_FRACTION = 0.1
"""Share of a GPU the estimate sets aside for what it does not count: activations, CUDA context, NCCL buffers,
fragmentation. The estimate is a lower bound of the real peak, so a run it rejects cannot fit."""


def load_checked_tokenizer(hf_path: str, vocab_size: int) -> Any:
    """`AutoTokenizer.from_pretrained(hf_path)`, checked to have a chat template, a pad token and at most
    `vocab_size` (config.json's) token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model.hf_path={hf_path!r}: the tokenizer has no chat template (tokenizer_config.json "
                         "chat_template or chat_template.jinja); every prompt is a chat turn")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"model.hf_path={hf_path!r}: the tokenizer has no pad token (batches are padded with it)")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"model.hf_path={hf_path!r}: the tokenizer has {len(tokenizer)} tokens, more than "
                         f"config.json's vocab_size={vocab_size}: ids past the embedding would be sampled and scored")
    return tokenizer


def check_prompts_encode(examples: Sequence[Any], encode: Callable[[Any], Any], report: PromptReport) -> None:
    """Build the prompts of the first PROBE_EXAMPLES examples (student prompt and every view) with the task's
    `encode`; whatever is wrong with a view or the template raises here. `report` is left as it was."""
    before = (report.examples, report.skipped, report.encoded.copy(), report.overlong.copy(), report.truncated.copy())
    try:
        for example in list(examples)[:PROBE_EXAMPLES]:
            encode(example)
    finally:
        report.examples, report.skipped, report.encoded, report.overlong, report.truncated = before


def gpu_memory_estimate(cfg: TrainConfig, hf_config: dict, world_size: int, gpu_bytes: int) -> dict[str, float]:
    """Per-GPU bytes that are resident while vLLM generates next to the trainer (a lower bound: no activations).

    Terms (P = parameters per model-parallel rank = total / (tp * pp), DP = world_size / (tp * pp)):
    weights P x param bytes; gradients P x 4 (fp32 reduction buffer); optimizer P x 12 (fp32 master + Adam m, v),
    / DP under the distributed optimizer; teacher_storage='device': frozen P x 2 x param bytes (θ₀ + swap), ema
    P x (4 + param bytes), each without the swap's P x param bytes when θ is restored from the fp32 master
    (`TrainConfig.teacher_restores_from_master`); vLLM: rollout.vllm.gpu_memory_utilization x the GPU (engine
    'vllm' only).
    """
    total = sum(math.prod(shape) for shape in expected_hf_shapes(Qwen3Dims.from_hf_config(hf_config)).values())
    mp = cfg.parallel.tp * cfg.parallel.pp
    dp = world_size // mp
    per_rank = total / mp
    param_bytes = DTYPES[cfg.model.dtype].itemsize
    teacher = 0.0
    if cfg.avsd.teacher_storage == "device":
        swap = 0 if cfg.teacher_restores_from_master() else param_bytes  # no swap buffer: θ from the fp32 master
        teacher = {"frozen": param_bytes + swap, "ema": 4 + swap, "live": 0}[cfg.avsd.teacher] * per_rank
    return {
        "weights": per_rank * param_bytes,
        "gradients": per_rank * 4,
        "optimizer": per_rank * 12 / (dp if cfg.optim.distributed_optimizer else 1),
        "teacher": teacher,
        "vllm": cfg.rollout.vllm.gpu_memory_utilization * gpu_bytes if cfg.rollout.engine == "vllm" else 0.0,
        "reserve": GPU_RESERVE_FRACTION * gpu_bytes,
    }


def check_teacher_storage_fits(cfg: TrainConfig, hf_config: dict, world_size: int, gpu_bytes: int | None) -> None:
    """Refuse avsd.teacher_storage='device' when `gpu_memory_estimate` exceeds the GPU (`gpu_bytes`; None = no
    GPU, nothing to check). The message gives every term in GiB."""
    if cfg.avsd.teacher_storage != "device" or cfg.avsd.teacher == "live" or gpu_bytes is None:
        return
    terms = gpu_memory_estimate(cfg, hf_config, world_size, gpu_bytes)
    need = sum(terms.values())
    if need > gpu_bytes:
        gib = 2.0**30
        shown = ", ".join(f"{name} {value / gib:.1f}" for name, value in terms.items())
        raise ConfigError(
            f"avsd.teacher_storage='device' does not fit: per GPU {need / gib:.1f} GiB ({shown}) > "
            f"{gpu_bytes / gib:.1f} GiB at parallel.tp={cfg.parallel.tp}, parallel.pp={cfg.parallel.pp}, "
            f"world size {world_size}; use avsd.teacher_storage='cpu' (host memory), a larger TP, or a lower "
            "rollout.vllm.gpu_memory_utilization"
        )
