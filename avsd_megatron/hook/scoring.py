"""The teacher scoring pass: one forward-only Megatron schedule over all M * B teacher rows of every micro-batch.

    outputs = score_teachers(model, batch, loss_config, teacher=teacher, tp_group=tp_group, is_last_stage=last)

runs `get_forward_backward_func()(forward_only=True, collect_non_loss_data=True)` with `batch.num_microbatches`
micro-batches of `M * B` rows (all views of the micro-batch's B prompts together, not M separate passes) and row
length L_t (or, packed, one [1, T_t] row of M * B segments: `packing.py`), inside `teacher.scoring_weights()`
(frozen / EMA weights swapped in, spec 3.2), `torch.no_grad()` and eval mode. On the last pipeline stage a `GPTModel` output_processor selects the M * N completion-predicting rows
of the final hidden states (`completion_output`) and reduces them at once to what the loss needs, so neither full
[L_t, M * B, V/tp] logits nor teacher logits outlive the micro-batch:

| loss         | `TeacherOutputs` field                                | TP collectives per micro-batch (chunk) |
|--------------|-------------------------------------------------------|----------------------------------------|
| `sampled`    | view_logprobs [M, N] fp32                             | 1 all-gather of [3, M c] fp32          |
| `candidate`  | candidates: ids [N, Kc], mask, log-probs [M, N, Kc]   | 2 (top-k, candidate logits)            |
| `full_vocab` | view_hidden [M, N, H] + view_output_weight [V/tp, H]  | 0                                      |

ℓ_m is normalised over the real vocabulary of z_m / τ in fp32 (spec 2.1, 6 item 2). The returned list is in
micro-batch order: element i belongs to `batch.micro_batches[i]`; on other pipeline stages every element is None.
"""

from __future__ import annotations

from typing import Any

import torch

from avsd_megatron.hook.batch import AVSDBatch, AVSDMicroBatch
from avsd_megatron.hook.completion_output import completion_hidden_states, output_weight_of, project_to_logits
from avsd_megatron.hook.loss import AVSD_LOSS_KINDS, AVSDLossConfig, TeacherOutputs
from avsd_megatron.hook.packing import packed_seq_params
from avsd_megatron.hook.teacher_kinds import Teacher
from avsd_megatron.vocab_parallel import CandidateSet, sampled_token_logprobs, teacher_candidates

__all__ = ["TeacherScoringStep", "score_teachers"]


class TeacherScoringStep:
    """Megatron `forward_step_func` of the scoring pass; `next(data_iterator)` is an `AVSDMicroBatch`.

    Args:
        config: AVSDLossConfig (which loss the outputs feed, τ, k, chunking).
        tp_group: tensor-parallel group (None for TP=1).
        copy_output_weight: full_vocab only: return a copy of the output weight shard (True when the teacher's
            weights are swapped out again after the pass; the live teacher can hand out the parameter itself).
    """

    def __init__(self, config: AVSDLossConfig, *, tp_group: Any, copy_output_weight: bool) -> None:
        self.config = config
        self.tp_group = tp_group
        self.copy_output_weight = copy_output_weight
        self._weight_copy: torch.Tensor | None = None  # full_vocab: one copy per pass, shared by its micro-batches
        self._reduce = {"sampled": self._view_logprobs, "candidate": self._candidates, "full_vocab": self._hidden}[
            config.loss
        ]

    def __call__(self, data_iterator, model: torch.nn.Module):
        micro_batch: AVSDMicroBatch = next(data_iterator)
        output = model(
            micro_batch.teacher.tokens,  # [M * B, L_t], row m * B + b; packed: [1, T_t]
            micro_batch.teacher.position_ids,  # [M * B, L_t], 0..L_t-1; packed: 0.. per segment
            None,  # causal mask
            packed_seq_params=packed_seq_params(micro_batch.teacher),  # None unless packed (THD)
            output_processor=self._process,
            output_processor_context=micro_batch,
        )
        return output, _pass_through

    def _process(self, *, hidden_states, output_layer, output_weight, context, scale_logits, **unused):
        """GPTModel output_processor (last stage): hidden [L_t, M * B, H] (packed: [T_t, 1, H]) -> `TeacherOutputs`
        of this micro-batch."""
        micro_batch: AVSDMicroBatch = context
        selected = completion_hidden_states(
            hidden_states,
            micro_batch.teacher.gather_index,
            sequence_parallel=bool(getattr(output_layer, "sequence_parallel", False)),
            tp_group=self.tp_group,
        )  # [M * N, H], view-major
        num_views, num_tokens = micro_batch.num_views, micro_batch.num_tokens
        view_hidden = selected.view(num_views, num_tokens, selected.shape[-1])  # [M, N, H]

        def logits_of(lo: int, hi: int) -> torch.Tensor:
            chunk = view_hidden[:, lo:hi].reshape(-1, view_hidden.shape[-1])  # [M * c, H]
            logits = project_to_logits(chunk, output_layer, output_weight, scale_logits=scale_logits)
            return logits.view(num_views, hi - lo, logits.shape[-1])  # [M, c, V/tp]

        return self._reduce(micro_batch, view_hidden, logits_of, output_weight_of(output_layer, output_weight))

    def _chunks(self, num_tokens: int) -> list[tuple[int, int]]:
        step = self.config.teacher_chunk_tokens or max(num_tokens, 1)
        return [(lo, min(lo + step, num_tokens)) for lo in range(0, num_tokens, step)]

    def _view_logprobs(self, micro_batch: AVSDMicroBatch, view_hidden, logits_of, weight) -> TeacherOutputs:
        """ℓ_m(t) [M, N] fp32 for the sampled-token loss."""
        parts = [
            sampled_token_logprobs(
                logits_of(lo, hi),
                micro_batch.token_ids[lo:hi],  # [c], shared by the M views
                temperature=self.config.temperature,
                group=self.tp_group,
                vocab_size=self.config.vocab_size,
                chunk_size=self.config.logprob_chunk_size,
            )  # [M, c]
            for lo, hi in self._chunks(micro_batch.num_tokens)
        ]
        return TeacherOutputs(view_logprobs=torch.cat(parts, dim=1))  # [M, N]

    def _candidates(self, micro_batch: AVSDMicroBatch, view_hidden, logits_of, weight) -> TeacherOutputs:
        """Top-k union K_t and the views' log-probs on it for the candidate loss."""
        parts = [
            teacher_candidates(
                logits_of(lo, hi),
                micro_batch.token_ids[lo:hi],
                k=self.config.topk,
                temperature=self.config.temperature,
                group=self.tp_group,
                vocab_size=self.config.vocab_size,
            )
            for lo, hi in self._chunks(micro_batch.num_tokens)
        ]
        candidates = CandidateSet(
            ids=torch.cat([p.ids for p in parts]),  # [N, Kc]
            mask=torch.cat([p.mask for p in parts]),  # [N, Kc]
            view_logprobs=torch.cat([p.view_logprobs for p in parts], dim=1),  # [M, N, Kc]
        )
        return TeacherOutputs(candidates=candidates)

    def _hidden(self, micro_batch: AVSDMicroBatch, view_hidden, logits_of, weight) -> TeacherOutputs:
        """The views' final hidden states and the teacher's output weight shard for the full-vocab loss."""
        weight = weight.detach()
        if self.copy_output_weight:
            if self._weight_copy is None:
                self._weight_copy = weight.clone()
            weight = self._weight_copy
        return TeacherOutputs(
            view_hidden=view_hidden.detach().clone(),  # [M, N, H]; own storage, not a view of [L_t, M * B, H]
            view_output_weight=weight,  # [V/tp, H]
        )


