"""The default AVSD loss (spec 2.2, "tinker"): a signed, token-weighted cross-entropy on the sampled tokens.

    loss_sum = -sum_{t valid} A_t * ell_s(t),   A_t = stopgrad(T_t - ell_s(t)),   num_tokens = #valid,

returned in the 3-tuple form Megatron's `calculate_per_token_loss=True` schedule expects; Megatron divides the
summed loss by the summed token count, and `report[name] = [sum, count]` is reduced the same way. Only ell_s needs
the vocabulary (one all-gather, `sampled_token_logprobs`); T, A, J, g are per-token scalars from
`avsd_megatron.signals.sampled`, replicated on every TP rank.

`policy_gradient_loss` is the same signed cross-entropy with the advantages given (GRPO: each token carries its
sequence's group-normalised advantage, `signals.grpo`); with one optimizer step per rollout the importance ratio is
1, so this is GRPO's clipped surrogate's gradient exactly (no KL term).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from avsd_megatron.signals.sampled import GateParams, epistemic_sampled_token_term, sampled_token_targets
from avsd_megatron.vocab_parallel.checks import check_logits, check_mask
from avsd_megatron.vocab_parallel.logprob import sampled_token_logprobs

__all__ = ["avsd_sampled_token_loss", "metric", "policy_gradient_loss"]


def metric(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Megatron's report convention: a detached fp32 [2] tensor (sum, count); the logger shows sum / count."""
    return torch.stack([total.detach().to(torch.float32), count.detach().to(torch.float32)])


