"""Tests for avsd_megatron.signals.sampled and avsd_megatron.signals.candidate (spec 2.2, 2.3, 6.4).

Run: .venv/bin/python -m pytest -q tests/signals/test_signals.py

Equivalence tests re-derive every quantity in float64 with plain Python loops over tokens, views and candidates
(math.log / math.exp, no vectorised code); property tests use hypothesis; the rest cover bad input, excluded
tokens and which tensors carry gradient.
"""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avsd_megatron.signals.candidate import (
    agreement_centrality_weights,
    candidate_epistemic_terms,
    candidate_targets,
    generalized_jsd,
    generalized_jsd_elementwise,
    masked_log_softmax,
    pairwise_jsd_half,
)
from avsd_megatron.signals.sampled import (
    GATE_MODES,
    MODES,
    GateParams,
    epistemic_sampled_token_term,
    sampled_token_targets,
    select_gate,
)

EPS = 1e-8
TIGHT = dict(rtol=1e-10, atol=1e-10)  # fp64 inputs vs the fp64 loop reference
LOOSE = dict(rtol=1e-5, atol=1e-5)  # fp32 inputs vs the fp64 loop reference on the same (fp32-rounded) values
PROPERTY = settings(max_examples=100, deadline=None)
NEG_INF = -math.inf


# ----------------------------------------------------------------------------------------------------------------
# float64 loop references


def _sign(x: float) -> float:
    return 0.0 if x == 0 else math.copysign(1.0, x)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _ref_gate(gate, dbar, dabs, var, s_agree, gap, params, eps=EPS):
    c = abs(dbar) / (dabs + eps)
    if gate == "avsd":
        return c * abs(dbar) / (abs(dbar) + gap + eps)
    if gate == "sigmoid":
        x = params.alpha * (s_agree - params.sign_threshold) - params.var_coef * var - params.gap_coef * gap
        return 1.0 / (1.0 + math.exp(-x))
    return c * math.exp(-params.consistency_var_coef * var) if params.consistency_variance else c


def _ref_stats(views, student, w):
    d = [views[m] - student for m in range(len(views))]
    dbar = sum(w[m] * d[m] for m in range(len(d)))
    dabs = sum(w[m] * abs(d[m]) for m in range(len(d)))
    var = sum(w[m] * (d[m] - dbar) ** 2 for m in range(len(d)))
    s_agree = abs(sum(w[m] * _sign(d[m]) for m in range(len(d))))
    return dbar, dabs, var, s_agree


def ref_sampled(ell_s, ell_m, mode, gate, params=GateParams(), weights=None):
    """Spec 2.2 steps 2-8, token by token. ell_s: [N] list, ell_m: [M][N] lists."""
    num_views = len(ell_m)
    w = weights if weights is not None else [1.0 / num_views] * num_views
    out = {k: [] for k in ("target", "advantage", "gate", "jensen_gap", "consensus_advantage", "agreement",
                           "log_q_g", "log_q_a", "variance", "sign_agreement")}
    for n, s in enumerate(ell_s):
        views = [ell_m[m][n] for m in range(num_views)]
        log_q_g = sum(w[m] * views[m] for m in range(num_views))
        top = max(views)
        log_q_a = top + math.log(sum(w[m] * math.exp(views[m] - top) for m in range(num_views)))
        gap = max(0.0, log_q_a - log_q_g)
        dbar, dabs, var, s_agree = _ref_stats(views, s, w)
        g = _ref_gate(gate, dbar, dabs, var, s_agree, gap, params)
        target = {"avsd": log_q_g + g * gap, "consensus": log_q_g, "arithmetic": log_q_a, "single": views[0]}[mode]
        values = dict(target=target, advantage=target - s, gate=g, jensen_gap=gap, consensus_advantage=dbar,
                      agreement=abs(dbar) / (dabs + EPS), log_q_g=log_q_g, log_q_a=log_q_a, variance=var,
                      sign_agreement=s_agree)
        for k, v in values.items():
            out[k].append(v)
    return out


def _ref_jsd_half(p_log, q_log):
    total = 0.0
    for lp, lq in zip(p_log, q_log):
        mix = 0.5 * (math.exp(lp) + math.exp(lq))
        total += 0.5 * math.exp(lp) * (lp - math.log(mix)) + 0.5 * math.exp(lq) * (lq - math.log(mix))
    return total


