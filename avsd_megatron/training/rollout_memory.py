"""Training memory released while the rollout engine generates, and brought back before teacher scoring.

    offload = RolloutOffload(model, optimizer, grad_buffers=True, optimizer_states=False, on_cpu=False)
    with offload():
        rollout = trainer.rollout()

Only megatron-core's own calls are used (0.19):
- `DistributedDataParallel.offload_grad_buffers()` / `restore_grad_buffers()` (distributed/distributed_data_parallel.py:
  636,657): every grad buffer's storage is resized to 0 (`_ParamAndGradBuffer.offload_to_cpu(move_params=False)`,
  param_and_grad_buffer.py:1619; nothing is copied: between the optimizer step and the next backward the gradients
  are dead), then reallocated and zeroed (`reload_from_cpu`, :1635). `param.main_grad` and the buckets are views of
  that storage and become valid again. At Qwen3-8B / TP2 with grad_reduce_in_fp32 that is 4 B x 4.1 B params =
  15 GiB per rank returned to the colocated vLLM while it generates.
- `MegatronOptimizer.offload_to_cpu()` / `restore_from_cpu()` (optimizer/optimizer.py:555,575; the chained optimizer
  forwards both, :2014,2019): the fp32 main parameters and Adam moments move to host memory and back (two PCIe copies
  per step, optional). Both only move CUDA tensors (`p.is_cuda`), so on CPU they are no-ops.

The restore runs in a `finally`, so a failed rollout leaves training memory in place for the error handling. The
trainer also builds its rollout engine inside the context: vLLM sizes its budget against the free memory at start-up
(vllm/v1/worker/utils.py:716 in 0.33.0), which must then match what is free during every later rollout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["RolloutOffload"]


class RolloutOffload:
    """Offload what `memory` asks for around a rollout (module docstring).

    Args:
        model: the Megatron `DistributedDataParallel` model.
        optimizer: the Megatron optimizer (`get_megatron_optimizer`'s result).
        grad_buffers: free DDP's gradient buffers during the rollout.
        optimizer_states: move the optimizer's main parameters and states to host memory during the rollout.
        on_cpu: CPU run: no `torch.cuda.synchronize()` / `empty_cache()` around the calls.
    """

    def __init__(self, model: Any, optimizer: Any, *, grad_buffers: bool, optimizer_states: bool,
                 on_cpu: bool) -> None:
        self.model = model
        self.optimizer = optimizer
        self.grad_buffers = grad_buffers
        self.optimizer_states = optimizer_states
        self.on_cpu = on_cpu

    @contextmanager
    def __call__(self) -> Iterator[None]:
        cuda = not self.on_cpu
        if self.grad_buffers:
            self.model.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        if self.optimizer_states:
            self.optimizer.offload_to_cpu()  # calls torch.cuda.empty_cache() itself
        try:
            yield
        finally:
            if self.optimizer_states:
                self.optimizer.restore_from_cpu()
            if self.grad_buffers:
                self.model.restore_grad_buffers(synchronize=cuda)
