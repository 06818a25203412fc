"""Run real Megatron-Core on CPU (gloo): the reversible patch set behind `megatron_on_cpu()`.

Megatron-Core 0.19 assumes a CUDA device in a few dozen places that have nothing to do with the maths: factory calls
with `device="cuda"` or `device=torch.cuda.current_device()`, the CUDA RNG tracker, stream bookkeeping in DDP, a
`synchronize()` in checkpoint saving, and `Tensor.type()` string checks in the optimizers. `megatron_on_cpu()`
redirects exactly those, so that the unmodified library (layers, `get_forward_backward_func` with TP/PP, DDP, the
distributed optimizer, `dist_checkpointing`) runs on CPU tensors with a gloo process group. Nothing here changes any
numerics.

What is patched, and the Megatron call sites that need it (megatron-core 0.19.2):

1. A `torch.overrides.TorchFunctionMode` (`_CudaToCpuMode`, thread-local, entered on the installing thread):
   - rewrites a CUDA `device=` keyword ("cuda", "cuda:N", `torch.device("cuda", ...)`, an int index) of any torch
     call to `"cpu"`. Sites hit by the tests: `pipeline_parallel/schedules.py:749,2292`
     (`total_num_tokens = torch.zeros([], ..., device="cuda")`, every schedule), `transformer/utils.py:39` (the
     default causal mask), `optimizer/optimizer.py:315,698,702`, `optimizer/clip_grads.py:108,112,180`,
     `utils.py:1332`;
   - makes `Tensor.cuda()` return the tensor itself: `models/common/language_module/language_module.py:307`
     (`weight.data = weight.data.cuda()` on the last stage of a tied-embedding model with PP > 1);
   - makes an argument-less `Tensor.type()` report `torch.cuda.<X>Tensor` for CPU tensors: the optimizers accept
     only params whose `type()` is `'torch.cuda.FloatTensor'`/`HalfTensor`/`BFloat16Tensor`
     (`optimizer/distrib_optimizer.py:401,466,758`, `optimizer/optimizer.py:1009,1028`) and
     `optimizer/clip_grads.py:174` asserts it. `Tensor.type(dtype)` (a conversion) is untouched.
2. `torch.cuda.current_device` returns `"cpu"`: Megatron passes it as `device=` (`tensor_parallel/layers.py`,
   `tensor_parallel/mappings.py` gather buffers, `pipeline_parallel/p2p_communication.py:334,342` receive buffers,
   `models/common/embeddings/rotary_pos_embedding.py:162`, `distributed/param_and_grad_buffer.py:1180,1186`,
   `utils.py:715`, `dist_checkpointing/strategies/state_dict_saver.py:252`).
3. `CudaRNGStatesTracker.add` / `.fork` (class attributes, `tensor_parallel/random.py`) keep CPU generator states:
   `model_parallel_cuda_manual_seed` calls `add`, which calls `torch.cuda.get_rng_state()` (raises without a
   driver); `fork()` is entered by the local attention (`transformer/dot_product_attention.py`) and by weight init.
   The CPU fork saves/restores `torch.get_rng_state()` around the block, mirroring the CUDA fork's contract.
4. No-op stand-ins for CUDA streams. `torch.cuda.current_stream`: `distributed/param_and_grad_buffer.py:632`
   (`start_grad_sync`, every DDP grad reduction). `torch.cuda.Stream` and `torch.cuda.stream`: only with
   `DistributedDataParallelConfig(num_distributed_optimizer_instances > 1)`
   (`distributed/distributed_data_parallel.py:297`, `param_and_grad_buffer.py:686`); not exercised here (that path
   also needs `einops`). The stand-ins are classes, not lambdas: `transformers` evaluates `torch.cuda.Stream | None`
   in annotations at import time. `torch.cuda.Event` is left alone: no DDP/optimizer/schedule/checkpoint path
   used by dense models constructs one.
5. `torch.cuda.synchronize` is a no-op: `dist_checkpointing/strategies/filesystem_async.py:248` (`preload_tensors`)
   calls it on every `dist_checkpointing.save`; `pipeline_parallel/p2p_communication.py:419` (`_communicate` with
   `batch_p2p_comm and batch_p2p_sync`) and `:263` (shape exchange with `variable_seq_lengths`) call it too.
6. `torch.cuda.is_available` returns False, so a host that has a GPU takes the same code paths as the CPU-only
   machines these patches were checked on (torch and Megatron branch on it, e.g. `utils.py:1575`,
   `pipeline_parallel/fine_grained_activation_offload.py:339`). On a CPU-only host this changes nothing.

Not patched, but required from the caller:
- `TransformerConfig(batch_p2p_comm=False)` is what `tiny_qwen3_config()` sets and the tests run (plain
  `isend`/`irecv` over gloo). With the `synchronize` stand-in, `batch_p2p_comm=True` also ran at PP=2.
- The local layer spec (`get_gpt_layer_local_spec`), `use_cpu_initialization=True`, `gradient_accumulation_fusion=False`
  and no fused kernels (`bias_activation_fusion`, `masked_softmax_fusion`, `apply_rope_fusion`, `persist_layer_norm`).
- `psutil` installed (`dist_checkpointing` imports it).
- Scripts that call `dist_checkpointing.save` need an `if __name__ == "__main__":` guard: the first save starts a
  `multiprocessing.Manager` server with the spawn method (`strategies/filesystem_async.py:64`), which re-imports
  `__main__` (this is also most of a tiny save's ~4 s).

Usage:
    with megatron_on_cpu():
        ...  # Megatron code
or, in a throwaway process (what `launcher.init_megatron` does): `undo = install()` ... `undo()`.

Importing this module patches nothing. `install()` is idempotent: a second call while installed returns a no-op undo,
so nested `megatron_on_cpu()` blocks are safe and only the outermost one restores the originals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["install", "is_installed", "megatron_on_cpu"]

# Marker attribute set on the patched `torch.cuda.current_device`; lets `install()` detect an active install without
# a module-level flag.
_MARKER = "_avsd_megatron_on_cpu"

# The argument-less `Tensor.type()` names Megatron's optimizers test for; other dtypes report their real names.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:N", torch.device("cuda"...) and a bare int (torch reads an int as a CUDA index)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """CUDA `device=` keywords -> CPU, `Tensor.cuda()` -> identity, `Tensor.type()` -> `torch.cuda.*` (module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _cpu_current_device() -> str:
    """Stand-in for `torch.cuda.current_device`: Megatron passes the result as `device=`."""
    return "cpu"


setattr(_cpu_current_device, _MARKER, True)


class _NoOpStream:
    """Stand-in for `torch.cuda.Stream`: CPU work is synchronous, so waits and syncs are no-ops."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = device
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NoOpStreamContext:
    """Stand-in for `torch.cuda.stream(s)`: a context manager that does nothing."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def __enter__(self) -> Any:
        return self.stream

    def __exit__(self, *exc: Any) -> None:
        return None


def _synchronize(device: Any = None) -> None:
    """Stand-in for `torch.cuda.synchronize`: nothing is asynchronous on CPU."""


def _cuda_unavailable() -> bool:
    """Stand-in for `torch.cuda.is_available`: the patched process computes on CPU whatever the host has."""
    return False


def _current_stream(device: Any = None) -> _NoOpStream:
    """Stand-in for `torch.cuda.current_stream`."""
    return _NoOpStream(device)


def _cpu_rng_add(self, name: str, seed: int) -> None:
    """CPU version of `CudaRNGStatesTracker.add`: store the CPU generator state seeded with `seed` under `name`."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig_state = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig_state)


@contextlib.contextmanager
def _cpu_rng_fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
    """CPU version of `CudaRNGStatesTracker.fork`: run the block on the named CPU RNG state, then restore."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current state name {self._current_state_name} is not the same as the desired state name {name}."
            )
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def is_installed() -> bool:
    """True while `install()`'s patches are active in this process."""
    return getattr(torch.cuda.current_device, _MARKER, False)


