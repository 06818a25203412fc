"""AVSD math over a support of tokens per position: candidate-set targets, generalized JSD, epistemic terms.

Spec 2.3 (candidate-set loss) and the single-view JSD of 2.4. Symbols as in the table of `signals.py`; the extra
ones here are p_s / p_m (student / view distributions over the support), q_T (the final target, `log_q_T`), c_m
(agreement centrality), η (`eta`), β (`beta`), H_t (student entropy) and λ̄_t = Σ_v p_s(v) g(v) (`mean_gate`).

A *support* is the trailing axis: the Kc candidates of a position ([N, Kc], `support_mask` True where a candidate
exists), or the V/tp vocabulary entries a TP rank holds. Inputs are log-probs already normalised over the support
(`masked_log_softmax` turns candidate logits into them); -inf off the support. Functions that sum over the support
(`pairwise_jsd_half`, `generalized_jsd_elementwise`, `epistemic_partial_sums`) return per-shard partial sums, so
`vocab_parallel.py` can all-reduce them before the nonlinear step; `candidate_targets` composes everything with
the normalisers computed locally, which is exact when the whole support is on one rank.

Pure torch: no torch.distributed, no Megatron.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from avsd_megatron.signals.sampled import (
    DEFAULT_EPS,
    GATE_MODES,
    MODES,
    GateParams,
    agreement,
    arithmetic_logprobs,
    check_choice,
    check_eps,
    check_log_probs,
    check_mask,
    compute_dtype,
    geometric_logits,
    jensen_gap,
    select_gate,
    view_advantages,
    view_statistics,
)

WEIGHT_MODES = ("uniform", "agreement_centrality")
"""View weighting on the candidate path (spec 2.3 step 4, `--view_weight_mode`)."""


# ----------------------------------------------------------------------------------------------------------------
# Normalisation over a support


def support_log_normalizer(values: Tensor, support_mask: Tensor) -> Tensor:
    """log Z = logsumexp over the support of the trailing axis; -inf for a row with no finite supported entry.

    This is the local piece of a normaliser: on a TP-sharded vocabulary the shards' values are combined with a
    collective (MAX + SUM, or an all-gather of (max, sumexp)).

    Args:
        values: [..., K] fp32/fp64 logits or unnormalised log-probs (-inf allowed).
        support_mask: [..., K] bool.
    Returns:
        [...], same dtype.
    """
    use = support_mask & torch.isfinite(values)
    filled = torch.where(use, values, torch.finfo(values.dtype).min)  # finite fill: no NaN grads in empty rows
    log_z = torch.logsumexp(filled, dim=-1)
    return torch.where(use.any(dim=-1), log_z, -math.inf)


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    use = mask & torch.isfinite(logits)
    filled = torch.where(use, logits, torch.finfo(logits.dtype).min)
    return torch.where(use, filled - torch.logsumexp(filled, dim=-1, keepdim=True), -math.inf)


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """log_softmax over the entries of the trailing axis where mask is True (spec 2.3 step 3).

    Args:
        logits: [..., K] float (already divided by τ). -inf entries are treated as off the support.
        mask: [..., K] bool.
    Returns:
        [..., K] fp32 (fp64 for fp64 input): normalised log-probs on the support, -inf elsewhere; a row with no
        support is all -inf. Gradients are finite everywhere.
    Raises:
        ValueError: NaN or +inf in logits, mask of another shape. TypeError: non-bool mask.
    """
    check_log_probs("logits", logits)
    check_mask("mask", mask, logits.shape)
    return _masked_log_softmax(logits.to(compute_dtype(logits)), mask)


# ----------------------------------------------------------------------------------------------------------------
# View weights (spec 2.3 step 4)


def view_pair_indices(num_views: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The P = M(M−1)/2 unordered view pairs (i < j), in torch.triu_indices order: two [P] int64 tensors."""
    pairs = torch.triu_indices(num_views, num_views, offset=1, device=device)
    return pairs[0], pairs[1]


