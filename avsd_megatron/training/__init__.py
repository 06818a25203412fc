"""The trainer: a run's config, the Megatron model it builds, the rollout -> score -> update -> sync loop, checkpoints.

| module           | what it holds                                                                           |
|------------------|-----------------------------------------------------------------------------------------|
| `config`         | `TrainConfig` and its sections; YAML load / dump with errors naming the field            |
| `megatron_model` | `GPTModel` from an HF config, DDP, the optimizer                                         |
| `tasks`          | what each data task adds to a step: math view prompts; code feedback run in the sandbox; |
|                  | the graders' rewards (GRPO)                                                             |
| `algorithms`     | the per-algorithm targets step: AVSD's teacher pass, or GRPO's group advantages          |
| `trainer`        | `Trainer`: rollout() -> score_teachers() -> update_student() -> sync_weights()           |
| `checkpointing`  | atomic keep-last-K distributed checkpoints with exact resume                            |
| `metrics_log`    | metrics.jsonl, TensorBoard, generations, progress bar, phase timers                     |
| `train`          | the CLI (`python -m avsd_megatron train`, under torchrun or as one process)              |
| `plan/`          | the planner: GPU / host memory, disk and time per phase (`python -m avsd_megatron plan`) |
"""

from avsd_megatron.training.checkpointing import CheckpointManager, find_latest
from avsd_megatron.training.config import (
    AVSDConfig,
    CheckpointConfig,
    CodeSandboxConfig,
    ConfigError,
    GRPOConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)
from avsd_megatron.training.megatron_model import build_gpt_model, build_optimizer, wrap_ddp
from avsd_megatron.training.metrics_log import MetricsLog, PhaseTimer, read_jsonl_metrics
from avsd_megatron.training.tasks import CodeTask, MathTask, TeacherRows
from avsd_megatron.training.trainer import Trainer

__all__ = [
    "AVSDConfig",
    "CheckpointConfig",
    "CheckpointManager",
    "CodeSandboxConfig",
    "CodeTask",
    "ConfigError",
    "GRPOConfig",
    "LoggingConfig",
    "MathTask",
    "MetricsLog",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PhaseTimer",
    "TeacherRows",
    "TrainConfig",
    "Trainer",
    "build_gpt_model",
    "build_optimizer",
    "dump_config",
    "find_latest",
    "from_dict",
    "load_config",
    "read_jsonl_metrics",
    "to_dict",
    "wrap_ddp",
]
