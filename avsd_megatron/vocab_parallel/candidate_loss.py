"""Candidate-set AVSD loss on vocab-sharded logits (spec 2.3): generalized JSD between the student and the AVSD
target, both renormalised over the per-token candidate set K_t (views' top-k union plus the sampled token).

After the candidate logits are gathered (one all-reduce), every rank holds the same [.., N, Kc] tensors and runs
the same `avsd_megatron.signals.candidate` math, so the loss is replicated and the student's gradient only needs
to be scattered into the ids each shard owns: no backward collective.

Two entry points:
* `avsd_candidate_loss`: teacher and student logits together -- 2 collectives (top-k all-gather, one all-reduce
  gathering student and view candidate logits).
* `teacher_candidates` (frozen pre-pass, 2 collectives) then `avsd_candidate_loss_from_teacher` (training pass,
  1 collective): what a trainer that scores the teachers in a separate no-grad pass uses (spec 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from avsd_megatron.signals.candidate import (
    candidate_epistemic_terms,
    candidate_targets,
    generalized_jsd,
    masked_log_softmax,
)
from avsd_megatron.vocab_parallel.candidates import candidate_union, distributed_topk, gather_candidate_logits
from avsd_megatron.vocab_parallel.checks import check_logits, check_mask
from avsd_megatron.vocab_parallel.sampled_loss import metric

__all__ = ["CandidateSet", "teacher_candidates", "avsd_candidate_loss", "avsd_candidate_loss_from_teacher"]


@dataclass(frozen=True)
class CandidateSet:
    """The teachers' side of the candidate loss, replicated on every TP rank.

    Attributes:
        ids: [N, Kc] int64 candidate ids K_t (Kc = M * k + 1), filler y_t where mask is False.
        mask: [N, Kc] bool, the support.
        view_logprobs: [M, N, Kc] fp32 log p_m renormalised over K_t (-inf off the support).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    view_logprobs: torch.Tensor