def pairwise_jsd_half(view_logprobs: Tensor, support_mask: Tensor) -> Tensor:
    """JSD½(p_i, p_j) = ½ KL(p_i‖m) + ½ KL(p_j‖m), m = ½(p_i + p_j), summed over the support, for every pair i < j.

    The sum runs over the local support only: on a sharded vocabulary all-reduce (SUM) the result across shards.
    JSD½ ∈ [0, log 2] for normalised views.

    Args:
        view_logprobs: [M, N, K] fp32/fp64 view log-probs, normalised over the support, -inf off it.
        support_mask: [N, K] bool.
    Returns:
        [N, P] (P = M(M−1)/2, pairs ordered as `view_pair_indices`), same dtype; [N, 0] when M = 1.
    """
    i, j = view_pair_indices(view_logprobs.shape[0], view_logprobs.device)
    log_p, log_q = view_logprobs[i], view_logprobs[j]  # [P, N, K]
    use = support_mask & (torch.isfinite(log_p) | torch.isfinite(log_q))
    log_p = torch.where(use, log_p, 0.0)  # off-support: finite dummies, zeroed below
    log_q = torch.where(use, log_q, 0.0)
    log_mix = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return torch.where(use, 0.5 * (_kl_entry(log_p, log_mix) + _kl_entry(log_q, log_mix)), 0.0).sum(dim=-1).mT


def _kl_entry(log_p: Tensor, log_m: Tensor) -> Tensor:
    """p·(log p − log m) with the 0·log 0 = 0 convention where log p = -inf; log m finite. NaN-free gradients."""
    finite = torch.isfinite(log_p)
    log_p = torch.where(finite, log_p, 0.0)
    return torch.where(finite, log_p.exp() * (log_p - log_m), 0.0)


