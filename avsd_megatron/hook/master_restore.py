"""Put θ back into the model from the distributed optimizer's fp32 master copy: `MasterRestore`.

With bf16 / fp16 parameters, megatron-core's `DistributedOptimizer` keeps an fp32 master shard of every parameter
(`shard_fp32_from_float16_groups`, `shard_main_param = shard_model_param.clone().float()`,
optimizer/distrib_optimizer.py:445) and after each step writes bf16(master) into this rank's slice of the DDP
param buffer (`_copy_main_params_to_model_params`, :2792, the `copy_` at :2876) and all-gathers the buckets over
the data-parallel group (`step_with_ready_grads`, :3158 -> `start_param_sync_for_bucket_group_subset`, :3129 ->
`DistributedDataParallel._start_bucket_group_param_sync`, distributed/distributed_data_parallel.py:516 ->
`_ParamAndGradBucketGroup.start_param_sync`, distributed/param_and_grad_buffer.py:377: `all_gather_into_tensor`
of each bucket's `param_data` under `_coalescing_manager`, :504, synchronous while `overlap_param_gather=False`).
So between steps the model's parameters are exactly bf16(master): running those two library calls again after the
teacher's values were copied into the parameters restores θ bit for bit, without a saved copy of θ.

`restore()` is those two calls, per `DistributedOptimizer` (a `ChainedOptimizer` is unwrapped). The master is read,
never written; gradients, Adam moments and the step count are untouched (the standard path of the param sync
reads and writes only `param_data`).

Where it cannot work (`MasterRestore.why_not` says which, `build_teacher` then refuses a forced restore):
- fp32 parameters: the distributed optimizer's "master" of an fp32 parameter is a view of that parameter's own
  slice of the param buffer (`shard_model_param = model_param.view(-1)[...]`, distrib_optimizer.py:467, put in the
  inner optimizer's group as is, :488), so copying the teacher into the parameter overwrites the master too;
- no distributed optimizer (e.g. `Float16OptimizerWithFloat16Params` or `FP32Optimizer`): kept on the swap;
- the precision-aware optimizer (main params held by FusedAdam: `_copy_main_params_to_model_params` returns early,
  :2812), FP8 / FP4 param gather, MXFP8 grad-buffer reuse, Megatron-FSDP: other copy paths, not checked here;
- `overlap_param_gather=True`: the all-gather would be deferred into the next forward pass;
- a parameter outside the DDP param buffers (e.g. requires_grad=False): nothing would restore it.
The decision is read from the DDP param buffers (dtype, members), which every DP rank holds alike, so all ranks take
it the same way (the restore's all-gather is collective); the optimizer's own groups list only the parameters that
intersect this rank's shard.

On CPU the same path runs on gloo: its bf16 `all_gather_into_tensor` under `_coalescing_manager` works (torch 2.14),
so tests/hook/test_master_restore.py exercises the library's own collective at TP2, DP2 and PP2, not a stand-in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["MasterRestore"]


class MasterRestore:
    """Restores the model's parameters θ from the distributed optimizer's fp32 master (module docstring).

    Args:
        optimizer: the Megatron optimizer over the model (`get_megatron_optimizer`).
        params: the parameters the teacher overwrites (`model.parameters()`).
    Raises:
        ValueError: `why_not(optimizer, params)` is not None.
    """

    def __init__(self, optimizer: Any, params: Iterable[torch.nn.Parameter]) -> None:
        reason = self.why_not(optimizer, params)
        if reason is not None:
            raise ValueError(reason)
        self._optimizers = _distributed_optimizers(optimizer)

    @staticmethod
    def why_not(optimizer: Any, params: Iterable[torch.nn.Parameter]) -> str | None:
        """Why θ cannot be restored from `optimizer`'s master copy (None: it can). Reads attributes only."""
        if optimizer is None:
            return "no optimizer was given to restore θ from"
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        not_distributed = sorted({type(o).__name__ for o in inner if not isinstance(o, DistributedOptimizer)})
        if not_distributed:
            return (f"the optimizer is not megatron-core's DistributedOptimizer ({', '.join(not_distributed)}); "
                    "restoring θ from the master needs optim.distributed_optimizer=True")
        # Decided from the DDP param buffers (the same on every DP rank: the restore's all-gather must run on all
        # of them or none), not from the optimizer's groups, which list only the parameters that intersect this
        # rank's shard (a parameter wholly in another DP rank's shard is absent from them).
        covered: set[int] = set()
        for opt in inner:
            if opt.ddp_config.overlap_param_gather:
                return "overlap_param_gather=True defers the parameter all-gather into the next forward pass"
            for switch in ("use_megatron_fsdp", "fp8_param_gather", "fp4_param_gather"):
                if getattr(opt.ddp_config, switch, False):
                    return f"DistributedDataParallelConfig.{switch}=True copies the master by another path"
            for switch in ("use_precision_aware_optimizer_no_fp8_or_ds_fp8", "reuse_grad_buf_for_mxfp8_param_ag"):
                if getattr(opt.config, switch, False):
                    return f"OptimizerConfig.{switch}=True copies the master by another path"
            for buffer in getattr(opt, "buffers", []):  # a stub optimizer (no parameters here) has none
                if buffer.param_dtype not in (torch.bfloat16, torch.float16):
                    return (f"{len(buffer.params)} parameter(s) are {buffer.param_dtype}: the distributed optimizer's "
                            "master of an fp32 parameter is the parameter's own slice of the param buffer "
                            "(distrib_optimizer.py:467), which the teacher overwrites; restoring θ from it needs "
                            "bf16 / fp16 parameters (model.dtype)")
                covered.update(id(p) for p in buffer.params)
        missing = sum(1 for p in params if id(p) not in covered)
        if missing:
            return (f"{missing} parameter(s) are not in the distributed optimizer's param buffers (no master copy to "
                    "restore them from)")
        return None

    @torch.no_grad()
    def matches_params(self) -> bool:
        """Whether this rank's parameter shard is exactly bf16 / fp16 of its fp32 master now (the precondition of
        `restore()`; true after every optimizer step and at construction). A resumed checkpoint whose weights and
        optimizer state disagree would fail it. Local: no collective."""
        for opt in self._optimizers:
            # shard_float16_groups: views of this rank's slices of the model params (distrib_optimizer.py:412),
            # element for element the shard_fp32_from_float16_groups masters
            for shards, mains in zip(opt.shard_float16_groups, opt.shard_fp32_from_float16_groups, strict=True):
                for shard, main in zip(shards, mains, strict=True):
                    if not torch.equal(shard.view(torch.int16), main.to(shard.dtype).view(torch.int16)):
                        return False
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """θ := bf16(master) in every parameter, as after the optimizer step (one local copy + the DP all-gather).

        Collectives: the param all-gather of every bucket over the distributed optimizer's data-parallel group
        (a no-op copy with one DP rank), as `DistributedOptimizer.step_with_ready_grads` runs it.
        """
        for opt in self._optimizers:
            opt._copy_main_params_to_model_params()  # distrib_optimizer.py:2792: this rank's shard, fp32 -> bf16
            opt.start_param_sync_for_bucket_group_subset()  # :3129, as step_with_ready_grads (:3185) calls it


def _distributed_optimizers(optimizer: Any) -> list[Any]:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if not getattr(o, "is_stub_optimizer", False)]
