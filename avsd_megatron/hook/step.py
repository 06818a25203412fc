"""One AVSD optimizer step on Megatron-Core, read top to bottom: score_teachers -> update_student -> optimizer step.

    groups = MegatronGroups.from_parallel_state()
    teacher = build_teacher(TeacherConfig(kind="frozen"), model.parameters(), model, optimizer)  # before step 1
    step = AVSDStep(model, optimizer, AVSDLossConfig(temperature=0.7), teacher, groups=groups)
    result = step(batch)                     # batch: this DP rank's AVSDBatch (build_avsd_batch)

1. zero the gradient buffers;
2. `score_teachers`: one forward-only schedule over the M * B teacher rows of every micro-batch, teacher weights
   swapped in (`teacher_kinds.py`; θ restored afterwards from the optimizer's fp32 master or a swap buffer);
3. `update_student`: one forward-backward schedule over the student rows, micro-batch i paired with the teacher
   outputs of micro-batch i (`loss.AVSDForwardStep`); Megatron's `finalize_model_grads` reduces gradients over DP
   (and TP for replicated norms, PP for tied embeddings) and divides them by the summed count the loss returned;
4. `optimizer.step()` (DDP + distributed optimizer or any Megatron optimizer), then `teacher.after_optimizer_step()`
   (the EMA update) if the update was applied;
5. metrics: [sum, count] pairs summed over micro-batches and all-reduced over DP on the last pipeline stage.

Requirements checked at construction: `config.calculate_per_token_loss=True` (the loss returns sums and counts),
`config.finalize_model_grads_func` set (else gradients are neither DP-reduced nor normalised), context parallel
size 1, one model chunk (no virtual pipeline stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from avsd_megatron.hook.batch import AVSDBatch
from avsd_megatron.hook.loss import AVSDForwardStep, AVSDLossConfig, TeacherOutputs
from avsd_megatron.hook.scoring import score_teachers
from avsd_megatron.hook.teacher_kinds import Teacher

__all__ = ["AVSDStep", "MegatronGroups", "StepResult", "reduce_metrics"]


@dataclass(frozen=True)
class MegatronGroups:
    """The process groups the AVSD hook passes down explicitly (None = a group of one rank: no collective)."""

    tp: Any
    """Tensor-parallel group: the vocab shards of the output layer."""
    dp: Any
    """Data-parallel group (without context parallelism): metrics are summed over it."""
    is_last_stage: bool
    """Whether this rank holds the last pipeline stage (the output layer and the loss)."""

    @classmethod
    def from_parallel_state(cls) -> MegatronGroups:
        """Read the groups once from Megatron's `parallel_state` (initialised by the caller)."""
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_group()
        dp = parallel_state.get_data_parallel_group(with_context_parallel=False)
        return cls(
            tp=tp if dist.get_world_size(tp) > 1 else None,
            dp=dp if dist.get_world_size(dp) > 1 else None,
            is_last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        )


@dataclass(frozen=True)
class StepResult:
    """What one AVSD step reports. Loss and metrics exist on the last pipeline stage only (None / {} elsewhere).

    Attributes:
        loss: the objective of the step (`avsd_loss` sum / count over micro-batches and DP ranks).
        num_tokens: valid completion tokens of the step over all DP ranks (from the kernels' counts).
        grad_norm: the optimizer's gradient norm (all ranks).
        update_successful: False if the optimizer skipped the step (e.g. fp16 overflow); then no EMA update.
        metrics: name -> sum / count over micro-batches and DP ranks (the kernels' mv_* metrics and avsd_loss).
    """

    loss: float | None
    num_tokens: int | None
    grad_norm: float | None
    update_successful: bool
    metrics: dict[str, float]