def agreement_centrality_weights(
    pair_jsd: Tensor, num_views: int, *, eta: float = 5.0, eps: float = DEFAULT_EPS
) -> Tensor:
    """w = softmax(−η·c), c_m = (1/(M−1)) Σ_{m'≠m} JSD½(p_m, p_m') (spec 2.3 step 4); M = 1 → w = 1.

    Renormalised by max(Σ w, eps) as in the reference (a no-op up to round-off).

    Args:
        pair_jsd: [N, P] fp32/fp64 full-support JSD½ per pair (`pairwise_jsd_half`, all-reduced if sharded).
        num_views: M.
        eta: η ≥ 0 (`view_agreement_eta`); larger η favours the central view.
    Returns:
        [N, M], rows sum to 1.
    """
    n = pair_jsd.shape[0]
    if num_views == 1:
        return torch.ones(n, 1, dtype=pair_jsd.dtype, device=pair_jsd.device)
    i, j = view_pair_indices(num_views, pair_jsd.device)
    total = torch.zeros(n, num_views, dtype=pair_jsd.dtype, device=pair_jsd.device)
    total = total.index_add(1, i, pair_jsd).index_add(1, j, pair_jsd)  # Σ over partners of each view
    weights = torch.softmax(-eta * total / (num_views - 1), dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(eps)


def weight_entropy(weights: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """H(w) = −Σ_m w_m log max(w_m, eps) over the trailing view axis (logged; log M for uniform weights)."""
    return -(weights * weights.clamp_min(eps).log()).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Candidate-set targets (spec 2.3 steps 4-9)


@dataclass(frozen=True)
class CandidateTargets:
    """Candidate-path AVSD signals. [N, Kc] fields are in the compute dtype (fp32, or fp64 for fp64 inputs)."""

    log_q_T: Tensor
    """[N, Kc] final target log_softmax_support(pre-target), -inf off the support; rows with support sum to 1.
    Detached unless detach_target=False."""
    gate: Tensor
    """[N, Kc] per-candidate g ∈ [0, 1]; 0 where `entry_valid` is False. Not detached."""
    jensen_gap: Tensor
    """[N, Kc] J = max(0, log q_A − log q_G) ≥ 0; 0 off the support and where some view is -inf."""
    log_q_g: Tensor
    """[N, Kc] normalised geometric target log_softmax_support(Σ_m w_m ℓ_m); -inf off the support and where
    some view is -inf."""
    log_q_a: Tensor
    """[N, Kc] normalised arithmetic target, floored at log(q_a_floor) on the support; -inf off it."""
    consensus_advantage: Tensor
    """[N, Kc] δ̄ = Σ_m w_m (ℓ_m − ℓ_s); 0 where `entry_valid` is False."""
    agreement: Tensor
    """[N, Kc] C = |δ̄| / (|δ|‾ + eps); 0 where `entry_valid` is False."""
    variance: Tensor
    """[N, Kc] V; 0 where `entry_valid` is False."""
    sign_agreement: Tensor
    """[N, Kc] S; 0 where `entry_valid` is False."""
    view_weights: Tensor
    """[N, M] w per token (rows sum to 1)."""
    weight_entropy: Tensor
    """[N] H(w)."""
    entry_valid: Tensor
    """[N, Kc] bool: on the support and ℓ_s and every ℓ_m finite there (where the gate statistics exist)."""
    token_valid: Tensor
    """[N] bool: the position has at least one candidate."""


def _check_candidate_inputs(
    student_logprobs: Tensor, view_logprobs: Tensor, support_mask: Tensor, mode: str, gate: str, weight_mode: str
) -> None:
    check_choice("mode", mode, MODES)
    check_choice("gate", gate, GATE_MODES)
    check_choice("weight_mode", weight_mode, WEIGHT_MODES)
    check_log_probs("student_logprobs", student_logprobs)
    check_log_probs("view_logprobs", view_logprobs)
    if student_logprobs.ndim != 2:
        raise ValueError(f"student_logprobs must be [N, Kc], got shape {tuple(student_logprobs.shape)}")
    if view_logprobs.ndim != 3 or view_logprobs.shape[1:] != student_logprobs.shape:
        raise ValueError(
            f"view_logprobs has shape {tuple(view_logprobs.shape)}; expected [M, N, Kc] = "
            f"[M, {', '.join(map(str, student_logprobs.shape))}]"
        )
    check_mask("support_mask", support_mask, student_logprobs.shape)
    num_views = view_logprobs.shape[0]
    if num_views == 0:
        raise ValueError(f"view_logprobs has M=0 views (shape {tuple(view_logprobs.shape)}); need M >= 1")
    if mode == "single" and num_views != 1:
        raise ValueError(f"mode='single' needs exactly one view, got M={num_views}")
    if weight_mode == "agreement_centrality" and mode == "arithmetic":
        raise ValueError("weight_mode='agreement_centrality' is not used with mode='arithmetic' (the reference forces "
                         "uniform weights there); pass weight_mode='uniform'")
    if weight_mode == "agreement_centrality" and gate == "avsd" and num_views > 1:
        raise ValueError("gate='avsd' requires weight_mode='uniform' (spec 2.3 step 8); use gate='sigmoid' or "
                         "'consistency_exp' with weight_mode='agreement_centrality'")


def _candidate_view_weights(ell_m: Tensor, support: Tensor, weight_mode: str, eta: float, eps: float) -> Tensor:
    num_views, n = ell_m.shape[0], ell_m.shape[1]
    if weight_mode == "uniform":
        return torch.full((n, num_views), 1.0 / num_views, dtype=ell_m.dtype, device=ell_m.device)
    return agreement_centrality_weights(pairwise_jsd_half(ell_m, support), num_views, eta=eta, eps=eps)


def _normalised_arithmetic(ell_m: Tensor, weights: Tensor, support: Tensor, q_a_floor: float) -> Tensor:
    """log q_A renormalised over the support and floored at log(q_a_floor) there, as the reference does."""
    any_view = support & torch.isfinite(ell_m).any(dim=0)
    log_q_a = arithmetic_logprobs(torch.where(any_view, ell_m, 0.0), weights)  # NaN-free where no view is finite
    log_q_a = torch.where(any_view, log_q_a, -math.inf)
    log_q_a = log_q_a - support_log_normalizer(log_q_a, support).clamp_min(math.log(DEFAULT_EPS)).unsqueeze(-1)
    floor = math.log(q_a_floor) if q_a_floor > 0 else -math.inf
    return torch.where(support, log_q_a.clamp_min(floor), -math.inf)


def candidate_targets(
    student_logprobs: Tensor,
    view_logprobs: Tensor,
    support_mask: Tensor,
    *,
    mode: str = "avsd",
    gate: str = "avsd",
    gate_params: GateParams | None = None,
    weight_mode: str = "uniform",
    eta: float = 5.0,
    q_a_floor: float = 1e-8,
    eps: float = DEFAULT_EPS,
    detach_target: bool = True,
) -> CandidateTargets:
    """Candidate-set AVSD target q_T per position (spec 2.3 steps 4-9), everything local to the support.

    w per token (uniform | agreement_centrality); log q_G = log_softmax_K(Σ_m w_m ℓ_m); log q_A = log Σ_m w_m p_m
    renormalised over K and floored at log(q_a_floor); J = max(0, log q_A − log q_G); per-candidate w-weighted
    δ̄, |δ|‾, V, S and gate g (0 off the support); pre-target log q_G + g·J (avsd) | log q_G (consensus, single)
    | log q_A (arithmetic); log q_T = log_softmax_K(pre-target).

    Args:
        student_logprobs: [N, Kc] float log p_s, normalised over the support, -inf off it; with grad.
        view_logprobs: [M, N, Kc] float log p_m, normalised over the support; M ≥ 1.
        support_mask: [N, Kc] bool, True for real candidates.
        mode: one of MODES ('single' needs M = 1; its target is the view).
        gate: one of GATE_MODES; 'avsd' requires weight_mode='uniform'.
        gate_params: None = GateParams() defaults.
        weight_mode: one of WEIGHT_MODES; 'agreement_centrality' is not allowed with mode='arithmetic'.
        eta: η for agreement_centrality.
        q_a_floor: lower clamp of q_A on the support (reference 1e-8; 0 disables).
        eps: C and g denominators, weight clamps; > 0.
        detach_target: True (default) detaches log_q_T. False reproduces the reference, where gradient flows
            into the student through g (which depends on p_s) (spec 6 item 4).
    Returns:
        CandidateTargets.
    Raises:
        ValueError: unknown mode/gate/weight_mode, bad shapes, M = 0, NaN/+inf inputs, forbidden combinations,
            eps ≤ 0, eta < 0, q_a_floor outside [0, 1). TypeError: non-floating inputs, non-bool mask.
    """
    _check_candidate_inputs(student_logprobs, view_logprobs, support_mask, mode, gate, weight_mode)
    check_eps(eps)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta={eta!r} must be finite and >= 0")
    if not (0.0 <= q_a_floor < 1.0):
        raise ValueError(f"q_a_floor={q_a_floor!r} must be in [0, 1)")
    params = GateParams() if gate_params is None else gate_params
    dtype = compute_dtype(student_logprobs, view_logprobs)
    ell_s, ell_m = student_logprobs.to(dtype), view_logprobs.to(dtype)  # the one upcast
    support = support_mask

    views_finite = support & torch.isfinite(ell_m).all(dim=0)  # [N, Kc]
    entry_valid = views_finite & torch.isfinite(ell_s)
    weights = _candidate_view_weights(ell_m, support, weight_mode, eta, eps)  # [N, M]

    ell_m0 = torch.where(views_finite, ell_m, 0.0)  # finite dummies where unused: NaN-free grads
    ell_s0 = torch.where(entry_valid, ell_s, 0.0)
    log_q_g = _masked_log_softmax(geometric_logits(ell_m0, weights), views_finite)
    log_q_a = _normalised_arithmetic(ell_m, weights, support, q_a_floor)
    gap = jensen_gap(torch.where(views_finite, log_q_a, 0.0), torch.where(views_finite, log_q_g, 0.0))  # 0 unused

    stats = view_statistics(view_advantages(ell_m0, ell_s0), weights)
    g = torch.where(entry_valid, select_gate(gate)(stats, gap, params, eps), 0.0)
    if mode == "avsd":
        pre_target = log_q_g + g * gap
    elif mode == "arithmetic":
        pre_target = log_q_a
    else:  # consensus, single (M = 1: q_G is the view)
        pre_target = log_q_g
    log_q_t = _masked_log_softmax(pre_target, support)

    def keep(x: Tensor) -> Tensor:
        return torch.where(entry_valid, x, 0.0)

    return CandidateTargets(
        log_q_T=log_q_t.detach() if detach_target else log_q_t,
        gate=g,
        jensen_gap=gap,
        log_q_g=log_q_g,
        log_q_a=log_q_a,
        consensus_advantage=keep(stats.delta_mean),
        agreement=keep(agreement(stats.delta_mean, stats.delta_abs_mean, eps)),
        variance=keep(stats.variance),
        sign_agreement=keep(stats.sign_agreement),
        view_weights=weights,
        weight_entropy=weight_entropy(weights, eps),
        entry_valid=entry_valid,
        token_valid=support.any(dim=-1),
    )


# ----------------------------------------------------------------------------------------------------------------
# Generalized JSD loss (spec 2.3 step 10, 2.4)


def _check_pair(student_logprobs: Tensor, target_logprobs: Tensor, support_mask: Tensor) -> None:
    check_log_probs("student_logprobs", student_logprobs)
    check_log_probs("target_logprobs", target_logprobs)
    if target_logprobs.shape != student_logprobs.shape or student_logprobs.ndim < 1:
        raise ValueError(
            f"target_logprobs has shape {tuple(target_logprobs.shape)}, expected the shape of student_logprobs "
            f"{tuple(student_logprobs.shape)} ([N, K])"
        )
    check_mask("support_mask", support_mask, student_logprobs.shape)


def generalized_jsd_elementwise(
    student_logprobs: Tensor, target_logprobs: Tensor, support_mask: Tensor, *, beta: float = 0.5
) -> Tensor:
    """Per-entry terms of the generalized JSD; their sum over the support is `generalized_jsd` (before the clip).

    β = 0: q_T(v)·(log q_T − log p_s); β = 1: p_s(v)·(log p_s − log q_T); otherwise with
    log m = logaddexp(log(1−β) + log p_s, log β + log q_T): β·q_T(log q_T − log m) + (1−β)·p_s(log p_s − log m).
    Entries off the support or not finite in both inputs are 0. Individual entries may be negative; the sum is ≥ 0.
    No input validation (see generalized_jsd); on a sharded vocabulary, sum locally and all-reduce.

    Args:
        student_logprobs, target_logprobs: [..., K] fp32/fp64 (same dtype).
        support_mask: [..., K] bool.
    Returns:
        [..., K].
    """
    use = support_mask & torch.isfinite(student_logprobs) & torch.isfinite(target_logprobs)
    log_p = torch.where(use, student_logprobs, 0.0)
    log_q = torch.where(use, target_logprobs, 0.0)
    if beta == 0.0:
        terms = log_q.exp() * (log_q - log_p)
    elif beta == 1.0:
        terms = log_p.exp() * (log_p - log_q)
    else:
        log_mix = torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))
        terms = beta * log_q.exp() * (log_q - log_mix) + (1.0 - beta) * log_p.exp() * (log_p - log_mix)
    return torch.where(use, terms, 0.0)