def _check_views(view_logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    check_logits("view_logits", view_logits, ndim=3)
    if token_ids.shape != (view_logits.shape[1],):
        raise ValueError(f"token_ids must be [N={view_logits.shape[1]}], got shape {tuple(token_ids.shape)}")


def teacher_candidates(
    view_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    k: int,
    temperature: float,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
) -> CandidateSet:
    """Frozen teacher pre-pass: top-k per view, candidate union, view log-probs on the candidates (no grad).

    Args:
        view_logits: [M, N, V/tp] bf16/fp32 view-teacher logits shard.
        token_ids: [N] int sampled tokens.
        k: top-k per view (`multi_view_teacher_topk`, reference 64).
        temperature, group, vocab_size: as in `sampled_token_logprobs`.
    Returns:
        CandidateSet.
    Collectives:
        one `all_gather_into_tensor` of [2, M, N, k] fp64 (top-k) and one `all_reduce(SUM)` of [M, N, Kc] fp32
        over `group`.
    """
    _check_views(view_logits, token_ids)
    with torch.no_grad():
        top = distributed_topk(view_logits, k, temperature=temperature, group=group, vocab_size=vocab_size)
        ids, mask = candidate_union(top.ids, token_ids, vocab_size=vocab_size)
        (z_m,) = gather_candidate_logits(
            [view_logits], ids, temperature=temperature, group=group, vocab_size=vocab_size
        )
        log_p_m = masked_log_softmax(z_m, mask.expand_as(z_m))
    return CandidateSet(ids=ids, mask=mask, view_logprobs=log_p_m)


def avsd_candidate_loss(
    student_logits: torch.Tensor,
    token_ids: torch.Tensor,
    view_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    k: int,
    temperature: float,
    mode: str,
    gate: str,
    beta: float,
    token_clip: float,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    **target_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Candidate-set AVSD loss from student and view logits shards in one call (spec 2.3).

    Args:
        student_logits: [N, V/tp] bf16/fp32 student logits shard, with grad.
        token_ids: [N] int sampled tokens (appended to each candidate set).
        view_logits: [M, N, V/tp] view-teacher logits shard (no grad).
        loss_mask: [N] bool valid completion tokens.
        k, temperature, group, vocab_size: as in `teacher_candidates`.
        mode, gate, beta, token_clip, **target_kwargs: as in `avsd_candidate_loss_from_teacher`.
    Returns:
        (loss_sum, num_tokens, metrics) as `avsd_candidate_loss_from_teacher`.
    Collectives:
        forward: one `all_gather_into_tensor` of [2, M, N, k] fp64 (top-k of all views) and one `all_reduce(SUM)`
        of [(M + 1) * N * Kc] fp32 (student and view candidate logits together); backward: none.
    """
    _check_views(view_logits, token_ids)
    check_logits("student_logits", student_logits, ndim=2)
    with torch.no_grad():
        top = distributed_topk(view_logits, k, temperature=temperature, group=group, vocab_size=vocab_size)
        ids, mask = candidate_union(top.ids, token_ids, vocab_size=vocab_size)
    z_s, z_m = gather_candidate_logits(
        [student_logits, view_logits.detach()], ids, temperature=temperature, group=group, vocab_size=vocab_size
    )
    with torch.no_grad():
        log_p_m = masked_log_softmax(z_m, mask.expand_as(z_m))
    return _candidate_loss(
        z_s, CandidateSet(ids, mask, log_p_m), loss_mask, mode=mode, gate=gate, beta=beta, token_clip=token_clip,
        **target_kwargs,
    )


def avsd_candidate_loss_from_teacher(
    student_logits: torch.Tensor,
    candidates: CandidateSet,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    mode: str,
    gate: str,
    beta: float,
    token_clip: float,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
    **target_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Training-pass candidate loss given the teachers' `CandidateSet` (spec 2.3 steps 3-11).

    log p_s = log_softmax over K_t of z_s / tau; q_T from `signals.candidate.candidate_targets`; per-token
    generalized JSD_beta(p_s, q_T) over K_t, clamped from above at token_clip (> 0); summed over valid tokens.

    Args:
        student_logits: [N, V/tp] bf16/fp32 student logits shard, with grad.
        candidates: from `teacher_candidates` (same token order).
        loss_mask: [N] bool valid completion tokens.
        temperature, group, vocab_size: as in `sampled_token_logprobs`.
        mode: 'avsd' | 'consensus' | 'arithmetic' | 'single'.
        gate: 'avsd' | 'sigmoid' | 'consistency_exp'.
        beta: generalized-JSD beta in [0, 1] (0: KL(q_T||p_s), 1: KL(p_s||q_T); reference 0.5).
        token_clip: per-token clamp of the JSD from above (reference 0.05; 0 disables).
        **target_kwargs: passed to `candidate_targets` (gate_params, weight_mode, eta, q_a_floor, eps,
            detach_target -- default True; False reproduces the reference's gradient through the gate) plus
            epistemic_tau (float, default 0: adds sum_valid -tau_e (1 - lambda_t) H_t, spec 2.3 step 11) and
            detach_gate (bool, default False = the reference: gradient also flows through g in lambda_t; True holds
            g constant there) and view_names (M names for the per-view metrics; default view0, view1, ...).
    Returns:
        loss_sum: [] fp32 sum over valid tokens of the clipped JSD (+ epistemic term), differentiable.
        num_tokens: [] int32 valid tokens (loss_mask and a non-empty candidate set).
        metrics: name -> detached fp32 [2] (sum, count). Per token (count = num_tokens): mv_jsd_mean,
            mv_jsd_clipped_frac, mv_candidate_size_mean, mv_weight_entropy. Per (token, candidate) entry
            (count = valid entries): mv_gate_mean, mv_gate_open_frac, mv_jensen_gap_mean, mv_consensus_logprob_mean,
            mv_arithmetic_logprob_mean, mv_avsd_mean (C). At the sampled token y_t, per token, each renormalised over
            K_t: mv_tinker_student_logprob_mean (log p_s), mv_tinker_target_logprob_mean (log q_T),
            mv_tinker_advantage_mean (log q_T - log p_s) and mv_tinker_view_logprob_<name> (log p_m).
    Collectives:
        forward: one `all_reduce(SUM)` of [N, Kc] fp32 (student candidate logits); backward: none.
    """
    check_logits("student_logits", student_logits, ndim=2)
    (z_s,) = gather_candidate_logits(
        [student_logits], candidates.ids, temperature=temperature, group=group, vocab_size=vocab_size
    )
    return _candidate_loss(
        z_s, candidates, loss_mask, mode=mode, gate=gate, beta=beta, token_clip=token_clip, **target_kwargs
    )


def _candidate_loss(
    z_s: torch.Tensor,
    candidates: CandidateSet,
    loss_mask: torch.Tensor,
    *,
    mode: str,
    gate: str,
    beta: float,
    token_clip: float,
    epistemic_tau: float = 0.0,
    detach_gate: bool = False,
    view_names: tuple[str, ...] | None = None,
    **target_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Replicated candidate math on gathered student candidate logits z_s [N, Kc] (fp32, z / tau)."""
    num_views = candidates.view_logprobs.shape[0]
    names = tuple(view_names) if view_names is not None else tuple(f"view{m}" for m in range(num_views))
    if len(names) != num_views:
        raise ValueError(f"view_names has {len(names)} names {names} but the candidates hold M={num_views} views")
    mask = candidates.mask
    if candidates.view_logprobs.shape[1:] != z_s.shape or mask.shape != z_s.shape:
        raise ValueError(
            f"candidates (ids {tuple(candidates.ids.shape)}, view_logprobs {tuple(candidates.view_logprobs.shape)}) "
            f"do not match the student's [N, Kc] = {tuple(z_s.shape)}"
        )
    check_mask("loss_mask", loss_mask, (z_s.shape[0],))
    log_p_s = masked_log_softmax(z_s, mask)  # [N, Kc]
    targets = candidate_targets(log_p_s, candidates.view_logprobs, mask, mode=mode, gate=gate, **target_kwargs)
    jsd = generalized_jsd(log_p_s, targets.log_q_T, mask, beta=beta, token_clip=token_clip)  # [N]
    valid = loss_mask & targets.token_valid
    loss_sum = torch.where(valid, jsd, 0.0).sum()
    if epistemic_tau:
        epi = candidate_epistemic_terms(log_p_s, targets.gate, mask, tau_e=epistemic_tau, detach_gate=detach_gate)
        loss_sum = loss_sum + torch.where(valid, epi.loss, 0.0).sum()

    count = valid.sum()
    entries = targets.entry_valid & valid[:, None]
    num_entries = entries.sum()

    def entry_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(entries, x.detach(), 0.0).sum()

    def token_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.detach().to(torch.float32), 0.0).sum()

    clipped = (jsd.detach() >= token_clip) if token_clip > 0 else torch.zeros_like(valid)
    metrics = {
        "mv_jsd_mean": metric(token_sum(jsd), count),
        "mv_jsd_clipped_frac": metric(token_sum(clipped), count),
        "mv_candidate_size_mean": metric(token_sum(mask.sum(dim=1)), count),
        "mv_weight_entropy": metric(token_sum(targets.weight_entropy), count),
        "mv_gate_mean": metric(entry_sum(targets.gate), num_entries),
        "mv_gate_open_frac": metric(entry_sum((targets.gate > 0.5).float()), num_entries),
        "mv_jensen_gap_mean": metric(entry_sum(targets.jensen_gap), num_entries),
        "mv_consensus_logprob_mean": metric(entry_sum(targets.log_q_g), num_entries),
        "mv_arithmetic_logprob_mean": metric(entry_sum(targets.log_q_a), num_entries),
        "mv_avsd_mean": metric(entry_sum(targets.agreement), num_entries),
    }
    # The sampled token's entry of each distribution over K_t, the candidate loss's counterpart of the sampled loss's
    # metrics (same names; here every log-prob is renormalised over K_t, not the full vocabulary). y_t's slot: the
    # column of the support holding ids[:, -1], which is always y_t (appended last when K_t is full, else the filler).
    y_slot = mask & (candidates.ids == candidates.ids[:, -1:])  # [N, Kc], exactly one True per row

    def at_y(x: torch.Tensor) -> torch.Tensor:  # [..., N, Kc] -> [..., N]
        return torch.where(y_slot, x.detach().to(torch.float32), 0.0).sum(dim=-1)

    log_p_s_y, log_q_T_y = at_y(log_p_s), at_y(targets.log_q_T)
    metrics["mv_tinker_student_logprob_mean"] = metric(token_sum(log_p_s_y), count)
    metrics["mv_tinker_target_logprob_mean"] = metric(token_sum(log_q_T_y), count)
    metrics["mv_tinker_advantage_mean"] = metric(token_sum(log_q_T_y - log_p_s_y), count)
    for name, log_p_m_y in zip(names, at_y(candidates.view_logprobs)):
        metrics[f"mv_tinker_view_logprob_{name}"] = metric(token_sum(log_p_m_y), count)
    return loss_sum, count.to(torch.int32), metrics
