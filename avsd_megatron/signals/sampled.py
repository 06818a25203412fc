"""AVSD per-token target math: the elementwise steps every path shares, and the sampled-token targets (spec 2.2).

Pure torch: no torch.distributed, no Megatron. Every function here is elementwise over the trailing axes, so the
same code serves the sampled-token path (one scalar per token), the candidate path (`candidate.py`, a
support of Kc tokens per position) and the full-vocab, TP-sharded path (`vocab_parallel.py`, V/tp entries per
rank). Where a step needs a normaliser over the support (a logsumexp) the caller supplies it; nothing here
reduces over the vocabulary.

Symbols (spec notation -> name in code -> where defined). The paper and the reference code use the same letters
except where noted.

    ==========  =======================  ==========================================================================
    symbol      variable                 spec
    ==========  =======================  ==========================================================================
    ℓ_s         ell_s, student_logprobs  2.2 step 1; student log-prob of the sampled token y_t (grad flows here)
    ℓ_m         ell_m, view_logprobs     2.2 step 1; view-m teacher log-prob, views first: [M, N]
    w_m         weights, view_weights    2.3 step 4; per-view weights, uniform 1/M in 2.2
    q_G         log_q_g                  2.2 step 2 (unnormalised Σ_m w_m ℓ_m), 2.3 step 5 (normalised)
    q_A         log_q_a                  2.2 step 3, 2.3 step 6; logsumexp_m(log w_m + ℓ_m)
    J           jensen_gap               2.2 step 4, 2.3 step 7; max(0, log q_A − log q_G)
    δ_m         delta                    2.2 step 5; ℓ_m − ℓ_s ("per-view advantage")
    δ̄           delta_mean,              2.2 step 5; Σ_m w_m δ_m = log q_G − ℓ_s (the consensus advantage)
                consensus_advantage
    |δ|‾        delta_abs_mean           2.2 step 5; Σ_m w_m |δ_m|
    V           variance                 2.2 step 5; Σ_m w_m (δ_m − δ̄)²
    S           sign_agreement           2.2 step 5; |Σ_m w_m sign(δ_m)|
    C           agreement                2.2 step 6; |δ̄| / (|δ|‾ + eps) ∈ [0, 1]
    g (λ)       gate                     2.2 step 6; the reference code calls it λ in the epistemic term
    R = g·J     gated Jensen residual    2.2 step 7; added to log q_G in the avsd target
    T           target                   2.2 step 7; log q_G + g·J (avsd) | log q_G | log q_A | ℓ_1 (single)
    A           advantage                2.2 step 8; T − ℓ_s (the caller detaches it)
    τ           tau (not used here)      2.1; sampling temperature, applied to logits before any log-softmax
    τ_e         tau_e                    2.2 step 10; epistemic-preservation weight
    ==========  =======================  ==========================================================================

Numerics: inputs are upcast once at entry to fp32, or kept in fp64 if any input is fp64. eps = 1e-8 as in the
reference (spec 2.5). -inf log-probs are legal (impossible tokens); NaN and +inf are errors.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MODES = ("avsd", "consensus", "arithmetic", "single")
"""Target modes (spec 2.2 step 7, `--multi_view_mode`)."""
GATE_MODES = ("avsd", "sigmoid", "consistency_exp")
"""Gate formulas (spec 2.2 step 6, `--avsd_gate_mode`)."""
DEFAULT_EPS = 1e-8
"""eps in C and g denominators (spec 2.5)."""
_WEIGHT_SUM_ATOL = 1e-5  # fp32 weights that sum to 1 up to rounding are accepted as normalised


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers (shared with candidate.py)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError `name='value' is not one of (...)` unless value is in choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_log_probs(name: str, x: Tensor) -> None:
    """Check a log-prob tensor: floating dtype, no NaN, no +inf (-inf is legal). One host sync.

    Raises:
        TypeError: x is not a floating tensor.
        ValueError: `name contains NaN at index (...)` / `... +inf at index (...)`, first offending index.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    bad = torch.isnan(x) | torch.isposinf(x)
    if bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        what = "NaN" if bool(torch.isnan(x[index])) else "+inf"
        raise ValueError(
            f"{name} contains {what} at index {index} (shape {tuple(x.shape)}); log-probs must be finite or -inf "
            f"(use -inf for impossible tokens and a mask for padding)"
        )