def _ref_weights(rows, weight_mode, eta):
    """rows: [M] lists of view log-probs on the support of one token."""
    num_views = len(rows)
    if weight_mode == "uniform" or num_views == 1:
        return [1.0 / num_views] * num_views
    cent = [sum(_ref_jsd_half(rows[m], rows[o]) for o in range(num_views) if o != m) / (num_views - 1)
            for m in range(num_views)]
    z = sum(math.exp(-eta * c) for c in cent)
    w = [math.exp(-eta * c) / z for c in cent]
    return [x / max(sum(w), EPS) for x in w]


def ref_candidate(ell_s, ell_m, support, mode, gate, params=GateParams(), weight_mode="uniform", eta=5.0,
                  q_a_floor=1e-8):
    """Spec 2.3 steps 4-9, token by token and candidate by candidate. Returns dict of per-token lists of lists."""
    num_views, n_tok, k_c = len(ell_m), len(ell_s), len(ell_s[0])
    out = {k: [] for k in ("log_q_T", "gate", "jensen_gap", "log_q_g", "log_q_a", "view_weights",
                           "weight_entropy")}
    for n in range(n_tok):
        idx = [k for k in range(k_c) if support[n][k]]
        rows = [[ell_m[m][n][k] for k in idx] for m in range(num_views)]
        w = _ref_weights(rows, weight_mode, eta) if idx else [1.0 / num_views] * num_views
        row = {name: [NEG_INF] * k_c for name in ("log_q_T", "log_q_g", "log_q_a")}
        row.update(gate=[0.0] * k_c, jensen_gap=[0.0] * k_c)
        if idx:
            geo = {k: sum(w[m] * ell_m[m][n][k] for m in range(num_views)) for k in idx}
            z_g = _logsumexp(list(geo.values()))
            ari = {k: sum(w[m] * math.exp(ell_m[m][n][k]) for m in range(num_views)) for k in idx}
            z_a = max(sum(ari.values()), EPS)
            pre = {}
            for k in idx:
                lg = geo[k] - z_g
                la = math.log(max(ari[k] / z_a, q_a_floor)) if q_a_floor > 0 else math.log(ari[k] / z_a)
                gap = max(0.0, la - lg)
                stats = _ref_stats([ell_m[m][n][k] for m in range(num_views)], ell_s[n][k], w)
                g = _ref_gate(gate, *stats, gap, params)
                pre[k] = {"avsd": lg + g * gap, "consensus": lg, "single": lg, "arithmetic": la}[mode]
                row["log_q_g"][k], row["log_q_a"][k], row["gate"][k], row["jensen_gap"][k] = lg, la, g, gap
            z_t = _logsumexp(list(pre.values()))
            for k in idx:
                row["log_q_T"][k] = pre[k] - z_t
        for name, values in row.items():
            out[name].append(values)
        out["view_weights"].append(w)
        out["weight_entropy"].append(-sum(x * math.log(max(x, EPS)) for x in w))
    return out


