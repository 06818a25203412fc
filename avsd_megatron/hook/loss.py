"""The AVSD training pass inside Megatron-Core's schedules: `AVSDLossConfig`, `AVSDForwardStep` and its loss.

`get_forward_backward_func()(forward_step_func=AVSDForwardStep(...), data_iterator=iter(items), ...)` with one item
`(AVSDMicroBatch, TeacherOutputs | None)` per micro-batch: the teacher outputs of micro-batch i (from
`scoring.score_teachers`, same micro-batch order) travel with student micro-batch i, so on the last pipeline stage the
loss of micro-batch i sees exactly its own teachers. Other stages receive None for the teacher outputs and never run
the loss.

On the last stage `GPTModel.forward(output_processor=...)` hands the final hidden states to
`completion_output.completion_logits`, which runs the output layer at the N completion-predicting positions only;
the model's output is `CompletionLogits([N, V/tp])`. The loss function then calls the vocab-parallel AVSD kernel
chosen once at construction (`AVSDLossConfig.loss`):

| loss         | teacher outputs used                    | kernel (`avsd_megatron.vocab_parallel`)   | TP collectives |
|--------------|-----------------------------------------|-------------------------------------------|----------------|
| `sampled`    | view log-probs ℓ_m [M, N] fp32          | `avsd_sampled_token_loss` (spec 2.2)      | 1 fwd, 0 bwd   |
| `candidate`  | `CandidateSet` (top-k union, log-probs) | `avsd_candidate_loss_from_teacher` (2.3)  | 1 fwd, 0 bwd   |
| `full_vocab` | final hidden states [M, N, H] + W_out    | `avsd_full_vocab_loss`                    | 4 per chunk    |
| `policy_gradient` | token advantages [N] (GRPO, no teacher) | `policy_gradient_loss`               | 1 fwd, 0 bwd   |

Normalisation (spec 2.6), returned in Megatron's `calculate_per_token_loss=True` 3-tuple form, so that
`finalize_model_grads` divides the summed gradients by the summed count over micro-batches and DP ranks:
* `microbatch_token_mean` (the reference): each micro-batch returns (loss_sum / max(n, 1), 1): the objective is the
  mean over micro-batches x DP ranks of per-micro-batch token means (an empty micro-batch counts, with loss 0).
* `global_token_mean`: each micro-batch returns (loss_sum, n): the objective is the mean over all valid tokens of
  the global batch.
Both add the metrics `avsd_loss` = [returned loss, returned count] (summed over micro-batches and DP ranks, its
ratio is exactly the objective) and `avsd_tokens_per_microbatch` = [valid tokens, 1]. Every other metric is
Megatron's [sum, count] pair from the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from avsd_megatron.hook.batch import AVSDMicroBatch
from avsd_megatron.hook.completion_output import CompletionLogits, completion_logits
from avsd_megatron.hook.packing import packed_seq_params
from avsd_megatron.signals.candidate import WEIGHT_MODES
from avsd_megatron.signals.sampled import GATE_MODES, MODES, GateParams
from avsd_megatron.vocab_parallel import (
    avsd_candidate_loss_from_teacher,
    avsd_full_vocab_loss,
    avsd_sampled_token_loss,
    policy_gradient_loss,
)
from avsd_megatron.vocab_parallel.full_vocab import CLIP_SCOPES
from avsd_megatron.vocab_parallel.sampled_loss import metric

__all__ = [
    "AVSD_LOSS_KINDS",
    "AVSDForwardStep",
    "AVSDLossConfig",
    "LOSS_KINDS",
    "NORMALIZATIONS",
    "TeacherOutputs",
    "avsd_microbatch_loss",
]

AVSD_LOSS_KINDS = ("sampled", "candidate", "full_vocab")
"""The losses that read the teacher scoring pass."""
LOSS_KINDS = AVSD_LOSS_KINDS + ("policy_gradient",)
"""The AVSD losses, then `policy_gradient` (GRPO: advantages come with the micro-batch, no teacher)."""
NORMALIZATIONS = ("microbatch_token_mean", "global_token_mean")


@dataclass(frozen=True)
class AVSDLossConfig:
    """The AVSD objective of the training pass (and what the teacher scoring pass must produce for it)."""

    temperature: float
    """τ, the rollout's sampling temperature; student and teacher logits are divided by it (spec 2.1)."""
    loss: Literal["sampled", "candidate", "full_vocab", "policy_gradient"] = "sampled"
    """sampled: the paper's sampled-token loss (spec 2.2, the released scripts); candidate: generalized JSD on the
    views' top-k union (spec 2.3); full_vocab: generalized JSD over the whole vocabulary; policy_gradient: -A_t ℓ_s
    with the advantages of `TeacherOutputs.token_advantages` (GRPO; the scoring pass is not run)."""
    normalization: Literal["microbatch_token_mean", "global_token_mean"] = "microbatch_token_mean"
    """microbatch_token_mean reproduces the reference (spec 2.6); global_token_mean pools all tokens of the step."""
    mode: str = "avsd"
    """Target mode, one of signals.MODES: avsd | consensus | arithmetic | single."""
    gate: str = "avsd"
    """Gate formula, one of signals.GATE_MODES: avsd | sigmoid | consistency_exp."""
    gate_params: GateParams | None = None
    """Constants of the sigmoid / consistency_exp gates; None = spec 2.5 defaults."""
    epistemic_tau: float = 0.0
    """τ_e of the epistemic-preservation term (sampled and candidate losses); 0 = off, as in the released scripts."""
    vocab_size: int | None = None
    """Real vocabulary size V; output columns >= V (Megatron padding) are ignored. None = every column is real."""
    topk: int = 64
    """k of the per-view top-k (candidate loss; reference `multi_view_teacher_topk`)."""
    beta: float = 0.5
    """Generalized-JSD β (candidate and full_vocab losses)."""
    token_clip: float = 0.05
    """Per-token JSD clamp from above (candidate and full_vocab; 0 disables)."""
    weight_mode: str = "uniform"
    """View weights of the candidate / full_vocab targets: uniform | agreement_centrality."""
    eta: float = 5.0
    """Agreement-centrality η."""
    detach_target: bool = True
    """Candidate loss: hold q_T constant (False reproduces the reference's gradient through the gate, spec 6.4)."""
    single_view_clip: Literal["entry", "token"] = "entry"
    """mode='single' with loss='full_vocab': 'entry' (the reference, spec 2.4) clamps each (token, vocabulary entry)
    JSD term at token_clip; 'token' clamps each token's JSD, as every other mode and the candidate loss do."""
    detach_gate: bool = False
    """Epistemic term (sampled and candidate losses): False (the reference, spec 2.2 step 10, 2.3 step 11) lets
    gradient flow through g; True holds g constant there."""
    teacher_chunk_tokens: int | None = None
    """Scoring pass: completion tokens per output-layer chunk (bounds the [M, c, V/tp] teacher logits; one TP
    collective per chunk). None = the whole micro-batch at once."""
    logprob_chunk_size: int | None = None
    """Rows upcast to fp32 at a time inside the kernels (`chunk_size`); None = the kernels' default."""

    def __post_init__(self) -> None:
        checks = (
            ("loss", self.loss, LOSS_KINDS),
            ("normalization", self.normalization, NORMALIZATIONS),
            ("mode", self.mode, MODES),
            ("gate", self.gate, GATE_MODES),
            ("weight_mode", self.weight_mode, WEIGHT_MODES),
            ("single_view_clip", self.single_view_clip, CLIP_SCOPES),
        )
        for name, value, choices in checks:
            if value not in choices:
                raise ValueError(f"avsd.{name}={value!r} is not one of {choices}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"avsd.temperature={self.temperature!r} must be a finite number > 0")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"avsd.vocab_size={self.vocab_size!r} must be >= 1 or None")
        if self.topk < 1:
            raise ValueError(f"avsd.topk={self.topk!r} must be >= 1")
        if self.epistemic_tau and self.loss == "full_vocab":
            raise ValueError("avsd.epistemic_tau is not implemented for avsd.loss='full_vocab'; set it to 0")
        for name in ("teacher_chunk_tokens", "logprob_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"avsd.{name}={value!r} must be >= 1 or None")


@dataclass(frozen=True)
class TeacherOutputs:
    """What the teacher scoring pass leaves on the last pipeline stage for one micro-batch (per `loss`).

    Attributes:
        view_logprobs: [M, N] fp32 ℓ_m(t) = log softmax(z_m / τ)[y_t] (loss='sampled').
        candidates: `vocab_parallel.CandidateSet`, ids [N, Kc], mask, view log-probs [M, N, Kc] (loss='candidate').
        view_hidden: [M, N, H] model dtype, the views' final hidden states at the completion-predicting positions
            (loss='full_vocab').
        view_output_weight: [V/tp, H] the teacher's output-layer weight shard (loss='full_vocab'; a copy when the
            teacher's weights are swapped in only for the scoring pass).
        token_advantages: [N] fp32 advantage of every completion token (loss='policy_gradient': GRPO puts the
            completion's group-normalised advantage on each of its tokens; no teacher pass made it).

    Memory: every micro-batch's outputs live from the scoring pass until the student pass, i.e. per step about
    num_microbatches * M * N fp32 scalars (sampled), * Kc (candidate) or * H model-dtype values (full_vocab).
    """

    view_logprobs: torch.Tensor | None = None
    candidates: Any = None
    view_hidden: torch.Tensor | None = None
    view_output_weight: torch.Tensor | None = None
    token_advantages: torch.Tensor | None = None


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def _sampled_loss(logits, mb: AVSDMicroBatch, teacher: TeacherOutputs, cfg: AVSDLossConfig, group, view_names):
    return avsd_sampled_token_loss(
        logits,
        mb.token_ids,
        teacher.view_logprobs,
        mb.loss_mask,
        temperature=cfg.temperature,
        mode=cfg.mode,
        gate=cfg.gate,
        group=group,
        vocab_size=cfg.vocab_size,
        gate_params=cfg.gate_params,
        view_names=view_names,
        epistemic_tau=cfg.epistemic_tau,
        detach_gate=cfg.detach_gate,
        chunk_size=cfg.logprob_chunk_size,
    )


def _candidate_loss(logits, mb: AVSDMicroBatch, teacher: TeacherOutputs, cfg: AVSDLossConfig, group, view_names):
    return avsd_candidate_loss_from_teacher(
        logits,
        teacher.candidates,
        mb.loss_mask,
        temperature=cfg.temperature,
        mode=cfg.mode,
        gate=cfg.gate,
        beta=cfg.beta,
        token_clip=cfg.token_clip,
        group=group,
        vocab_size=cfg.vocab_size,
        gate_params=cfg.gate_params,
        weight_mode=cfg.weight_mode,
        eta=cfg.eta,
        detach_target=cfg.detach_target,
        epistemic_tau=cfg.epistemic_tau,
        detach_gate=cfg.detach_gate,
        view_names=view_names,
    )


def _full_vocab_loss(logits, mb: AVSDMicroBatch, teacher: TeacherOutputs, cfg: AVSDLossConfig, group, view_names):
    del view_names
    return avsd_full_vocab_loss(
        logits,
        mb.loss_mask,
        temperature=cfg.temperature,
        mode=cfg.mode,
        gate=cfg.gate,
        beta=cfg.beta,
        token_clip=cfg.token_clip,
        group=group,
        clip_scope=cfg.single_view_clip if cfg.mode == "single" else "token",
        view_hidden=teacher.view_hidden,
        view_output_weight=teacher.view_output_weight,
        vocab_size=cfg.vocab_size,
        gate_params=cfg.gate_params,
        weight_mode=cfg.weight_mode,
        eta=cfg.eta,
        chunk_size=cfg.logprob_chunk_size,
    )


def _policy_gradient_loss(logits, mb: AVSDMicroBatch, teacher: TeacherOutputs, cfg: AVSDLossConfig, group,
                          view_names):
    del view_names
    if teacher.token_advantages is None:
        raise ValueError("loss='policy_gradient' needs TeacherOutputs.token_advantages [N] for every micro-batch")
    return policy_gradient_loss(
        logits,
        mb.token_ids,
        teacher.token_advantages,
        mb.loss_mask,
        temperature=cfg.temperature,
        group=group,
        vocab_size=cfg.vocab_size,
        chunk_size=cfg.logprob_chunk_size,
    )


LOSSES: dict[str, LossFn] = {
    "sampled": _sampled_loss,
    "candidate": _candidate_loss,
    "full_vocab": _full_vocab_loss,
    "policy_gradient": _policy_gradient_loss,
}


def _microbatch_token_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum / max(n, 1), 1): Megatron then averages over micro-batches x DP ranks (the reference, spec 2.6)."""
    return loss_sum / num_tokens.clamp(min=1).to(loss_sum.dtype), torch.ones_like(num_tokens)


def _global_token_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n): Megatron divides by the token count of the whole global batch."""
    return loss_sum, num_tokens


NORMALIZERS = {"microbatch_token_mean": _microbatch_token_mean, "global_token_mean": _global_token_mean}


def avsd_microbatch_loss(
    student_logits: torch.Tensor,
    micro_batch: AVSDMicroBatch,
    teacher: TeacherOutputs,
    config: AVSDLossConfig,
    *,
    tp_group: Any,
    view_names: tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The AVSD loss of one micro-batch in Megatron's per-token 3-tuple form, normalised per `config.normalization`.

    Args:
        student_logits: [N, V/tp] student logits at the completion-predicting positions, with grad.
        micro_batch: the micro-batch (token_ids [N], loss_mask [N]).
        teacher: its `TeacherOutputs` from the scoring pass.
        config: AVSDLossConfig.
        tp_group: tensor-parallel group of the vocab shards; None = one rank.
        view_names: M names for the per-view metrics.
    Returns:
        (loss, count, metrics): loss [] fp32 differentiable, count [] int32, metrics name -> detached fp32
        [2] (sum, count), including `avsd_loss` = (loss, count) and `avsd_tokens_per_microbatch` = (valid tokens, 1).
    """
    loss_sum, num_tokens, metrics = LOSSES[config.loss](
        student_logits, micro_batch, teacher, config, tp_group, view_names
    )
    loss, count = NORMALIZERS[config.normalization](loss_sum, num_tokens)
    metrics = dict(metrics)
    metrics["avsd_loss"] = metric(loss, count)
    metrics["avsd_tokens_per_microbatch"] = metric(num_tokens, torch.ones_like(num_tokens))
    return loss, count, metrics


class AVSDForwardStep:
    """Megatron `forward_step_func` of the student pass: `(data_iterator, model) -> (output, loss_func)`.

    Each `next(data_iterator)` is `(AVSDMicroBatch, TeacherOutputs | None)`; the teacher outputs must be present on
    the last pipeline stage. The micro-batch's tensors must already be on the model's device.

    Args:
        config: AVSDLossConfig.
        tp_group: tensor-parallel group handed to the vocab-parallel kernel (None for TP=1).
        view_names: M view names for the metrics.
    """

    def __init__(self, config: AVSDLossConfig, *, tp_group: Any, view_names: tuple[str, ...] | None = None) -> None:
        self.config = config
        self.tp_group = tp_group
        self.view_names = view_names

    def __call__(self, data_iterator: Iterator, model: torch.nn.Module):
        micro_batch, teacher = next(data_iterator)
        output = model(
            micro_batch.student.tokens,  # [B, L_s]; packed: [1, T_s]
            micro_batch.student.position_ids,  # [B, L_s], 0..L_s-1; packed: 0.. per segment
            None,  # causal mask; right padding cannot reach real tokens
            packed_seq_params=packed_seq_params(micro_batch.student),  # None unless packed (THD)
            output_processor=self._student_logits,
            output_processor_context=micro_batch.student.gather_index,
        )
        return output, lambda output_tensor: self.loss_func(micro_batch, teacher, output_tensor)

    def _student_logits(self, *, hidden_states, output_layer, output_weight, context, scale_logits, **unused):
        """GPTModel output_processor (last stage): logits at the N completion-predicting positions only."""
        logits = completion_logits(
            hidden_states, output_layer, output_weight, context, tp_group=self.tp_group, scale_logits=scale_logits
        )
        return CompletionLogits(logits)  # [N, V/tp]

    def loss_func(self, micro_batch: AVSDMicroBatch, teacher: TeacherOutputs | None, output: CompletionLogits):
        """Megatron loss_func on the last stage: (loss, count, metrics) of `avsd_microbatch_loss`."""
        if teacher is None:
            raise RuntimeError(
                "no TeacherOutputs for this micro-batch on the last pipeline stage: pass the outputs of "
                "score_teachers() (same micro-batch order) with the student micro-batches"
            )
        return avsd_microbatch_loss(
            output.logits, micro_batch, teacher, self.config, tp_group=self.tp_group, view_names=self.view_names
        )
