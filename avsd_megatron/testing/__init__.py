"""Test helpers: a multi-rank launcher for real Megatron-Core on CPU (gloo), full-state gather, a tiny Qwen3.

| module          | what it gives                                                                            |
|-----------------|------------------------------------------------------------------------------------------|
| `launcher`      | `run_on_ranks(fn, W, ...)`: W gloo ranks in spawned processes; `init_megatron(tp, pp)`   |
| `tiny_qwen3`    | `tiny_qwen3_config()`, `build_tiny_gpt_model()`: a 2-layer Qwen3-shaped `GPTModel`        |
| `full_state`    | `load_full_state_into()`, `gather_full_state()`: TP1PP1 weights <-> a rank's TP/PP shard  |
| `thd_attention` | `THDDotProductAttention`: the local core attention, also for packed (THD) input (imports  |
|                 | Megatron: import it from the module, not from this package)                             |

Only `tests/` imports this package (`tests/test_layering.py`). The CPU patches themselves are production code
(`avsd_megatron.runtime`, which the CPU trainer installs); `init_megatron` applies them inside launched ranks.
Importing this package patches nothing and does not import Megatron.
"""

from avsd_megatron.testing.full_state import gather_full_state, load_full_state_into
from avsd_megatron.testing.launcher import RankError, init_megatron, run_on_ranks
from avsd_megatron.testing.tiny_qwen3 import build_tiny_gpt_model, padded_vocab_size, tiny_qwen3_config

__all__ = [
    "RankError",
    "build_tiny_gpt_model",
    "gather_full_state",
    "init_megatron",
    "load_full_state_into",
    "padded_vocab_size",
    "run_on_ranks",
    "tiny_qwen3_config",
]