def ref_generalized_jsd(ell_s, log_q, support, beta, token_clip):
    out = []
    for n in range(len(ell_s)):
        total = 0.0
        for k in range(len(ell_s[n])):
            lp, lq = ell_s[n][k], log_q[n][k]
            if not (support[n][k] and math.isfinite(lp) and math.isfinite(lq)):
                continue
            p, q = math.exp(lp), math.exp(lq)
            if beta == 0.0:
                total += q * (lq - lp)
            elif beta == 1.0:
                total += p * (lp - lq)
            else:
                log_mix = math.log((1.0 - beta) * p + beta * q)
                total += beta * q * (lq - log_mix) + (1.0 - beta) * p * (lp - log_mix)
        out.append(min(total, token_clip) if token_clip > 0 else total)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _sampled_case(num_views: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ell_s [N], ell_m [M, N]: 5 random tokens, then identical views, sign-disagreeing views, zero advantages."""
    gen = torch.Generator().manual_seed(seed + num_views)
    ell_s = -(0.1 + 7.9 * torch.rand(8, generator=gen, dtype=torch.float64))
    ell_m = -(0.1 + 7.9 * torch.rand(num_views, 8, generator=gen, dtype=torch.float64))
    ell_m[:, 5] = -1.5  # identical views (J = 0, target = the view)
    pattern = {1: [1.0], 2: [1.0, -1.0], 3: [1.0, -1.0, 0.0], 5: [1.0, -1.0, 1.0, -1.0, 0.0]}[num_views]
    ell_s[6] = -2.0
    ell_m[:, 6] = -2.0 + torch.tensor(pattern, dtype=torch.float64)  # δ̄ = 0 for M > 1: C = 0
    ell_m[:, 7] = ell_s[7]  # zero advantages
    return ell_s.to(dtype), ell_m.to(dtype)


def _candidate_case(num_views: int, dtype: torch.dtype, seed: int = 0):
    """student [N, Kc], views [M, N, Kc], support [N, Kc]: full, partial, single-candidate and empty rows."""
    gen = torch.Generator().manual_seed(100 + seed + num_views)
    n_tok, k_c = 5, 6
    support = torch.rand(n_tok, k_c, generator=gen) < 0.7
    support[0] = True
    support[1] = False
    support[2] = False
    support[2, 3] = True
    support[3, 0] = True
    student = masked_log_softmax(3 * torch.randn(n_tok, k_c, generator=gen, dtype=torch.float64), support)
    views = masked_log_softmax(3 * torch.randn(num_views, n_tok, k_c, generator=gen, dtype=torch.float64),
                               support.expand(num_views, n_tok, k_c))
    views[:, 4] = views[0, 4].clone()  # identical views on the last row
    return student.to(dtype), views.to(dtype), support


def _assert_close(actual: torch.Tensor, expected, tol) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), **tol)


SAMPLED_CASES = [(mode, gate, m) for mode in MODES for gate in GATE_MODES for m in (1, 2, 3, 5)
                 if mode != "single" or m == 1]
FIELDS = ("target", "advantage", "gate", "jensen_gap", "consensus_advantage", "agreement", "log_q_g", "log_q_a",
          "variance", "sign_agreement")


# ----------------------------------------------------------------------------------------------------------------
# Sampled-token targets: equivalence with the loop reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,gate,num_views", SAMPLED_CASES)
def test_sampled_token_targets_match_float64_loops(mode, gate, num_views, dtype):
    ell_s, ell_m = _sampled_case(num_views, dtype)
    out = sampled_token_targets(ell_s, ell_m, mode=mode, gate=gate)
    ref = ref_sampled(ell_s.double().tolist(), ell_m.double().tolist(), mode, gate)
    tol = TIGHT if dtype == torch.float64 else LOOSE
    assert out.target.dtype == dtype
    for name in FIELDS:
        _assert_close(getattr(out, name), ref[name], tol)
    assert out.valid.all() and int(out.num_excluded) == 0


@pytest.mark.parametrize("num_views", [1, 2, 3, 5])
def test_sampled_token_targets_identical_views_zero_gap_and_target_is_view(num_views):
    ell_s, ell_m = _sampled_case(num_views, torch.float64)
    for mode in ("avsd", "consensus", "arithmetic"):
        out = sampled_token_targets(ell_s, ell_m, mode=mode)
        assert abs(float(out.jensen_gap[5])) < 1e-12
        assert abs(float(out.target[5]) + 1.5) < 1e-12


@pytest.mark.parametrize("num_views", [2, 3, 5])
def test_sampled_token_targets_sign_disagreement_closes_avsd_gate(num_views):
    ell_s, ell_m = _sampled_case(num_views, torch.float64)
    out = sampled_token_targets(ell_s, ell_m)
    assert float(out.agreement[6]) == 0.0 and float(out.gate[6]) == 0.0
    assert float(out.target[6]) == float(out.log_q_g[6])  # target falls back to the consensus


@pytest.mark.parametrize("gate", ["sigmoid", "consistency_exp"])
@pytest.mark.parametrize("mode", ["avsd", "consensus", "arithmetic"])
def test_sampled_token_targets_weighted_views_match_float64_loops(mode, gate):
    ell_s, ell_m = _sampled_case(3, torch.float64, seed=7)
    weights = [0.5, 0.3, 0.2]
    params = GateParams(alpha=4.0, sign_threshold=0.5, var_coef=0.3, gap_coef=2.0, consistency_var_coef=0.7)
    out = sampled_token_targets(ell_s, ell_m, mode=mode, gate=gate, gate_params=params,
                                view_weights=torch.tensor(weights, dtype=torch.float64))
    ref = ref_sampled(ell_s.tolist(), ell_m.tolist(), mode, gate, params, weights)
    for name in FIELDS:
        _assert_close(getattr(out, name), ref[name], TIGHT)


def test_sampled_token_targets_consistency_exp_variance_off_is_agreement():
    ell_s, ell_m = _sampled_case(3, torch.float64)
    out = sampled_token_targets(ell_s, ell_m, gate="consistency_exp",
                                gate_params=GateParams(consistency_variance=False))
    torch.testing.assert_close(out.gate, out.agreement, rtol=0, atol=0)


def test_sampled_token_targets_batched_shape_matches_flat():
    ell_s, ell_m = _sampled_case(3, torch.float64)
    flat = sampled_token_targets(ell_s, ell_m)
    batched = sampled_token_targets(ell_s.reshape(2, 4), ell_m.reshape(3, 2, 4))
    assert batched.target.shape == (2, 4)
    torch.testing.assert_close(batched.target.reshape(-1), flat.target, rtol=0, atol=0)


def test_sampled_token_targets_bf16_input_computes_in_fp32():
    ell_s, ell_m = _sampled_case(2, torch.bfloat16)
    assert sampled_token_targets(ell_s, ell_m).target.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Sampled-token targets: masks, -inf, bad input


def test_sampled_token_targets_neg_inf_excluded_and_counted():
    ell_s, ell_m = _sampled_case(3, torch.float64)
    ell_s[0] = NEG_INF
    ell_m[1, 2] = NEG_INF
    ell_m[0, 3] = NEG_INF  # masked out below: not counted
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    out = sampled_token_targets(ell_s, ell_m, mask=mask)
    assert out.valid.tolist() == [False, True, False, False, True, True, True, True]
    assert int(out.num_excluded) == 2
    for name in FIELDS:
        value = getattr(out, name)
        assert torch.isfinite(value).all()
        assert (value[~out.valid] == 0).all()


def test_sampled_token_targets_empty_mask_gives_zeros():
    ell_s, ell_m = _sampled_case(2, torch.float32)
    out = sampled_token_targets(ell_s, ell_m, mask=torch.zeros(8, dtype=torch.bool))
    assert not out.valid.any() and int(out.num_excluded) == 0
    for name in FIELDS:
        assert (getattr(out, name) == 0).all()


def _nan_views():
    ell_s, ell_m = _sampled_case(2, torch.float32)
    ell_m[1, 4] = math.nan
    return ell_s, ell_m


def _posinf_student():
    ell_s, ell_m = _sampled_case(2, torch.float32)
    ell_s[3] = math.inf
    return ell_s, ell_m


BAD_SAMPLED = [
    (lambda: (torch.zeros(4), torch.zeros(2, 5)), {}, r"view_logprobs has shape \(2, 5\)"),
    (lambda: (torch.zeros(4), torch.zeros(4)), {}, r"view_logprobs has shape \(4,\)"),
    (lambda: (torch.zeros(4), torch.zeros(0, 4)), {}, r"M=0"),
    (_nan_views, {}, r"view_logprobs contains NaN at index \(1, 4\)"),
    (_posinf_student, {}, r"student_logprobs contains \+inf at index \(3,\)"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"mode": "foo"}, re.escape("mode='foo' is not one of (")),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"gate": "sigmod"}, re.escape("gate='sigmod' is not one of (")),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"mode": "single"}, r"mode='single' needs exactly one view"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"mask": torch.ones(5, dtype=torch.bool)}, r"mask has shape"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"view_weights": torch.tensor([1.0])}, r"view_weights has shape"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"view_weights": torch.tensor([1.5, -0.5]), "gate": "sigmoid"},
     r"view_weights must be finite and > 0"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"view_weights": torch.tensor([0.5, 0.6]), "gate": "sigmoid"},
     r"view_weights must sum to 1"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"view_weights": torch.tensor([0.7, 0.3])},
     r"gate='avsd' requires uniform view_weights"),
    (lambda: (torch.zeros(4), torch.zeros(2, 4)), {"eps": 0.0}, r"eps=0.0 must be"),
]


@pytest.mark.parametrize("make,kwargs,message", BAD_SAMPLED)
def test_sampled_token_targets_rejects_bad_input(make, kwargs, message):
    ell_s, ell_m = make()
    with pytest.raises(ValueError, match=message):
        sampled_token_targets(ell_s, ell_m, **kwargs)


def test_sampled_token_targets_rejects_non_bool_mask():
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        sampled_token_targets(torch.zeros(4), torch.zeros(2, 4), mask=torch.ones(4))


def test_gate_params_rejects_negative_penalty():
    with pytest.raises(ValueError, match=r"GateParams.gap_coef=-1.0 must be >= 0"):
        GateParams(gap_coef=-1.0)
    with pytest.raises(ValueError, match=re.escape("gate='x' is not one of (")):
        select_gate("x")


# ----------------------------------------------------------------------------------------------------------------
# Sampled-token targets: gradients and the epistemic term


def test_sampled_token_targets_advantage_not_detached():
    ell_s, ell_m = _sampled_case(3, torch.float64)
    ell_s[0] = NEG_INF  # excluded token: gradient 0, never NaN
    ell_s.requires_grad_(True)
    out = sampled_token_targets(ell_s, ell_m, mode="consensus")
    (grad,) = torch.autograd.grad(out.advantage.sum(), ell_s)
    expected = torch.full((8,), -1.0, dtype=torch.float64)
    expected[0] = 0.0
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("gate", GATE_MODES)
def test_sampled_token_targets_avsd_advantage_gradient_includes_gate(gate):
    ell_s, ell_m = _sampled_case(3, torch.float64)
    ell_s, ell_m = ell_s[:5], ell_m[:, :5]  # random tokens: away from the kinks of |δ|
    torch.autograd.gradcheck(lambda x: sampled_token_targets(x, ell_m, gate=gate).advantage,
                             (ell_s.clone().requires_grad_(True),))


def test_epistemic_sampled_token_term_matches_float64_loops_and_detaches_gate():
    ell_s, ell_m = _sampled_case(3, torch.float64)
    ell_s = ell_s.clone().requires_grad_(True)
    mask = torch.tensor([True] * 7 + [False])
    out = sampled_token_targets(ell_s, ell_m, mask=mask)
    term = epistemic_sampled_token_term(ell_s, out.gate, out.valid, tau_e=0.01)
    g = out.gate.tolist()
    ref = [0.01 * (1 - g[n]) * float(ell_s[n].detach()) if mask[n] else 0.0 for n in range(8)]
    _assert_close(term, ref, TIGHT)
    (grad,) = torch.autograd.grad(term.sum(), ell_s)
    _assert_close(grad, [0.01 * (1 - g[n]) if mask[n] else 0.0 for n in range(8)], TIGHT)


def test_epistemic_sampled_token_term_reference_gradient_flows_through_gate():
    ell_s, ell_m = _sampled_case(3, torch.float64)
    ell_s, ell_m = ell_s[:5], ell_m[:, :5]

    def term(x, detach_gate):
        out = sampled_token_targets(x, ell_m)
        return epistemic_sampled_token_term(x, out.gate, out.valid, tau_e=0.5, detach_gate=detach_gate)

    x = ell_s.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda y: term(y, False), (x,))
    (with_gate,) = torch.autograd.grad(term(x, False).sum(), x)
    (detached,) = torch.autograd.grad(term(x, True).sum(), x)
    assert (with_gate - detached).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Candidate targets


CANDIDATE_CASES = [(mode, gate, weight_mode, m) for mode in MODES for gate in GATE_MODES
                   for weight_mode in ("uniform", "agreement_centrality") for m in (1, 2, 3, 5)
                   if (mode != "single" or m == 1)
                   and not (weight_mode == "agreement_centrality" and (mode == "arithmetic" or gate == "avsd"))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,gate,weight_mode,num_views", CANDIDATE_CASES)
def test_candidate_targets_match_float64_loops(mode, gate, weight_mode, num_views, dtype):
    student, views, support = _candidate_case(num_views, dtype)
    out = candidate_targets(student, views, support, mode=mode, gate=gate, weight_mode=weight_mode)
    ref = ref_candidate(student.double().tolist(), views.double().tolist(), support.tolist(), mode, gate,
                        weight_mode=weight_mode)
    tol = TIGHT if dtype == torch.float64 else LOOSE
    for name in ("log_q_T", "gate", "jensen_gap", "log_q_g", "log_q_a", "view_weights", "weight_entropy"):
        _assert_close(getattr(out, name), ref[name], tol)
    assert out.token_valid.tolist() == [True, False, True, True, True]
    assert not out.log_q_T.requires_grad


def test_candidate_targets_weighted_stats_and_eta():
    student, views, support = _candidate_case(3, torch.float64, seed=3)
    params = GateParams(alpha=2.0, sign_threshold=0.3)
    out = candidate_targets(student, views, support, gate="sigmoid", gate_params=params,
                            weight_mode="agreement_centrality", eta=20.0, q_a_floor=0.0)
    ref = ref_candidate(student.tolist(), views.tolist(), support.tolist(), "avsd", "sigmoid", params,
                        "agreement_centrality", eta=20.0, q_a_floor=0.0)
    for name in ("log_q_T", "gate", "view_weights", "log_q_a"):
        _assert_close(getattr(out, name), ref[name], TIGHT)


def test_candidate_targets_neg_inf_on_support_gives_zero_gate_and_finite_gradient():
    student, views, support = _candidate_case(3, torch.float64)
    views[1, 0, 2] = NEG_INF
    student = student.clone().requires_grad_(True)
    out = candidate_targets(student, views, support, detach_target=False)
    assert not bool(out.entry_valid[0, 2]) and float(out.gate.detach()[0, 2]) == 0.0
    assert float(out.jensen_gap[0, 2]) == 0.0
    assert float(out.log_q_g[0, 2]) == NEG_INF
    finite = torch.isfinite(out.log_q_T)
    (grad,) = torch.autograd.grad(out.log_q_T[finite].sum(), student)
    assert torch.isfinite(grad).all()


def test_candidate_targets_detach_flag_controls_gradient():
    _, views, support = _candidate_case(2, torch.float64, seed=5)
    support = support[[0, 3]]
    views = views[:, [0, 3]]
    logits = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def target(x, detach):
        out = candidate_targets(masked_log_softmax(x, support), views, support, detach_target=detach)
        return torch.where(support, out.log_q_T, 0.0)

    x = logits.clone().requires_grad_(True)
    assert not target(x, True).requires_grad
    torch.autograd.gradcheck(lambda y: target(y, False), (x,))  # the reference's leak through g(p_s)
    (grad,) = torch.autograd.grad((target(x, False) * torch.arange(6.0, dtype=torch.float64)).sum(), x)
    assert grad.abs().max() > 1e-6


def test_pairwise_jsd_half_partial_sums_add_over_support_split():
    _, views, support = _candidate_case(3, torch.float64)
    full = pairwise_jsd_half(views, support)
    halves = pairwise_jsd_half(views[..., :3], support[:, :3]) + pairwise_jsd_half(views[..., 3:], support[:, 3:])
    torch.testing.assert_close(halves, full, **TIGHT)
    assert agreement_centrality_weights(full[:, :0], 1).tolist() == [[1.0]] * 5


BAD_CANDIDATE = [
    ({"mode": "arithmetic", "weight_mode": "agreement_centrality"}, r"agreement_centrality' is not used with mode"),
    ({"weight_mode": "agreement_centrality"}, r"gate='avsd' requires weight_mode='uniform'"),
    ({"weight_mode": "centre"}, re.escape("weight_mode='centre' is not one of (")),
    ({"q_a_floor": 1.0}, r"q_a_floor=1.0 must be in"),
    ({"mode": "single"}, r"mode='single' needs exactly one view"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CANDIDATE)
def test_candidate_targets_rejects_bad_options(kwargs, message):
    student, views, support = _candidate_case(2, torch.float32)
    with pytest.raises(ValueError, match=message):
        candidate_targets(student, views, support, **kwargs)


def test_candidate_targets_rejects_bad_shapes_and_nan():
    student, views, support = _candidate_case(2, torch.float32)
    with pytest.raises(ValueError, match=r"view_logprobs has shape \(2, 5, 5\)"):
        candidate_targets(student, views[..., :5], support)
    with pytest.raises(ValueError, match=r"M=0"):
        candidate_targets(student, views[:0], support)
    with pytest.raises(ValueError, match=r"support_mask has shape"):
        candidate_targets(student, views, support[:4])
    views[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"view_logprobs contains NaN at index \(0, 0, 0\)"):
        candidate_targets(student, views, support)


def test_masked_log_softmax_empty_row_and_rejects_posinf():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_log_softmax(logits, mask)
    _assert_close(out, [[1 - math.log(math.e + math.e**3), NEG_INF, 3 - math.log(math.e + math.e**3)],
                        [NEG_INF] * 3], TIGHT)
    with pytest.raises(ValueError, match=r"logits contains \+inf"):
        masked_log_softmax(torch.tensor([math.inf, 0.0]), torch.tensor([True, True]))


# ----------------------------------------------------------------------------------------------------------------
# Generalized JSD and the candidate epistemic term


@pytest.mark.parametrize("token_clip", [0.0, 0.05])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_matches_float64_loops(beta, token_clip):
    student, views, support = _candidate_case(2, torch.float64)
    target = candidate_targets(student, views, support).log_q_T
    out = generalized_jsd(student, target, support, beta=beta, token_clip=token_clip)
    ref = ref_generalized_jsd(student.tolist(), target.tolist(), support.tolist(), beta, token_clip)
    _assert_close(out, ref, TIGHT)
    out32 = generalized_jsd(student.float(), target.float(), support, beta=beta, token_clip=token_clip)
    _assert_close(out32, ref, LOOSE)


def test_generalized_jsd_elementwise_partial_sums_add_over_support_split():
    student, views, support = _candidate_case(2, torch.float64)
    target = views[0]
    full = generalized_jsd_elementwise(student, target, support, beta=0.3).sum(-1)
    torch.testing.assert_close(full, generalized_jsd(student, target, support, beta=0.3), **TIGHT)


def test_generalized_jsd_rejects_bad_beta_and_shapes():
    student, views, support = _candidate_case(2, torch.float32)
    with pytest.raises(ValueError, match=r"beta=1.5 must be in \[0, 1\]"):
        generalized_jsd(student, views[0], support, beta=1.5)
    with pytest.raises(ValueError, match=r"target_logprobs has shape"):
        generalized_jsd(student, views[0, :4], support)


def test_candidate_epistemic_terms_match_float64_loops_and_gate_gradient():
    student, views, support = _candidate_case(3, torch.float64)
    out = candidate_targets(student, views, support)
    gate = out.gate.clone().requires_grad_(True)
    terms = candidate_epistemic_terms(student, gate, support, tau_e=0.01)
    ent, lam = [], []
    for n in range(student.shape[0]):
        idx = [k for k in range(6) if support[n, k]]
        ent.append(-sum(math.exp(float(student[n, k])) * float(student[n, k]) for k in idx))
        lam.append(sum(math.exp(float(student[n, k])) * float(gate.detach()[n, k]) for k in idx))
    _assert_close(terms.entropy, ent, TIGHT)
    _assert_close(terms.mean_gate, lam, TIGHT)
    _assert_close(terms.loss, [-0.01 * (1 - lam[n]) * ent[n] for n in range(5)], TIGHT)
    assert not terms.loss.requires_grad  # default: gate detached
    ref_terms = candidate_epistemic_terms(student, gate, support, tau_e=0.01, detach_gate=False)
    (grad,) = torch.autograd.grad(ref_terms.loss.sum(), gate)
    expected = torch.where(support, 0.01 * torch.tensor(ent, dtype=torch.float64)[:, None] * student.exp(), 0.0)
    torch.testing.assert_close(grad, expected, **TIGHT)


# ----------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)

LOGPROB = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)


@st.composite
def sampled_inputs(draw, max_views=5):
    num_views = draw(st.integers(1, max_views))
    n_tok = draw(st.integers(1, 6))
    ell_s = draw(st.lists(LOGPROB, min_size=n_tok, max_size=n_tok))
    ell_m = draw(st.lists(st.lists(LOGPROB, min_size=n_tok, max_size=n_tok), min_size=num_views,
                          max_size=num_views))
    return torch.tensor(ell_s, dtype=torch.float64), torch.tensor(ell_m, dtype=torch.float64)


@st.composite
def candidate_inputs(draw, max_views=4):
    num_views, n_tok, k_c = draw(st.integers(1, max_views)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    logit = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False)
    grid = st.lists(st.lists(logit, min_size=k_c, max_size=k_c), min_size=n_tok, max_size=n_tok)
    support = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=k_c, max_size=k_c), min_size=n_tok,
                                         max_size=n_tok)))
    student = masked_log_softmax(torch.tensor(draw(grid), dtype=torch.float64), support)
    views = torch.stack([masked_log_softmax(torch.tensor(draw(grid), dtype=torch.float64), support)
                         for _ in range(num_views)])
    return student, views, support


@PROPERTY
@given(sampled_inputs(), st.sampled_from(["avsd", "consensus", "arithmetic"]))
def test_jensen_gap_nonnegative(inputs, mode):
    ell_s, ell_m = inputs
    assert (sampled_token_targets(ell_s, ell_m, mode=mode).jensen_gap >= 0).all()


@PROPERTY
@given(sampled_inputs(), st.sampled_from(GATE_MODES))
def test_gate_in_unit_interval(inputs, gate):
    ell_s, ell_m = inputs
    g = sampled_token_targets(ell_s, ell_m, gate=gate).gate
    assert ((g >= 0) & (g <= 1)).all()


@PROPERTY
@given(candidate_inputs(), st.sampled_from(GATE_MODES))
def test_candidate_gate_in_unit_interval(inputs, gate):
    g = candidate_targets(*inputs, gate=gate).gate
    assert ((g >= 0) & (g <= 1)).all()


@PROPERTY
@given(sampled_inputs(max_views=1), st.sampled_from(GATE_MODES))
def test_single_view_reduces_to_opd(inputs, gate):
    ell_s, ell_m = inputs
    avsd = sampled_token_targets(ell_s, ell_m, gate=gate)
    single = sampled_token_targets(ell_s, ell_m, mode="single", gate=gate)
    torch.testing.assert_close(avsd.target, ell_m[0], rtol=0, atol=0)
    torch.testing.assert_close(avsd.advantage, single.advantage, rtol=0, atol=0)


@PROPERTY
@given(st.lists(LOGPROB, min_size=1, max_size=6), st.lists(LOGPROB, min_size=1, max_size=6), st.integers(1, 5))
def test_sampled_token_targets_identical_views_property(student, view, num_views):
    n_tok = min(len(student), len(view))
    ell_s = torch.tensor(student[:n_tok], dtype=torch.float64)
    ell_m = torch.tensor(view[:n_tok], dtype=torch.float64).expand(num_views, n_tok)
    out = sampled_token_targets(ell_s, ell_m)
    assert (out.jensen_gap <= 1e-12).all()
    torch.testing.assert_close(out.target, ell_m[0], rtol=0, atol=1e-12)


@PROPERTY
@given(candidate_inputs(), st.sampled_from(MODES), st.sampled_from(["uniform", "agreement_centrality"]))
def test_candidate_targets_normalised(inputs, mode, weight_mode):
    student, views, support = inputs
    if mode == "single":
        views = views[:1]
    gate = "sigmoid" if weight_mode == "agreement_centrality" else "avsd"
    if mode == "arithmetic":
        weight_mode = "uniform"
    out = candidate_targets(student, views, support, mode=mode, gate=gate, weight_mode=weight_mode)
    rows = support.any(-1)
    lse = torch.logsumexp(out.log_q_T[rows], dim=-1)
    torch.testing.assert_close(lse, torch.zeros_like(lse), rtol=0, atol=1e-12)
    assert (out.log_q_T[~support] == NEG_INF).all()
    torch.testing.assert_close(out.view_weights.sum(-1), torch.ones(support.shape[0], dtype=torch.float64))


@PROPERTY
@given(candidate_inputs(max_views=1), st.integers(1, 4))
def test_candidate_targets_identical_views_zero_gap_and_target_is_view(inputs, num_views):
    student, views, support = inputs
    views = views.expand(num_views, *views.shape[1:])
    # q_a_floor=0: the reference's 1e-8 floor on q_A makes J > 0 on candidates with p < 1e-8.
    out = candidate_targets(student, views, support, q_a_floor=0.0)
    assert (out.jensen_gap <= 1e-12).all()
    torch.testing.assert_close(out.log_q_T[support], views[0][support], rtol=0, atol=1e-10)


@PROPERTY
@given(candidate_inputs(max_views=2), st.floats(min_value=0.0, max_value=1.0))
def test_generalized_jsd_nonnegative_and_endpoints_are_kls(inputs, beta):
    student, views, support = inputs
    target = views[-1]
    assert (generalized_jsd(student, target, support, beta=beta) >= -1e-12).all()
    kl_ts = torch.where(support, target.exp() * (target - student), 0.0).sum(-1)
    kl_st = torch.where(support, student.exp() * (student - target), 0.0).sum(-1)
    torch.testing.assert_close(generalized_jsd(student, target, support, beta=0.0), kl_ts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(generalized_jsd(student, target, support, beta=1.0), kl_st, rtol=1e-12, atol=1e-12)


def test_sampled_token_targets_arithmetic_keeps_tokens_with_some_minus_inf_views():
    """Spec 2.2 step 9: a token is dropped only when ℓ_s or T is non-finite; log q_A is finite if one view is."""
    ell_s, ell_m = _sampled_case(3, torch.float64)
    ell_m[0, 1] = NEG_INF  # one view -inf: arithmetic keeps the token, the other modes drop it
    ell_m[:, 2] = NEG_INF  # every view -inf: dropped everywhere
    arith = sampled_token_targets(ell_s, ell_m, mode="arithmetic")
    cons = sampled_token_targets(ell_s, ell_m, mode="consensus")
    assert arith.valid[1] and not arith.valid[2] and int(arith.num_excluded) == 1
    assert not cons.valid[1] and int(cons.num_excluded) == 2
    expected = math.log((math.exp(float(ell_m[1, 1])) + math.exp(float(ell_m[2, 1]))) / 3)
    assert float(arith.target[1]) == pytest.approx(expected, rel=1e-12)
    assert float(arith.advantage[1]) == pytest.approx(expected - float(ell_s[1]), rel=1e-12)
    assert not arith.views_finite[1] and float(arith.gate[1]) == 0.0  # statistics of -inf views are not defined
    for name in FIELDS:
        assert torch.isfinite(getattr(arith, name)).all(), name