def install() -> Callable[[], None]:
    """Apply the patches listed in the module docstring; return an `undo()` that restores every original.

    Idempotent: if the patches are already active, returns a no-op undo (the outer install owns them).
    The TorchFunctionMode is pushed on the calling thread; call `undo()` from the same thread.
    """
    if is_installed():
        return lambda: None

    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    # (owner, attribute, replacement); `originals` keeps what to put back, in order.
    patches: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", _cpu_current_device),
        (torch.cuda, "Stream", _NoOpStream),
        (torch.cuda, "stream", _NoOpStreamContext),
        (torch.cuda, "current_stream", _current_stream),
        (torch.cuda, "synchronize", _synchronize),
        (torch.cuda, "is_available", _cuda_unavailable),
        (CudaRNGStatesTracker, "add", _cpu_rng_add),
        (CudaRNGStatesTracker, "fork", _cpu_rng_fork),
    ]
    originals = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in patches]
    for owner, attr, replacement in patches:
        setattr(owner, attr, replacement)
    mode = _CudaToCpuMode()
    mode.__enter__()

    def undo() -> None:
        mode.__exit__(None, None, None)
        for owner, attr, original in reversed(originals):
            setattr(owner, attr, original)

    return undo


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Context manager form of `install()`: patches on entry, restores the originals on exit (see module docstring)."""
    undo = install()
    try:
        yield
    finally:
        undo()
