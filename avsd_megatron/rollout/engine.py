"""Rollout engines: the student samples completions y for prompt token ids, and takes the trainer's new weights.

The trainer talks to one `RolloutEngine` protocol, whatever generates:

| engine                             | where                              | module                              |
|------------------------------------|------------------------------------|-------------------------------------|
| `HFEngine` (transformers generate) | CPU or GPU                         | `hf_engine`                         |
| `VLLMEngine` (vLLM, colocated)     | GPU; CPU with vLLM's CPU build     | `vllm_engine` (imports vllm lazily) |

Life cycle per optimizer step (vllm-rollouts.md §1), identical for both:

    engine.wake_up(("weights",))              # level-2 sleep left the weight memory garbage
    engine.update_weights(export_hf_weights(model, hf_config, tp_group=..., pp_group=...))
    engine.wake_up(("kv_cache",))
    completions = engine.generate(prompt_ids, params, seed=request_seed(cfg.rollout.seed, step),
                                  first_index=dp_rank * prompts_per_rank)
    engine.sleep()
    ...
    engine.close()                            # once, at the end, before destroying the process group

The engines enforce that order as a small state machine: `update_weights` needs the "weights" tag awake,
`generate` needs both tags awake *and* a complete `update_weights` since the last `sleep()` (vLLM's level-2 sleep
discards the weights; `HFEngine` keeps them but refuses in the same way, so a CPU run exercises the same sequence).
`sleep(keep_weights=True)` (vLLM's level 1) keeps them valid across the sleep: waking all tags is enough.
Violations raise `RuntimeError`.

Sampling semantics (both engines, vLLM's): logits / T, then top-k, then top-p on the renormalised distribution
(T = 0: greedy; top_k 0 or -1 and top_p 1: off; no other processor). Generation stops after the first stop token
(the checkpoint's EOS ids from generation_config.json plus `SamplingParams.stop_token_ids`), which is *kept* in
`Completion.token_ids` (the `<|im_end|>` EOS is trained, spec 3.5), finish_reason "stop"; otherwise after
max_new_tokens, finish_reason "length". `Completion.text` is decoded without special tokens.

Seeds: prompt i of a call draws from `request_seed(seed, first_index + i)`; an engine's output for a prompt depends
only on the weights, the prompt, the params, `seed` and first_index + i (never on the other prompts of the batch,
nor on global RNG state, which `generate` leaves untouched: it saves and restores the global RNGs and torch's thread
count around the call, `preserved_process_state`). The trainer passes the prompt's position in the global batch as
the index (`first_index` = dp_rank x prompts per rank), so no two prompts of a step share a seed whatever the
data-parallel layout, and the TP ranks of one engine, which share the DP rank, use the same seeds. With n > 1 the n
completions of a prompt are consecutive in the output.

Weights: `update_weights` takes (HF name, tensor) pairs, the layout `convert.export_hf_weights` yields, and is
strict: an unknown name, a repeated name, a wrong shape, or the `lm_head.weight` alias of a tied model raises
`ValueError` before anything is copied from that tensor; names missing at the end raise `ValueError` too (the
engine is then left partially updated and refuses to generate until a complete update).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from avsd_megatron.rollout.config import RolloutConfig

__all__ = [
    "Completion",
    "EngineState",
    "RolloutEngine",
    "SamplingParams",
    "TAGS",
    "WeightNameCheck",
    "preserved_process_state",
    "request_seed",
]

TAGS = ("weights", "kv_cache")
"""Memory an engine can wake separately (vLLM's sleep-mode tags)."""
FINISH_REASONS = ("stop", "length")
_SEED_BITS = 63  # fits torch.manual_seed and vLLM's per-request seed (+ n children)


def request_seed(seed: int, index: int) -> int:
    """A 63-bit seed for request `index` under `seed`: a hash, so (seed, index) pairs never collide in practice."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


@dataclass(frozen=True)
class SamplingParams:
    """What to sample (vLLM's `SamplingParams`, the fields AVSD uses)."""

    temperature: float = 0.7
    """T > 0 samples from softmax(z / T); 0 = greedy."""
    top_p: float = 0.95
    """Nucleus mass in (0, 1]; 1 = off."""
    top_k: int = 20
    """Keep the k most likely tokens; 0 or -1 = off."""
    max_new_tokens: int = 4096
    """Completion length cap (vLLM's max_tokens)."""
    n: int = 1
    """Completions per prompt."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop ids on top of the checkpoint's EOS ids."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature={self.temperature!r} must be a finite number >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k={self.top_k!r} must be >= 1, or 0 / -1 for off")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n!r} must be >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def from_config(cls, cfg: RolloutConfig, stop_token_ids: Sequence[int] = ()) -> SamplingParams:
        """The sampling part of `config.RolloutConfig` (this package's)."""
        return cls(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
            n=cfg.n,
            stop_token_ids=tuple(stop_token_ids),
        )


@dataclass(frozen=True)
class Completion:
    """One sampled completion y."""

    token_ids: tuple[int, ...]
    """Sampled ids, the final stop token included when finish_reason is "stop"."""
    text: str
    """token_ids decoded without special tokens ("" when the engine has no tokenizer)."""
    finish_reason: Literal["stop", "length"]


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Restores, on exit, what an engine call may change in the caller's process: Python's, NumPy's, torch's CPU and
    (if initialised) CUDA RNG states, the float32 matmul precision, torch's intra-op thread count, and the
    `torch.set_num_threads` function itself (vLLM's CPU worker replaces it by a no-op, v1/worker/cpu_worker.py)."""
    set_num_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_float32_matmul_precision(precision)


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine (module docstring for the call order)."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int, first_index: int = 0
    ) -> list[Completion]:
        """len(prompt_token_ids) * params.n completions, prompt-major (prompt i's n completions at i*n ...); prompt i
        samples with request_seed(seed, first_index + i). The caller's global RNG states and thread count are the
        same after the call (`preserved_process_state`)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load a full set of HF-named tensors (streamed; strict names and shapes)."""
        ...

    def sleep(self, keep_weights: bool = False) -> None:
        """Free the engine's GPU memory (weights and KV cache). keep_weights=False: the weights must be reloaded
        after waking (vLLM level 2); True: waking restores them (vLLM level 1, a host copy)."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate the memory of `tags` (subset of TAGS; None = all)."""
        ...

    def close(self) -> None:
        """Release the engine for good, before the process group is destroyed (VLLMEngine: vLLM's shutdown)."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Shared engine bookkeeping


class EngineState:
    """Which memory is awake and whether the weights are valid; raises on an out-of-order call."""

    def __init__(self, *, awake: bool, weights_valid: bool) -> None:
        self.awake: set[str] = set(TAGS) if awake else set()
        self.weights_valid = weights_valid

    def sleep(self, keep_weights: bool = False) -> None:
        self.awake.clear()
        self.weights_valid = self.weights_valid and keep_weights

    def to_wake(self, tags: Sequence[str] | None) -> list[str]:
        """The tags of `tags` that are asleep (validated), in TAGS order; marks them awake."""
        requested = list(TAGS) if tags is None else list(tags)
        unknown = [t for t in requested if t not in TAGS]
        if unknown or isinstance(tags, str):
            raise ValueError(f"wake_up tags={tags!r}: each must be one of {TAGS}")
        new = [t for t in TAGS if t in requested and t not in self.awake]
        self.awake.update(new)
        return new

    def check_can_load(self) -> None:
        if "weights" not in self.awake:
            raise RuntimeError("update_weights while the weights are asleep: call wake_up(('weights',)) first")
        self.weights_valid = False  # until the load completes

    def check_can_generate(self) -> None:
        asleep = [t for t in TAGS if t not in self.awake]
        if asleep:
            raise RuntimeError(f"generate while {asleep} asleep: call wake_up() first")
        if not self.weights_valid:
            raise RuntimeError(
                "generate without valid weights: sleep() discarded them (or the last update_weights failed); "
                "call update_weights first"
            )


class WeightNameCheck:
    """Strict (name, tensor) stream check against the expected HF names and shapes (module docstring)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str] | None = None) -> None:
        """shapes: expected name -> shape; aliases: tied name -> the name to send instead."""
        self.shapes = dict(shapes)
        self.aliases = dict(aliases or {})
        self.seen: set[str] = set()

    def check(self, name: str, tensor: Tensor) -> None:
        if name in self.aliases:
            raise ValueError(f"update_weights: {name!r} is tied to {self.aliases[name]!r}; send only the latter")
        if name not in self.shapes:
            raise ValueError(
                f"update_weights: unknown tensor {name!r}; expected the model's HF names, "
                f"e.g. {next(iter(self.shapes))!r}"
            )
        if name in self.seen:
            raise ValueError(f"update_weights: tensor {name!r} was sent twice")
        if tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(
                f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the model needs {self.shapes[name]}"
            )
        self.seen.add(name)

    def wrap(self, named_tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """The stream, each pair checked before it is passed on."""
        for name, tensor in named_tensors:
            self.check(name, tensor)
            yield name, tensor

    def finish(self) -> None:
        missing = [name for name in self.shapes if name not in self.seen]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            if len(missing) > 5:
                shown += f" and {len(missing) - 5} more"
            raise ValueError(f"update_weights: {len(missing)} of {len(self.shapes)} tensors were not sent: {shown}")


def as_id_list(prompt_token_ids: Sequence[Sequence[int]], vocab_size: int | None) -> list[list[int]]:
    """Validated prompts: a non-empty list of non-empty int sequences within [0, vocab_size)."""
    if isinstance(prompt_token_ids, (str, Tensor)) or not isinstance(prompt_token_ids, Sequence):
        raise TypeError(f"prompt_token_ids must be a list of token-id lists, got {type(prompt_token_ids).__name__}")
    prompts = []
    for i, ids in enumerate(prompt_token_ids):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt_token_ids[{i}] is empty")
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"prompt_token_ids[{i}] has ids outside [0, {vocab_size}): {bad[:5]}")
        prompts.append(ids)
    return prompts


def eos_ids_of(generation_config: Any, config: Any) -> tuple[int, ...]:
    """The checkpoint's EOS ids: generation_config.eos_token_id, else config.eos_token_id (int or list)."""
    for source in (generation_config, config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return tuple(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    return ()
