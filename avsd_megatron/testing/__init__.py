"""Test support shipped with the package: real Megatron-Core on CPU (gloo), a multi-rank launcher, a tiny Qwen3.

| module          | what it gives                                                                            |
|-----------------|------------------------------------------------------------------------------------------|
| `megatron_cpu`  | `megatron_on_cpu()` / `install()`: reversible patches that let Megatron-Core run on CPU   |
| `launcher`      | `run_on_ranks(fn, W, ...)`: W gloo ranks in spawned processes; `init_megatron(tp, pp)`   |
| `tiny_qwen3`    | `tiny_qwen3_config()`, `build_tiny_gpt_model()`: a 2-layer Qwen3-shaped `GPTModel`        |
| `full_state`    | `load_full_state_into()`, `gather_full_state()`: TP1PP1 weights <-> a rank's TP/PP shard  |

Importing this package patches nothing and does not import Megatron; the patches are applied only by
`megatron_on_cpu()` / `install()` (and `init_megatron`, inside launched child processes).
"""

from avsd_megatron.testing.full_state import gather_full_state, load_full_state_into
from avsd_megatron.testing.launcher import RankError, init_megatron, run_on_ranks
from avsd_megatron.testing.megatron_cpu import install, is_installed, megatron_on_cpu
from avsd_megatron.testing.tiny_qwen3 import build_tiny_gpt_model, padded_vocab_size, tiny_qwen3_config

__all__ = [
    "RankError",
    "build_tiny_gpt_model",
    "gather_full_state",
    "init_megatron",
    "install",
    "is_installed",
    "load_full_state_into",
    "megatron_on_cpu",
    "padded_vocab_size",
    "run_on_ranks",
    "tiny_qwen3_config",
]