def generalized_jsd(
    student_logprobs: Tensor,
    target_logprobs: Tensor,
    support_mask: Tensor,
    *,
    beta: float = 0.5,
    token_clip: float = 0.0,
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token (spec 2.3 step 10; TRL GKD convention).

    β is the weight of the TARGET in the mixture m = (1−β)·p_s + β·q_T, and
        JSD_β = β·KL(q_T‖m) + (1−β)·KL(p_s‖m)              for 0 < β < 1,
        β = 0 → KL(q_T‖p_s)   (forward KL, target first: mode-covering, like SFT on q_T),
        β = 1 → KL(p_s‖q_T)   (reverse KL, student first: mode-seeking).
    The endpoints are defined separately, not as limits (JSD_β → 0 as β → 0 or 1). β = 0.5 is the symmetric JSD.

    Args:
        student_logprobs: [N, K] float log p_s, normalised over the support, -inf off it; with grad.
        target_logprobs: [N, K] float log q_T, normalised over the support (e.g. CandidateTargets.log_q_T).
        support_mask: [N, K] bool. Only entries on the support and finite in both inputs are summed.
        beta: β ∈ [0, 1] (`--beta`, default 0.5).
        token_clip: if > 0, each token's value is clamped from above to token_clip (hard clamp: a clipped token
            gets zero gradient; the reference default is 0.05); 0 disables.
    Returns:
        [N] in the compute dtype, ≥ 0 up to round-off; 0 for a row with no usable entry.
    Raises:
        ValueError: shape mismatch, NaN/+inf inputs, β ∉ [0, 1], token_clip < 0. TypeError: non-bool mask.
    """
    _check_pair(student_logprobs, target_logprobs, support_mask)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1] (0: KL(target||student), 1: KL(student||target))")
    if not (math.isfinite(token_clip) and token_clip >= 0):
        raise ValueError(f"token_clip={token_clip!r} must be finite and >= 0 (0 disables)")
    dtype = compute_dtype(student_logprobs, target_logprobs)
    per_token = generalized_jsd_elementwise(
        student_logprobs.to(dtype), target_logprobs.to(dtype), support_mask, beta=beta
    ).sum(dim=-1)
    return per_token.clamp_max(token_clip) if token_clip > 0 else per_token


# ----------------------------------------------------------------------------------------------------------------
# Candidate-path epistemic term (spec 2.3 step 11)


@dataclass(frozen=True)
class EpistemicTerms:
    """Per-token epistemic-preservation pieces, [N] each, 0 for positions without support."""

    entropy: Tensor
    """H_t = −Σ_v p_s(v) log p_s(v) over the support."""
    mean_gate: Tensor
    """λ̄_t = Σ_v p_s(v) g(v)."""
    loss: Tensor
    """L_epi,t = −τ_e·(1 − λ̄_t)·H_t; the caller sums and divides by its valid-token normaliser."""


def epistemic_partial_sums(
    student_logprobs: Tensor, gate: Tensor, support_mask: Tensor, *, detach_gate: bool = True
) -> tuple[Tensor, Tensor]:
    """(H_t, λ̄_t) summed over the local support; all-reduce both (SUM) across vocab shards before the loss.

    Args:
        student_logprobs: [..., K] fp32/fp64 log p_s; gate: [..., K] g; support_mask: [..., K] bool.
        detach_gate: True (default) stops the gradient through g; False reproduces the reference.
    Returns:
        entropy [...], mean_gate [...]; entries off the support or with -inf log p_s contribute 0.
    """
    use = support_mask & torch.isfinite(student_logprobs)
    log_p = torch.where(use, student_logprobs, 0.0)
    p = torch.where(use, log_p.exp(), 0.0)
    g = gate.detach() if detach_gate else gate
    return -(p * log_p).sum(dim=-1), (p * g.to(p.dtype)).sum(dim=-1)


def epistemic_loss_from_sums(entropy: Tensor, mean_gate: Tensor, tau_e: float = 0.01) -> Tensor:
    """L_epi,t = −τ_e·(1 − λ̄_t)·H_t per token (spec 2.3 step 11)."""
    return -tau_e * (1.0 - mean_gate) * entropy


def candidate_epistemic_terms(
    student_logprobs: Tensor,
    gate: Tensor,
    support_mask: Tensor,
    *,
    tau_e: float = 0.01,
    detach_gate: bool = True,
) -> EpistemicTerms:
    """H_t, λ̄_t and L_epi,t = −τ_e(1 − λ̄_t)H_t on the candidate set (spec 2.3 step 11).

    Args:
        student_logprobs: [N, Kc] float log p_s, normalised over the support; with grad.
        gate: [N, Kc] float g (e.g. CandidateTargets.gate).
        support_mask: [N, Kc] bool.
        tau_e: τ_e ≥ 0 (`epistemic_tau`).
        detach_gate: True (default) stops the gradient through g; False reproduces the reference (spec 6.4).
    Returns:
        EpistemicTerms with [N] fields in the compute dtype.
    """
    check_log_probs("student_logprobs", student_logprobs)
    if gate.shape != student_logprobs.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)}, expected {tuple(student_logprobs.shape)}")
    check_mask("support_mask", support_mask, student_logprobs.shape)
    if not (math.isfinite(tau_e) and tau_e >= 0):
        raise ValueError(f"tau_e={tau_e!r} must be finite and >= 0")
    dtype = compute_dtype(student_logprobs, gate)
    entropy, mean_gate = epistemic_partial_sums(
        student_logprobs.to(dtype), gate.to(dtype), support_mask, detach_gate=detach_gate
    )
    loss = epistemic_loss_from_sums(entropy, mean_gate, tau_e)
    return EpistemicTerms(entropy=entropy, mean_gate=mean_gate, loss=loss)
