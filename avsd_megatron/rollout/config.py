"""Rollout settings: how the student samples (`RolloutConfig`) and the vLLM engine's options (`VLLMConfig`).

The `rollout:` section of a run config (`avsd_megatron.training.config.TrainConfig.rollout`). A bad value raises
`ValueError` naming the dotted field; `load_config` reports it as a `ConfigError` with the file name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ADAPTER_ENGINE_ARGS", "ENGINES", "FIELD_ENGINE_ARGS", "RolloutConfig", "VLLMConfig"]

ENGINES = ("vllm", "hf")
ADAPTER_ENGINE_ARGS = {
    "model": "the engine is built from model.hf_path",
    "tokenizer": "the engine is built from model.hf_path",
    "dtype": "it follows model.dtype",
    "load_format": "the adapter builds the engine with dummy weights and streams the trainer's weights in",
    "tensor_parallel_size": "vLLM TP = parallel.tp (one engine per Megatron TP group)",
    "pipeline_parallel_size": "vLLM PP is 1 (one engine per Megatron TP group)",
    "data_parallel_size": "every Megatron TP group runs its own engine (vLLM DP is 1)",
    "distributed_executor_backend": "the colocated engine joins torchrun's process group (external_launcher)",
    "enable_sleep_mode": "the adapter sleeps the engine between rollouts",
    "disable_custom_all_reduce": "the adapter disables it (the engine shares the GPUs with Megatron's NCCL groups)",
    "seed": "the engine seed is the engine index; sampling seeds come from rollout.seed",
}
"""vLLM EngineArgs keys `vllm_engine.vllm_engine_kwargs` sets itself, with the reason; refused in
`rollout.vllm.engine_args`."""
FIELD_ENGINE_ARGS = (
    "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
    "enable_prefix_caching",
)
"""`VLLMConfig` fields passed to the engine under their own names; refused in `rollout.vllm.engine_args`."""


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _at_least(name: str, value: Any, low: float) -> None:
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")


@dataclass(frozen=True)
class VLLMConfig:
    """vLLM engine options (spec §1 rollout row; vllm-rollouts.md §1). Sleep level 2 and the external_launcher
    backend are fixed by the adapter (`vllm_engine`), not configurable."""

    gpu_memory_utilization: float = 0.4
    """Fraction of *total* GPU memory vLLM may take (weights + KV cache); the reference: 0.4."""
    max_model_len: int = 16384
    """Longest prompt + completion (the reference's --max_length 16384)."""
    max_num_seqs: int = 8
    """Concurrent sequences per engine (the reference: per-device batch 4 x GA 2 = 8)."""
    max_num_batched_tokens: int | None = None
    """Tokens per scheduler step; None = vLLM's default."""
    enforce_eager: bool = False
    """Disable CUDA graphs (saves the graph memory that sleep does not free)."""
    enable_prefix_caching: bool = True
    """Share KV of identical prompt prefixes; the cache is reset after every weight sync."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further `vllm.EngineArgs` keyword arguments, passed through to `vllm.LLM` unchanged (`LLM(**kwargs)` hands
    its unknown keywords to EngineArgs, vllm/entrypoints/llm.py:222,335 in 0.33.0), e.g.
    `{speculative_config: {method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 4}}` or
    `{kv_cache_dtype: fp8}`. Keys are checked against EngineArgs' dataclass fields when the engine is built
    (`vllm_engine.check_engine_args`); the keys the adapter sets itself (`ADAPTER_ENGINE_ARGS`) and those with a
    field of their own in this section (max_num_batched_tokens, enable_prefix_caching, ...) are refused here."""

    def __post_init__(self) -> None:
        if not (0.0 < self.gpu_memory_utilization < 1.0):
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1)"
            )
        _at_least("rollout.vllm.max_model_len", self.max_model_len, 2)
        _at_least("rollout.vllm.max_num_seqs", self.max_num_seqs, 1)
        if self.max_num_batched_tokens is not None:
            _at_least("rollout.vllm.max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if not isinstance(self.engine_args, Mapping):
            raise ValueError(f"rollout.vllm.engine_args must be a mapping of EngineArgs keywords, got "
                             f"{type(self.engine_args).__name__}")
        for key in self.engine_args:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"rollout.vllm.engine_args: key {key!r} is not an EngineArgs field name")
            if key in ADAPTER_ENGINE_ARGS:
                raise ValueError(f"rollout.vllm.engine_args.{key} is set by the adapter: {ADAPTER_ENGINE_ARGS[key]}")
            if key in FIELD_ENGINE_ARGS:
                raise ValueError(f"rollout.vllm.engine_args.{key} has its own field: set rollout.vllm.{key}")


@dataclass(frozen=True)
class RolloutConfig:
    """How the student samples completions, and how often the rollout engine gets the new weights."""

    engine: Literal["vllm", "hf"] = "vllm"
    """'vllm' (`vllm_engine.VLLMEngine`, the reference; GPU, or CPU with vLLM's CPU build as in the `vllm` test tier)
    or 'hf' (transformers generate, `hf_engine.HFEngine`; CPU runs and tests)."""
    temperature: float = 0.7
    """Sampling temperature; also τ, the divisor of every training logit (spec 2.1). Must be > 0 for training."""
    top_p: float = 0.95
    """Nucleus mass (1 = off). Training log-probs are not truncated (spec 2.1)."""
    top_k: int = 20
    """Top-k (0 or -1 = off; the DeepSeek-R1-Distill scripts use off)."""
    max_new_tokens: int = 4096
    """Completion length cap (the reference's --max_completion_length)."""
    n: int = 1
    """Completions per prompt (the reference: 1)."""
    seed: int = 0
    """Base of the sampling seeds: step s calls `generate(..., seed=rollout.request_seed(seed, s))`, which seeds
    prompt i with `request_seed(that, i)`. The reference seeds each vLLM engine with its process rank instead;
    the samples differ, the distribution does not."""
    sync_every: int = 1
    """Push the trainer's weights to the engine every k optimizer steps. The reference: 1 (strictly on-policy);
    k > 1 DEVIATES: rollouts then come from weights up to k - 1 steps old."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM-only options; ignored by engine='hf'."""

    def __post_init__(self) -> None:
        _choice("rollout.engine", self.engine, ENGINES)
        _finite("rollout.temperature", self.temperature)
        _at_least("rollout.temperature", self.temperature, 0.0)
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"rollout.top_p={self.top_p!r} must be in (0, 1]")
        _at_least("rollout.top_k", self.top_k, -1)
        _at_least("rollout.max_new_tokens", self.max_new_tokens, 1)
        _at_least("rollout.n", self.n, 1)
        _at_least("rollout.sync_every", self.sync_every, 1)