class AVSDStep:
    """An AVSD training step for one Megatron model chunk (module docstring).

    Args:
        model: the rank's model chunk (normally `DistributedDataParallel(Float16Module(GPTModel))`).
        optimizer: a Megatron optimizer (`get_megatron_optimizer`) over `model`.
        loss_config: AVSDLossConfig.
        teacher: from `teacher_kinds.build_teacher`, built on `model`'s parameters before the first step.
        groups: the explicit process groups; None = `MegatronGroups.from_parallel_state()`.
        view_names: M view names for the per-view metrics (None = the batch's names).
        forward_backward_func: the schedule; None = `get_forward_backward_func()`.
    Raises:
        ValueError: the model config misses a requirement listed in the module docstring.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        loss_config: AVSDLossConfig,
        teacher: Teacher,
        *,
        groups: MegatronGroups | None = None,
        forward_backward_func: Any = None,
    ) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        if isinstance(model, (list, tuple)):
            raise ValueError(
                f"AVSDStep takes one model chunk, got a list of {len(model)}; virtual pipeline stages are not supported"
            )
        config = get_model_config(model)
        if not config.calculate_per_token_loss:
            raise ValueError(
                "TransformerConfig.calculate_per_token_loss=False; AVSD's loss returns (sum, count) per micro-batch "
                "and needs calculate_per_token_loss=True (both normalizations are built on it)"
            )
        if config.finalize_model_grads_func is None:
            raise ValueError(
                "TransformerConfig.finalize_model_grads_func is None: gradients would be neither reduced over data "
                "parallel ranks nor divided by the token count; set it to "
                "megatron.core.distributed.finalize_model_grads"
            )
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size} is not supported by AVSDStep (use 1)"
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_config = loss_config
        self.teacher = teacher
        self.groups = groups if groups is not None else MegatronGroups.from_parallel_state()
        self.forward_backward_func = forward_backward_func or get_forward_backward_func()

    def __call__(self, batch: AVSDBatch) -> StepResult:
        batch = batch.to(_device_of(self.model))
        self.zero_grads()
        teacher_outputs = self.score_teachers(batch)
        per_microbatch = self.update_student(batch, teacher_outputs)
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.teacher.after_optimizer_step()
        return self._result(per_microbatch, update_successful, grad_norm)

    def zero_grads(self) -> None:
        """Zero DDP's gradient buffers (or plain .grad) and the optimizer's gradients."""
        if hasattr(self.model, "zero_grad_buffer"):
            self.model.zero_grad_buffer()
        else:
            self.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad()

    def score_teachers(self, batch: AVSDBatch) -> list[TeacherOutputs | None]:
        """Phase 1: the forward-only teacher pass (`scoring.score_teachers`)."""
        return score_teachers(
            self.model,
            batch,
            self.loss_config,
            teacher=self.teacher,
            tp_group=self.groups.tp,
            is_last_stage=self.groups.is_last_stage,
            forward_backward_func=self.forward_backward_func,
        )

    def update_student(
        self, batch: AVSDBatch, teacher_outputs: list[TeacherOutputs | None]
    ) -> list[dict[str, torch.Tensor]]:
        """Phase 2: forward + backward of the student micro-batches; returns the per-micro-batch metrics."""
        if len(teacher_outputs) != batch.num_microbatches:
            raise ValueError(
                f"{len(teacher_outputs)} teacher outputs for {batch.num_microbatches} micro-batches; "
                "score the same batch"
            )
        forward_step = AVSDForwardStep(self.loss_config, tp_group=self.groups.tp, view_names=batch.view_names)
        seq_length, rows = batch.schedule_shape("student")  # (L_s, B); packed (T_s, 1)
        return self.forward_backward_func(
            forward_step_func=forward_step,
            data_iterator=iter(list(zip(batch.micro_batches, teacher_outputs))),
            model=[self.model],
            num_microbatches=batch.num_microbatches,
            seq_length=seq_length,
            micro_batch_size=rows,
            forward_only=False,
        )

    def _result(self, per_microbatch: list[dict[str, torch.Tensor]], update_successful: bool, grad_norm) -> StepResult:
        grad_norm = None if grad_norm is None else float(grad_norm)
        if not self.groups.is_last_stage:
            return StepResult(None, None, grad_norm, bool(update_successful), {})
        totals = reduce_metrics(per_microbatch, dp_group=self.groups.dp)
        loss_sum, loss_count = totals.pop("avsd_loss")
        return StepResult(
            loss=loss_sum / max(loss_count, 1.0),
            num_tokens=int(totals["avsd_tokens_per_microbatch"][0]),
            grad_norm=grad_norm,
            update_successful=bool(update_successful),
            metrics={name: s / c if c else float("nan") for name, (s, c) in totals.items()},
        )


def reduce_metrics(per_microbatch: list[dict[str, torch.Tensor]], *, dp_group: Any) -> dict[str, tuple[float, float]]:
    """Sum Megatron-style [sum, count] metrics over micro-batches, then over `dp_group` (one all-reduce).

    Args:
        per_microbatch: the last stage's loss_func metrics, one dict name -> fp32 [2] per micro-batch.
        dp_group: data-parallel group (all of its ranks are on the same pipeline stage); None = one rank.
    Returns:
        name -> (sum, count) as Python floats. One host sync.
    Collectives:
        one all-reduce SUM of [K, 2] fp32 over `dp_group` (K metrics; every DP rank must report the same names).
    """
    names = sorted(per_microbatch[0]) if per_microbatch else []
    if not names:
        return {}
    stacked = torch.stack([torch.stack([m[name].float() for name in names]) for m in per_microbatch]).sum(0)  # [K, 2]
    if dp_group is not None:
        dist.all_reduce(stacked, group=dp_group)
    values = stacked.tolist()
    return {name: (v[0], v[1]) for name, v in zip(names, values)}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