def avsd_sampled_token_loss(
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    view_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    mode: str,
    gate: str,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    gate_params: GateParams | None = None,
    view_weights: torch.Tensor | None = None,
    view_names: Sequence[str] | None = None,
    epistemic_tau: float = 0.0,
    detach_gate: bool = False,
    eps: float = 1e-8,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sampled-token AVSD loss on vocab-sharded student logits (spec 2.2 steps 1-10).

    Args:
        student_logits: [N, V/tp] bf16/fp32 student logits shard (N = completion tokens of the micro-batch), with
            grad.
        token_ids: [N] int sampled tokens y_t (any value where loss_mask is False, but inside [0, V)).
        view_logprobs: [M, N] fp32 ell_m(t) from the frozen teacher pass (e.g. `sampled_token_logprobs` on the
            views' logits [M, N, V/tp]); no grad.
        loss_mask: [N] bool valid completion tokens.
        temperature: tau, the sampling temperature (student logits are divided by it).
        mode: 'avsd' | 'consensus' | 'arithmetic' | 'single' (`signals.MODES`).
        gate: 'avsd' | 'sigmoid' | 'consistency_exp' (`signals.GATE_MODES`).
        group: tensor-parallel group of the vocab shards; None = one rank with the whole vocabulary.
        vocab_size: real vocabulary size V (Megatron padding columns >= V are ignored); None = V/tp * tp.
        gate_params: constants of the sigmoid / consistency_exp gates; None = spec defaults.
        view_weights: [M] view weights; None = uniform (the reference).
        view_names: M names for the per-view metrics; None = '0', '1', ...
        epistemic_tau: tau_e of the epistemic-preservation term (spec 2.2 step 10); 0 = off (the released scripts).
        detach_gate: epistemic term only: False (the reference) lets gradient flow through g, which depends on
            ell_s through delta; True holds g constant. The main term's advantage is always detached (step 8).
        eps: C and g denominators.
        chunk_size: rows upcast to fp32 at a time in `sampled_token_logprobs`.
    Returns:
        loss_sum: [] fp32, -sum_valid A_t ell_s(t) (+ sum_valid tau_e (1 - g_t) ell_s(t)), differentiable w.r.t.
            student_logits.
        num_tokens: [] int32, number of valid tokens (loss_mask and finite ell_s, T).
        metrics: name -> detached fp32 [2] (sum over valid tokens, num_tokens): mv_gate_mean, mv_jensen_gap_mean,
            mv_tinker_advantage_mean, mv_tinker_student_logprob_mean, mv_tinker_target_logprob_mean,
            mv_consensus_adv_abs_mean, mv_avsd_mean (C), mv_gate_open_frac (g > 0.5),
            mv_tinker_view_logprob_{name} per view; mv_excluded_frac = (#masked-in tokens dropped as non-finite,
            #masked-in tokens).
    Collectives:
        forward: one `all_gather_into_tensor` of [3, N] fp32 over `group` (inside `sampled_token_logprobs`);
        backward: none.
    Raises:
        ValueError/TypeError: shape/dtype mismatches (naming the argument), M != len(view_names), a token id
            outside [0, V), NaN/+inf logits or view log-probs, unknown mode/gate.
    """
    check_logits("student_logits", student_logits, ndim=2)
    num_tokens_total = student_logits.shape[0]
    if view_logprobs.ndim != 2 or view_logprobs.shape[1] != num_tokens_total:
        raise ValueError(
            f"view_logprobs must be [M, N={num_tokens_total}] (views first), got shape {tuple(view_logprobs.shape)}"
        )
    num_views = view_logprobs.shape[0]
    names = [str(m) for m in range(num_views)] if view_names is None else list(view_names)
    if len(names) != num_views:
        raise ValueError(f"view_names has {len(names)} names {names} but view_logprobs has M={num_views} views")
    if token_ids.shape != (num_tokens_total,):
        raise ValueError(f"token_ids must be [N={num_tokens_total}], got shape {tuple(token_ids.shape)}")
    check_mask("loss_mask", loss_mask, (num_tokens_total,))

    ell_s = sampled_token_logprobs(
        student_logits, token_ids, temperature=temperature, group=group, vocab_size=vocab_size, chunk_size=chunk_size
    )  # [N] fp32, with grad; the one collective
    # The targets see ell_s with grad only where a gradient through g is wanted (the reference's epistemic term).
    gate_grad = bool(epistemic_tau) and not detach_gate
    targets = sampled_token_targets(
        ell_s if gate_grad else ell_s.detach(),
        view_logprobs,
        mask=loss_mask,
        mode=mode,
        gate=gate,
        gate_params=gate_params,
        view_weights=view_weights,
        eps=eps,
    )
    valid = targets.valid
    advantage = targets.advantage.detach()  # 0 where not valid
    ell_valid = torch.where(valid, ell_s, 0.0)  # no -inf reaches the sum or its gradient
    loss_sum = -(advantage * ell_valid).sum()
    if epistemic_tau:
        loss_sum = loss_sum + epistemic_sampled_token_term(
            ell_s, targets.gate, valid, epistemic_tau, detach_gate=not gate_grad
        ).sum()

    count = valid.sum()
    ell_s_d = ell_valid.detach()
    metrics = {
        "mv_gate_mean": metric(targets.gate.sum(), count),
        "mv_jensen_gap_mean": metric(targets.jensen_gap.sum(), count),
        "mv_tinker_advantage_mean": metric(advantage.sum(), count),
        "mv_tinker_student_logprob_mean": metric(ell_s_d.sum(), count),
        "mv_tinker_target_logprob_mean": metric(targets.target.sum(), count),
        "mv_consensus_adv_abs_mean": metric(targets.consensus_advantage.abs().sum(), count),
        "mv_avsd_mean": metric(targets.agreement.sum(), count),
        "mv_gate_open_frac": metric(((targets.gate > 0.5) & valid).sum(), count),
        "mv_excluded_frac": metric(targets.num_excluded, loss_mask.sum()),
    }
    views = view_logprobs.detach().to(torch.float32)
    view_used = valid & torch.isfinite(views)  # [M, N]; an arithmetic-mode token may keep a -inf view
    view_sums = torch.where(view_used, views, 0.0).sum(dim=1)  # [M]
    for name, total, used in zip(names, view_sums, view_used.sum(dim=1)):
        metrics[f"mv_tinker_view_logprob_{name}"] = metric(total, used)
    return loss_sum, count.to(torch.int32), metrics


def policy_gradient_loss(
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sampled-token policy-gradient loss -sum_valid A_t ell_s(t) with given per-token advantages (GRPO).

    Args:
        student_logits: [N, V/tp] bf16/fp32 student logits shard, with grad.
        token_ids: [N] int sampled tokens.
        advantages: [N] finite float A_t (no grad; e.g. the completion's group-normalised advantage per token).
        loss_mask: [N] bool valid completion tokens.
        temperature, group, vocab_size, chunk_size: as in `avsd_sampled_token_loss`.
    Returns:
        loss_sum: [] fp32, differentiable w.r.t. student_logits.
        num_tokens: [] int32 valid tokens (loss_mask and finite ell_s).
        metrics: detached fp32 [2] (sum, num_tokens): pg_advantage_mean, pg_student_logprob_mean,
            pg_excluded_frac = (#masked-in tokens with ell_s = -inf, #masked-in tokens).
    Collectives:
        forward: one `all_gather_into_tensor` of [3, N] fp32 (`sampled_token_logprobs`); backward: none.
    Raises:
        ValueError/TypeError: shape mismatches, non-finite advantages, NaN/+inf logits, a token outside [0, V).
    """
    check_logits("student_logits", student_logits, ndim=2)
    num_tokens_total = student_logits.shape[0]
    if token_ids.shape != (num_tokens_total,):
        raise ValueError(f"token_ids must be [N={num_tokens_total}], got shape {tuple(token_ids.shape)}")
    if advantages.shape != (num_tokens_total,) or not advantages.is_floating_point():
        raise ValueError(
            f"advantages must be a float [N={num_tokens_total}] tensor, got {advantages.dtype} "
            f"{tuple(advantages.shape)}"
        )
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contain NaN or inf; rewards and their group statistics must be finite")
    check_mask("loss_mask", loss_mask, (num_tokens_total,))
    ell_s = sampled_token_logprobs(
        student_logits, token_ids, temperature=temperature, group=group, vocab_size=vocab_size, chunk_size=chunk_size
    )  # [N] fp32, with grad; the one collective
    valid = loss_mask & torch.isfinite(ell_s)
    advantage = torch.where(valid, advantages.detach().to(ell_s.dtype), 0.0)
    ell_valid = torch.where(valid, ell_s, 0.0)
    loss_sum = -(advantage * ell_valid).sum()
    count = valid.sum()
    metrics = {
        "pg_advantage_mean": metric(advantage.sum(), count),
        "pg_student_logprob_mean": metric(ell_valid.detach().sum(), count),
        "pg_excluded_frac": metric((loss_mask & ~valid).sum(), loss_mask.sum()),
    }
    return loss_sum, count.to(torch.int32), metrics
