"""Rollouts: the student samples completions and takes the trainer's new weights, behind one engine protocol.

| module        | what it holds                                                                                |
|---------------|----------------------------------------------------------------------------------------------|
| `config`      | `RolloutConfig` (sampling, weight-sync cadence), `VLLMConfig` (the `rollout.vllm` options)    |
| `engine`      | the `RolloutEngine` protocol, `SamplingParams`, `Completion`, the sleep/wake state machine, seeds |
| `hf_engine`   | `HFEngine`: transformers `generate` (CPU runs and tests)                                      |
| `vllm_engine` | `VLLMEngine`: colocated vLLM 0.32/0.33 (GPU, or vLLM's CPU build; vllm imported lazily)       |
"""

from avsd_megatron.rollout.config import ENGINES, RolloutConfig, VLLMConfig
from avsd_megatron.rollout.engine import (
    TAGS,
    Completion,
    EngineState,
    RolloutEngine,
    SamplingParams,
    WeightNameCheck,
    request_seed,
)
from avsd_megatron.rollout.hf_engine import HFEngine
from avsd_megatron.rollout.vllm_engine import SUPPORTED_VLLM, VLLMEngine

__all__ = [
    "ENGINES",
    "SUPPORTED_VLLM",
    "TAGS",
    "Completion",
    "EngineState",
    "HFEngine",
    "RolloutConfig",
    "RolloutEngine",
    "SamplingParams",
    "VLLMConfig",
    "VLLMEngine",
    "WeightNameCheck",
    "request_seed",
]