def check_mask(name: str, mask: Tensor, shape: torch.Size) -> None:
    """Raise TypeError unless mask is a bool tensor, ValueError unless its shape equals `shape`."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def check_eps(eps: float) -> None:
    """Raise ValueError unless eps is a finite positive float."""
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r} must be finite and > 0")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the one upcast done at each kernel's entry (style 3.6)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_view_weights(view_weights: Tensor, num_views: int) -> None:
    """Check per-view weights: [M], finite, strictly positive, summing to 1 (within 1e-5). One host sync.

    Raises:
        ValueError naming `view_weights` and the offending shape or values.
    """
    if not isinstance(view_weights, Tensor) or not view_weights.is_floating_point():
        raise TypeError(f"view_weights must be a floating-point tensor, got {type(view_weights)}")
    if view_weights.shape != (num_views,):
        raise ValueError(f"view_weights has shape {tuple(view_weights.shape)}, expected [M] = ({num_views},)")
    w = view_weights.double()
    if not bool(torch.isfinite(w).all() & (w > 0).all()):
        raise ValueError(f"view_weights must be finite and > 0, got {view_weights.tolist()}")
    if abs(float(w.sum()) - 1.0) > _WEIGHT_SUM_ATOL:
        raise ValueError(f"view_weights must sum to 1, got {view_weights.tolist()} (sum {float(w.sum())})")


def weights_are_uniform(weights: Tensor) -> bool:
    """True if every weight equals 1/M (within 1e-6) along the trailing view axis. One host sync."""
    num_views = weights.shape[-1]
    return bool(torch.all((weights.double() - 1.0 / num_views).abs() <= 1e-6))


# ----------------------------------------------------------------------------------------------------------------
# Elementwise equation steps. view_logprobs is [M, *S]; weights are [M] or [*S[:-1], M] (per-position weights
# that are shared along the trailing support axis, e.g. [N, M] for view_logprobs [M, N, Kc]); None = uniform.


def _weights_for_views(weights: Tensor | None, view_logprobs: Tensor) -> Tensor:
    """Return w shaped [M, 1, ..., 1] or [M, *S[:-1], 1] so that it broadcasts against view_logprobs [M, *S]."""
    num_views = view_logprobs.shape[0]
    if weights is None:
        weights = torch.full((num_views,), 1.0 / num_views, dtype=view_logprobs.dtype, device=view_logprobs.device)
    weights = weights.to(view_logprobs.dtype)
    if weights.ndim == 1 and weights.shape[0] == num_views:
        return weights.reshape((num_views,) + (1,) * (view_logprobs.ndim - 1))
    expected = tuple(view_logprobs.shape[1:-1]) + (num_views,)
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}; expected [M] = ({num_views},) or {list(expected)} "
            f"for view_logprobs of shape {tuple(view_logprobs.shape)}"
        )
    return weights.movedim(-1, 0).unsqueeze(-1)  # [M, *S[:-1], 1]


def geometric_logits(view_logprobs: Tensor, weights: Tensor | None = None) -> Tensor:
    """G = Σ_m w_m ℓ_m, the unnormalised log geometric mean (spec 2.2 step 2; 2.3 step 5 before log-softmax).

    In the sampled-token path this *is* log q_G (the reference never renormalises it). On a support, log q_G =
    G − logsumexp_support(G); the normaliser is the caller's (a TP collective on the full vocabulary).

    Args:
        view_logprobs: [M, *S] fp32/fp64 view log-probs ℓ_m.
        weights: [M] or [*S[:-1], M] view weights w_m (normalised, positive); None = uniform 1/M.
    Returns:
        [*S], same dtype; -inf wherever some view is -inf.
    """
    return (_weights_for_views(weights, view_logprobs) * view_logprobs).sum(dim=0)


def arithmetic_logprobs(view_logprobs: Tensor, weights: Tensor | None = None) -> Tensor:
    """log q_A = logsumexp_m(log w_m + ℓ_m) (spec 2.2 step 3; 2.3 step 6). Normalised wherever each view is.

    Args:
        view_logprobs: [M, *S] fp32/fp64 view log-probs ℓ_m.
        weights: [M] or [*S[:-1], M] view weights; None = uniform (then log q_A = logsumexp_m ℓ_m − log M).
    Returns:
        [*S], same dtype; -inf only where every view is -inf.
    """
    return torch.logsumexp(_weights_for_views(weights, view_logprobs).log() + view_logprobs, dim=0)


def jensen_gap(log_q_a: Tensor, log_q_g: Tensor) -> Tensor:
    """J = max(0, log q_A − log q_G) elementwise (spec 2.2 step 4, 2.3 step 7). J ≥ 0.

    With the unnormalised q_G, J ≥ 0 already by AM–GM and the clamp only absorbs round-off; after normalising q_G
    over a support the difference can be negative and the clamp matters.

    Args:
        log_q_a, log_q_g: [*S] fp32/fp64, broadcastable; both finite where J is used.
    Returns:
        [*S], same dtype, ≥ 0.
    """
    return (log_q_a - log_q_g).clamp_min(0.0)


def view_advantages(view_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """δ_m = ℓ_m − ℓ_s elementwise (spec 2.2 step 5, 2.3 step 8).

    Args:
        view_logprobs: [M, *S] fp32/fp64.
        student_logprobs: [*S] fp32/fp64.
    Returns:
        delta: [M, *S].
    """
    return view_logprobs - student_logprobs.unsqueeze(0)


@dataclass(frozen=True)
class ViewStatistics:
    """w-weighted statistics of the per-view advantages δ_m over the view axis (spec 2.2 step 5). All [*S]."""

    delta_mean: Tensor
    """δ̄ = Σ_m w_m δ_m, the consensus advantage (= log q_G − ℓ_s with unnormalised q_G)."""
    delta_abs_mean: Tensor
    """|δ|‾ = Σ_m w_m |δ_m| ≥ |δ̄|."""
    variance: Tensor
    """V = Σ_m w_m (δ_m − δ̄)² ≥ 0."""
    sign_agreement: Tensor
    """S = |Σ_m w_m sign(δ_m)| ∈ [0, 1], sign(0) = 0."""


def view_statistics(delta: Tensor, weights: Tensor | None = None) -> ViewStatistics:
    """δ̄, |δ|‾, V, S over the view axis (spec 2.2 step 5; w-weighted per candidate in 2.3 step 8).

    Args:
        delta: [M, *S] fp32/fp64 per-view advantages δ_m (finite; zero them where masked).
        weights: [M] or [*S[:-1], M]; None = uniform 1/M.
    Returns:
        ViewStatistics with [*S] fields.
    """
    w = _weights_for_views(weights, delta)
    delta_mean = (w * delta).sum(dim=0)
    return ViewStatistics(
        delta_mean=delta_mean,
        delta_abs_mean=(w * delta.abs()).sum(dim=0),
        variance=(w * (delta - delta_mean.unsqueeze(0)).square()).sum(dim=0),
        sign_agreement=(w * delta.sign()).sum(dim=0).abs(),
    )


def agreement(delta_mean: Tensor, delta_abs_mean: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """C = |δ̄| / (|δ|‾ + eps), cross-view sign agreement (spec 2.2 step 6). C ∈ [0, 1]; C = 0 when δ̄ = 0."""
    return delta_mean.abs() / (delta_abs_mean + eps)


# ----------------------------------------------------------------------------------------------------------------
# Gates (spec 2.2 step 6). Every gate has the signature (stats, jensen_gap, params, eps) -> [*S] in [0, 1].


@dataclass(frozen=True)
class GateParams:
    """Constants of the sigmoid and consistency_exp gates (spec 2.2 step 6, 2.5). The avsd gate has none."""

    alpha: float = 6.0
    """α: slope on the sign agreement S in the sigmoid gate (`avsd_gate_alpha`)."""
    sign_threshold: float = 0.8
    """s₀: sign agreement at which the sigmoid gate is ½ before penalties (`avsd_sign_threshold`)."""
    var_coef: float = 1.0
    """γ_V ≥ 0: penalty on the advantage variance V in the sigmoid gate (`avsd_gate_var_coef`)."""
    gap_coef: float = 1.0
    """γ_J ≥ 0: penalty on the Jensen gap J in the sigmoid gate (`avsd_gate_gap_coef`)."""
    consistency_var_coef: float = 1.0
    """γ ≥ 0: variance penalty of the consistency_exp gate (`avsd_consistency_exp_var_coef`)."""
    consistency_variance: bool = True
    """consistency_exp gate: True → g = C·exp(−γV) (`variance_mode=on`); False → g = C (`off`)."""

    def __post_init__(self) -> None:
        for name in ("alpha", "sign_threshold", "var_coef", "gap_coef", "consistency_var_coef"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"GateParams.{name}={value!r} must be finite")
        for name in ("var_coef", "gap_coef", "consistency_var_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"GateParams.{name}={getattr(self, name)!r} must be >= 0 (it is a penalty)")


GateFn = Callable[[ViewStatistics, Tensor, GateParams, float], Tensor]


def gate_avsd(stats: ViewStatistics, jensen_gap: Tensor, params: GateParams, eps: float = DEFAULT_EPS) -> Tensor:
    """g = C · |δ̄| / (|δ̄| + J + eps): agreement × share of the consensus in consensus + residual. g ∈ [0, 1].

    No hyper-parameters (params is ignored). Defined for uniform view weights only (spec 2.3 step 8).
    """
    consensus = stats.delta_mean.abs()
    return agreement(stats.delta_mean, stats.delta_abs_mean, eps) * consensus / (consensus + jensen_gap + eps)


def gate_sigmoid(stats: ViewStatistics, jensen_gap: Tensor, params: GateParams, eps: float = DEFAULT_EPS) -> Tensor:
    """g = σ(α·(S − s₀) − γ_V·V − γ_J·J) (legacy gate). g ∈ (0, 1); eps unused."""
    logit = params.alpha * (stats.sign_agreement - params.sign_threshold)
    return torch.sigmoid(logit - params.var_coef * stats.variance - params.gap_coef * jensen_gap)


def gate_consistency_exp(
    stats: ViewStatistics, jensen_gap: Tensor, params: GateParams, eps: float = DEFAULT_EPS
) -> Tensor:
    """g = C·exp(−γ·V) if params.consistency_variance else C. g ∈ [0, 1]; J unused."""
    c = agreement(stats.delta_mean, stats.delta_abs_mean, eps)
    if not params.consistency_variance:
        return c
    return c * torch.exp(-params.consistency_var_coef * stats.variance)


def select_gate(gate: str) -> GateFn:
    """The gate function for a `GATE_MODES` name; choose once, outside the step loop (style 3.2)."""
    check_choice("gate", gate, GATE_MODES)
    return {"avsd": gate_avsd, "sigmoid": gate_sigmoid, "consistency_exp": gate_consistency_exp}[gate]


# ----------------------------------------------------------------------------------------------------------------
# Sampled-token targets (spec 2.2): one scalar per token and view.


@dataclass(frozen=True)
class SampledTokenTargets:
    """Per-token AVSD signals for the sampled-token loss. Every tensor field is [*N] (the shape of ell_s), in the
    compute dtype (fp32, or fp64 for fp64 inputs), and 0 where `valid` is False. Nothing is detached."""

    target: Tensor
    """T: log q_G + g·J (avsd) | log q_G (consensus) | log q_A (arithmetic) | ℓ_1 (single)."""
    advantage: Tensor
    """A = T − ℓ_s. NOT detached: the loss must use A.detach() (spec 2.2 step 8); grad reaches ℓ_s through −ℓ_s
    and through g."""
    gate: Tensor
    """g ∈ [0, 1] for the chosen gate; computed (as a diagnostic) in every mode."""
    jensen_gap: Tensor
    """J = max(0, log q_A − log q_G) ≥ 0."""
    consensus_advantage: Tensor
    """δ̄ = Σ_m w_m (ℓ_m − ℓ_s)."""
    agreement: Tensor
    """C = |δ̄| / (|δ|‾ + eps) ∈ [0, 1]."""
    log_q_g: Tensor
    """log q_G = Σ_m w_m ℓ_m, unnormalised as in the reference."""
    log_q_a: Tensor
    """log q_A = logsumexp_m(log w_m + ℓ_m)."""
    delta_abs_mean: Tensor
    """|δ|‾ = Σ_m w_m |δ_m|."""
    variance: Tensor
    """V = Σ_m w_m (δ_m − δ̄)²."""
    sign_agreement: Tensor
    """S = |Σ_m w_m sign(δ_m)|."""
    valid: Tensor
    """[*N] bool: mask ∧ ℓ_s finite ∧ T finite, the reference's rule (spec 2.2 step 9). T is finite when every ℓ_m
    is (avsd, consensus, single) or, in arithmetic mode, when at least one ℓ_m is (log q_A stays finite). The loss
    sums over these tokens only."""
    num_excluded: Tensor
    """[] int64: masked-in tokens dropped because ℓ_s or T is not finite (not synced to the host)."""
    views_finite: Tensor
    """[*N] bool: valid ∧ every ℓ_m finite, where the view statistics (δ̄, |δ|‾, V, S, C, g, J, log q_G) exist. It
    equals `valid` except in arithmetic mode; the diagnostics above are 0 where it is False."""


def _check_sampled_inputs(student_logprobs: Tensor, view_logprobs: Tensor, mode: str, gate: str) -> None:
    check_choice("mode", mode, MODES)
    check_choice("gate", gate, GATE_MODES)
    check_log_probs("student_logprobs", student_logprobs)
    check_log_probs("view_logprobs", view_logprobs)
    if student_logprobs.ndim < 1:
        raise ValueError(f"student_logprobs must be [N] or [..., N], got shape {tuple(student_logprobs.shape)}")
    if view_logprobs.ndim != student_logprobs.ndim + 1 or view_logprobs.shape[1:] != student_logprobs.shape:
        raise ValueError(
            f"view_logprobs has shape {tuple(view_logprobs.shape)}; expected [M, *{list(student_logprobs.shape)}] "
            f"(views first, then the shape of student_logprobs)"
        )
    num_views = view_logprobs.shape[0]
    if num_views == 0:
        raise ValueError(f"view_logprobs has M=0 views (shape {tuple(view_logprobs.shape)}); need M >= 1")
    if mode == "single" and num_views != 1:
        raise ValueError(
            f"mode='single' needs exactly one view, got M={num_views} (view_logprobs {tuple(view_logprobs.shape)})"
        )


def _sampled_target(mode: str, log_q_g: Tensor, log_q_a: Tensor, gate: Tensor, gap: Tensor, ell_m: Tensor) -> Tensor:
    """T by `mode` (spec 2.2 step 7)."""
    if mode == "avsd":
        return log_q_g + gate * gap
    if mode == "consensus":
        return log_q_g
    if mode == "arithmetic":
        return log_q_a
    return ell_m[0]  # single (M = 1): the one view


def sampled_token_targets(
    student_logprobs: Tensor,
    view_logprobs: Tensor,
    *,
    mask: Tensor | None = None,
    mode: str = "avsd",
    gate: str = "avsd",
    gate_params: GateParams | None = None,
    view_weights: Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> SampledTokenTargets:
    """Sampled-token AVSD targets and advantages (spec 2.2 steps 2-8), all per token.

    log q_G = Σ_m w_m ℓ_m (unnormalised), log q_A = logsumexp_m(log w_m + ℓ_m), J = max(0, log q_A − log q_G),
    δ_m = ℓ_m − ℓ_s, gate g from the w-weighted statistics of δ, T by mode, A = T − ℓ_s.

    Args:
        student_logprobs: [N] or [..., N] float ℓ_s(t), usually with grad.
        view_logprobs: [M, N] or [M, ..., N] float ℓ_m(t), views first; M ≥ 1.
        mask: [N] / [..., N] bool completion tokens to use; None = all.
        mode: one of MODES; 'single' needs M = 1 and sets T = ℓ_1.
        gate: one of GATE_MODES.
        gate_params: constants of the sigmoid / consistency_exp gates; None = GateParams() (spec 2.5 defaults).
        view_weights: [M] positive weights summing to 1; None = uniform 1/M (the reference). The avsd gate is
            defined for uniform weights only.
        eps: C and g denominators, > 0.
    Returns:
        SampledTokenTargets; every field 0 at tokens where `valid` is False. Computed in fp32 (fp64 if an input
        is fp64). The advantage is not detached here: the caller detaches it for the loss.
    Raises:
        ValueError: unknown mode/gate, shape mismatch, M = 0, 'single' with M ≠ 1, NaN or +inf in an input,
            bad view_weights, non-uniform view_weights with gate='avsd', eps ≤ 0.
        TypeError: non-floating log-probs or a non-bool mask.
    """
    _check_sampled_inputs(student_logprobs, view_logprobs, mode, gate)
    params = GateParams() if gate_params is None else gate_params
    check_eps(eps)
    dtype = compute_dtype(student_logprobs, view_logprobs)
    ell_s, ell_m = student_logprobs.to(dtype), view_logprobs.to(dtype)  # the one upcast
    num_views = ell_m.shape[0]
    if mask is None:
        mask = torch.ones(ell_s.shape, dtype=torch.bool, device=ell_s.device)
    check_mask("mask", mask, ell_s.shape)
    if view_weights is not None:
        check_view_weights(view_weights, num_views)
        if gate == "avsd" and not weights_are_uniform(view_weights):
            raise ValueError(
                f"gate='avsd' requires uniform view_weights (1/M each), got {view_weights.tolist()}; "
                f"use gate='sigmoid' or 'consistency_exp' with non-uniform weights"
            )
        view_weights = view_weights.to(dtype=dtype, device=ell_s.device)

    # The reference drops a token only when ℓ_s or T is non-finite (spec 2.2 step 9). -inf is legal input, never a
    # finite value; log q_A = logsumexp_m(...) is finite as soon as one view is, the other targets need all views.
    all_views = torch.isfinite(ell_m).all(dim=0)
    target_finite = torch.isfinite(ell_m).any(dim=0) if mode == "arithmetic" else all_views
    valid = mask & torch.isfinite(ell_s) & target_finite
    views_finite = valid & all_views
    num_excluded = (mask & ~valid).sum()
    # Zero the excluded tokens before any math, so no inf/NaN exists even in unselected branches (NaN-free grads);
    # arithmetic mode keeps a valid token's -inf views for its logsumexp only.
    ell_s = torch.where(valid, ell_s, 0.0)
    ell_m_stats = torch.where(views_finite.unsqueeze(0), ell_m, 0.0)
    ell_m_mix = torch.where(valid.unsqueeze(0), ell_m, 0.0)

    log_q_g = geometric_logits(ell_m_stats, view_weights)
    log_q_a = arithmetic_logprobs(ell_m_mix, view_weights)
    gap = jensen_gap(torch.where(views_finite, log_q_a, 0.0), log_q_g)
    stats = view_statistics(view_advantages(ell_m_stats, ell_s), view_weights)
    g = select_gate(gate)(stats, gap, params, eps)
    target = _sampled_target(mode, log_q_g, log_q_a, g, gap, ell_m_stats)

    def keep(x: Tensor) -> Tensor:
        return torch.where(valid, x, 0.0)

    def keep_stats(x: Tensor) -> Tensor:
        return torch.where(views_finite, x, 0.0)

    return SampledTokenTargets(
        target=keep(target),
        advantage=keep(target - ell_s),
        gate=keep_stats(g),
        jensen_gap=keep_stats(gap),
        consensus_advantage=keep_stats(stats.delta_mean),
        agreement=keep_stats(agreement(stats.delta_mean, stats.delta_abs_mean, eps)),
        log_q_g=keep_stats(log_q_g),
        log_q_a=keep(log_q_a),
        delta_abs_mean=keep_stats(stats.delta_abs_mean),
        variance=keep_stats(stats.variance),
        sign_agreement=keep_stats(stats.sign_agreement),
        valid=valid,
        num_excluded=num_excluded,
        views_finite=views_finite,
    )


def epistemic_sampled_token_term(
    ell_s: Tensor, gate: Tensor, mask: Tensor, tau_e: float = 0.01, *, detach_gate: bool = True
) -> Tensor:
    """Per-token epistemic-preservation term τ_e·(1 − g_t)·ℓ_s(t) (spec 2.2 step 10).

    The reference adds mean_valid of this to the loss (= −τ_e(1 − g)·Ĥ with the one-sample entropy Ĥ = −ℓ_s);
    here the caller sums it and divides by its own valid-token normaliser. The reference does not detach g, so
    gradient also flows through the gate (which depends on ℓ_s through δ); the default detaches it (spec 6.4).

    Args:
        ell_s: [*N] float student log-prob of the sampled token, with grad.
        gate: [*N] float g (e.g. SampledTokenTargets.gate).
        mask: [*N] bool tokens to use (e.g. SampledTokenTargets.valid); non-finite ℓ_s are excluded too.
        tau_e: τ_e ≥ 0 (`epistemic_tau`).
        detach_gate: True (default) stops the gradient through g; False reproduces the reference.
    Returns:
        [*N] in the compute dtype; 0 where mask is False or ℓ_s is not finite.
    """
    check_log_probs("ell_s", ell_s)
    if gate.shape != ell_s.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)}, expected the shape of ell_s {tuple(ell_s.shape)}")
    check_mask("mask", mask, ell_s.shape)
    if not (math.isfinite(tau_e) and tau_e >= 0):
        raise ValueError(f"tau_e={tau_e!r} must be finite and >= 0")
    dtype = compute_dtype(ell_s, gate)
    valid = mask & torch.isfinite(ell_s)
    g = gate.detach() if detach_gate else gate
    ell = torch.where(valid, ell_s.to(dtype), 0.0)
    return torch.where(valid, tau_e * (1.0 - g.to(dtype)) * ell, 0.0)