def _pass_through(output: TeacherOutputs, non_loss_data: bool = False) -> TeacherOutputs:
    """The scoring pass's loss_func: Megatron stores its return value (collect_non_loss_data=True)."""
    if not non_loss_data:
        raise RuntimeError("the teacher scoring pass must run with forward_only=True, collect_non_loss_data=True")
    return output


def score_teachers(
    model: torch.nn.Module,
    batch: AVSDBatch,
    config: AVSDLossConfig,
    *,
    teacher: Teacher,
    tp_group: Any,
    is_last_stage: bool,
    forward_backward_func: Any = None,
) -> list[TeacherOutputs | None]:
    """Score the sampled completions under every view with the teacher's weights (forward only, micro-batched).

    Args:
        model: this rank's model chunk (GPTModel, or DDP / Float16Module-wrapped); one chunk (no virtual PP).
        batch: AVSDBatch; its tensors on the model's device.
        config: AVSDLossConfig; `config.loss` decides the outputs (module docstring).
        teacher: the teacher kind (`teacher_kinds.build_teacher`); its weights are in the model only during the
            pass and the student's weights are restored bit for bit afterwards.
        tp_group: tensor-parallel group (None for TP=1).
        is_last_stage: whether this rank is on the last pipeline stage (only there outputs exist).
        forward_backward_func: the schedule; None = `megatron.core.pipeline_parallel.get_forward_backward_func()`.
    Returns:
        list of `batch.num_microbatches` `TeacherOutputs` on the last stage (micro-batch order), Nones elsewhere.
    """
    if config.loss not in AVSD_LOSS_KINDS:
        raise ValueError(f"loss={config.loss!r} has no teacher scoring pass (its targets come with the batch)")
    if batch.num_views == 0:
        raise ValueError("the batch has no teacher rows (built with teacher_prompts=None): nothing to score")
    if forward_backward_func is None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward_func = get_forward_backward_func()
    step = TeacherScoringStep(config, tp_group=tp_group, copy_output_weight=teacher.kind != "live")
    seq_length, rows = batch.schedule_shape("teacher")  # (L_t, M * B) rows per micro-batch; packed (T_t, 1)
    was_training = model.training
    model.eval()
    try:
        with teacher.scoring_weights(), torch.no_grad():
            outputs = forward_backward_func(
                forward_step_func=step,
                data_iterator=iter(batch.micro_batches),
                model=[model],
                num_microbatches=batch.num_microbatches,
                seq_length=seq_length,
                micro_batch_size=rows,
                forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        model.train(was_training)
    if not is_last_stage:
        return [None] * batch.num_microbatches
    if len(outputs) != batch.num_microbatches:
        raise RuntimeError(
            f"the scoring pass returned {len(outputs)} outputs for {batch.num_microbatches} micro-batches"
        )
    return list(outputs)
