"""Reference parity of four rules the kernels once changed without a flag (issue 18 item 1), each against a float64
re-derivation of the reference's rule written here from the spec, independent of `avsd_megatron.signals`:

* pad-id tokens inside completions leave the loss (spec 3.5: labels == pad id -> -100), `build_avsd_batch`;
* the epistemic term's gate keeps its gradient (spec 2.2 step 10, 2.3 step 11), sampled and candidate losses;
* the single-view full-vocabulary JSD clamps each (token, vocabulary entry) term (spec 2.4, §6 item 5);
* arithmetic mode drops a token only when ℓ_s or the target log q_A is non-finite (spec 2.2 step 9).

Run: .venv/bin/python -m pytest -q tests/vocab_parallel/test_reference_parity.py     (seconds, one process)
"""

from __future__ import annotations

import math

import pytest
import torch

from avsd_megatron.hook.batch import build_avsd_batch
from avsd_megatron.hook.loss import AVSDLossConfig, TeacherOutputs, avsd_microbatch_loss
from avsd_megatron.vocab_parallel import (
    CandidateSet,
    avsd_candidate_loss_from_teacher,
    avsd_full_vocab_loss,
    avsd_sampled_token_loss,
)

V, N, M, TAU, EPS = 64, 10, 3, 0.7, 1e-8
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _case(seed: int = 3, num_views: int = M):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0
    views = 0.7 * student + 1.5 * torch.randn(num_views, N, V, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(student / TAU, dim=-1), 1, generator=g).squeeze(-1)
    mask = torch.rand(N, generator=g) > 0.2
    return student, views, y, mask


def _grad_of(fn, logits: torch.Tensor):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------------------------
# float64 re-derivations of the reference (spec 2.2 tinker loss, 2.3 candidate loss, 2.4 single-view JSD)


def ref_tinker_loss(logits, views, y, mask, *, mode="avsd", tau_e=0.0, detach_gate=False):
    """-sum_valid A ell_s + sum_valid tau_e (1 - g) ell_s, A = stopgrad(T - ell_s); valid = mask & finite(ell_s, T)."""
    ell_s = torch.log_softmax(logits / TAU, dim=-1).gather(-1, y[:, None]).squeeze(-1)  # [N]
    ell_m = torch.log_softmax(views / TAU, dim=-1).gather(-1, y.expand(views.shape[0], -1)[..., None]).squeeze(-1)
    total = logits.new_zeros(())
    count = 0
    for t in range(ell_s.shape[0]):
        s, lm = ell_s[t], [ell_m[m, t] for m in range(ell_m.shape[0])]
        finite_views = [v for v in lm if math.isfinite(float(v))]
        log_q_a = torch.logsumexp(torch.stack(finite_views), 0) - math.log(len(lm)) if finite_views else None
        if mode == "arithmetic":
            target = log_q_a
        else:
            log_q_g = sum(lm) / len(lm)
            gap = torch.clamp(log_q_a - log_q_g, min=0.0) if finite_views else None
            deltas = [v - s for v in lm]
            dbar = sum(deltas) / len(deltas)
            dabs = sum(d.abs() for d in deltas) / len(deltas)
            gate = (dbar.abs() / (dabs + EPS)) * dbar.abs() / (dbar.abs() + gap + EPS) if gap is not None else None
            target = log_q_g + gate * gap if mode == "avsd" and gate is not None else log_q_g
        finite = target is not None and math.isfinite(float(s.detach())) and math.isfinite(float(target.detach()))
        if not (mask[t] and finite):
            continue
        count += 1
        total = total - (target - s).detach() * s
        if tau_e:
            g = gate.detach() if detach_gate else gate
            total = total + tau_e * (1.0 - g) * s
    return total, count


def ref_candidate_loss(z_s_full, ids, log_p_m, mask, *, beta, tau_e, detach_gate):
    """Spec 2.3 with uniform weights, avsd mode/gate, every candidate on the support, detached q_T, no clip."""
    log_p_s = torch.log_softmax(z_s_full.gather(-1, ids) / TAU, dim=-1)  # [N, K]
    log_q_g = torch.log_softmax(log_p_m.mean(0), dim=-1)
    q_a = log_p_m.exp().mean(0)
    log_q_a = torch.log(torch.clamp(q_a / torch.clamp(q_a.sum(-1, keepdim=True), min=EPS), min=EPS))
    gap = torch.clamp(log_q_a - log_q_g, min=0.0)
    delta = log_p_m - log_p_s[None]
    dbar, dabs = delta.mean(0), delta.abs().mean(0)
    gate = (dbar.abs() / (dabs + EPS)) * dbar.abs() / (dbar.abs() + gap + EPS)
    log_q_t = torch.log_softmax(log_q_g + gate * gap, dim=-1).detach()
    p, q = log_p_s.exp(), log_q_t.exp()
    log_mix = torch.log((1 - beta) * p + beta * q)
    jsd = (beta * q * (log_q_t - log_mix) + (1 - beta) * p * (log_p_s - log_mix)).sum(-1)
    entropy = -(p * log_p_s).sum(-1)
    lam = (p * (gate.detach() if detach_gate else gate)).sum(-1)
    per_token = jsd - tau_e * (1.0 - lam) * entropy
    return torch.where(mask, per_token, 0.0).sum()


def ref_single_view_jsd(logits, view, mask, *, beta, clip, per_entry):
    """Spec 2.4 (TRL generalized_jsd_loss on z / tau) with the reference's clamp per (token, entry), or per token."""
    log_p = torch.log_softmax(logits / TAU, dim=-1)
    log_q = torch.log_softmax(view / TAU, dim=-1)
    log_mix = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), dim=0)
    terms = beta * log_q.exp() * (log_q - log_mix) + (1 - beta) * log_p.exp() * (log_p - log_mix)  # [N, V]
    per_token = terms.clamp(max=clip).sum(-1) if per_entry else terms.sum(-1).clamp(max=clip)
    return torch.where(mask, per_token, 0.0).sum()


# ----------------------------------------------------------------------------------------------------------------
# 1. pad-id tokens inside completions


def test_pad_tokens_inside_completions_are_masked_like_the_reference():
    pad = 5
    student = [[1, 2], [3], [4, 6, 7]]
    teacher = [[[8, 9]], [[10]], [[11, 12]]]
    completions = [[20, pad, 21], [pad], [22, 23, pad]]  # a pad mid-completion, alone, and as the stop token
    batch = build_avsd_batch(student, teacher, completions, view_names=("v",), micro_batch_size=3, pad_id=pad)
    labels = torch.tensor([t for c in completions for t in c])
    labels[labels == pad] = -100  # the reference's collator
    (mb,) = batch.micro_batches
    assert mb.loss_mask.tolist() == (labels != -100).tolist()
    kept = build_avsd_batch(student, teacher, completions, view_names=("v",), micro_batch_size=3, pad_id=pad,
                            train_pad_tokens=True)
    assert kept.micro_batches[0].loss_mask.all()
    masks = [[False, True, True], [True], [True, True, True]]  # completion masks and the pad rule combine
    both = build_avsd_batch(student, teacher, completions, view_names=("v",), micro_batch_size=3, pad_id=pad,
                            completion_masks=masks)
    assert both.micro_batches[0].loss_mask.tolist() == [False, False, True, False, True, True, False]

    # the loss over the batch equals the reference's masked tinker loss on the same logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(mb.num_tokens, 32, generator=g, dtype=torch.float64)
    view_logits = logits[None] + torch.randn(1, mb.num_tokens, 32, generator=g, dtype=torch.float64)
    y = mb.token_ids
    ell_m = torch.log_softmax(view_logits / TAU, -1).gather(-1, y[None, :, None]).squeeze(-1)
    ref_loss, ref_count = ref_tinker_loss(logits, view_logits, y, labels != -100, mode="consensus")
    loss, count, _ = avsd_sampled_token_loss(logits, y, ell_m, mb.loss_mask, temperature=TAU, mode="consensus",
                                             gate="avsd", group=None)
    assert int(count) == ref_count == 4
    torch.testing.assert_close(loss, ref_loss, **TIGHT)


def test_train_config_masks_pad_tokens_by_default():
    from avsd_megatron.training.config import AVSDConfig

    assert AVSDConfig().train_pad_tokens is False


# ----------------------------------------------------------------------------------------------------------------
# 2. the epistemic gate's gradient


@pytest.mark.parametrize("detach_gate", [False, True])
def test_sampled_loss_epistemic_gate_gradient_matches_reference_rule(detach_gate):
    student, views, y, mask = _case()
    ell_m = torch.log_softmax(views / TAU, -1).gather(-1, y.expand(M, -1)[..., None]).squeeze(-1)
    tau_e = 0.5  # large, so the gradient through g is far above round-off
    ref_loss, ref_grad = _grad_of(lambda s: ref_tinker_loss(s, views, y, mask, tau_e=tau_e,
                                                           detach_gate=detach_gate)[0], student)
    loss, grad = _grad_of(lambda s: avsd_sampled_token_loss(
        s.float(), y, ell_m.float(), mask, temperature=TAU, mode="avsd", gate="avsd", group=None,
        epistemic_tau=tau_e, detach_gate=detach_gate)[0], student.float())
    torch.testing.assert_close(loss.double(), ref_loss, **TIGHT)
    torch.testing.assert_close(grad.double(), ref_grad, **TIGHT)
    _, other = _grad_of(lambda s: ref_tinker_loss(s, views, y, mask, tau_e=tau_e, detach_gate=not detach_gate)[0],
                        student)
    assert (other - ref_grad).abs().max() > 1e-3, "the flag must change the gradient"


@pytest.mark.parametrize("detach_gate", [False, True])
def test_candidate_loss_epistemic_gate_gradient_matches_reference_rule(detach_gate):
    student, views, _, mask = _case(seed=5)
    k = 12
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])  # [N, K] distinct candidates
    log_p_m = torch.log_softmax(views.gather(-1, ids.expand(M, -1, -1)) / TAU, dim=-1)  # [M, N, K]
    support = torch.ones(N, k, dtype=torch.bool)
    tau_e, beta = 0.5, 0.5
    ref_loss, ref_grad = _grad_of(lambda s: ref_candidate_loss(s, ids, log_p_m, mask, beta=beta, tau_e=tau_e,
                                                              detach_gate=detach_gate), student)
    cands = CandidateSet(ids=ids, mask=support, view_logprobs=log_p_m.float())
    loss, grad = _grad_of(lambda s: avsd_candidate_loss_from_teacher(
        s, cands, mask, temperature=TAU, mode="avsd", gate="avsd", beta=beta, token_clip=0.0, group=None,
        epistemic_tau=tau_e, detach_gate=detach_gate)[0], student.float())
    torch.testing.assert_close(loss.double(), ref_loss, **TIGHT)
    torch.testing.assert_close(grad.double(), ref_grad, **TIGHT)
    _, other = _grad_of(lambda s: ref_candidate_loss(s, ids, log_p_m, mask, beta=beta, tau_e=tau_e,
                                                     detach_gate=not detach_gate), student)
    assert (other - ref_grad).abs().max() > 1e-4, "the flag must change the gradient"


def test_loss_config_passes_detach_gate_to_the_kernel():
    from avsd_megatron.training.config import AVSDConfig

    assert AVSDConfig().loss_config(temperature=1.0).detach_gate is False  # the reference
    assert AVSDConfig(detach_gate=True).loss_config(temperature=1.0).detach_gate is True


# ----------------------------------------------------------------------------------------------------------------
# 3. single-view full-vocabulary JSD clamp


def _single_view_batch(y: torch.Tensor, mask: torch.Tensor):
    comps = [y[: N // 2].tolist(), y[N // 2 :].tolist()]
    masks = [mask[: N // 2].tolist(), mask[N // 2 :].tolist()]
    return build_avsd_batch([[1], [2]], [[[3]], [[4]]], comps, view_names=("full_solution",), micro_batch_size=2,
                            pad_id=V + 1, completion_masks=masks).micro_batches[0]


@pytest.mark.parametrize("scope", ["entry", "token"])
def test_single_view_full_vocab_clip_matches_reference_rule(scope):
    student, views, y, mask = _case(seed=9, num_views=1)
    clip, beta = 0.002, 0.5  # small enough that most tokens' JSD and some entries exceed it
    ref_loss, ref_grad = _grad_of(lambda s: ref_single_view_jsd(s, views[0], mask, beta=beta, clip=clip,
                                                               per_entry=scope == "entry"), student)
    loss, grad = _grad_of(lambda s: avsd_full_vocab_loss(
        s, mask, temperature=TAU, mode="single", gate="avsd", beta=beta, token_clip=clip, group=None,
        view_logits=views.float(), clip_scope=scope, chunk_size=3)[0], student.float())
    torch.testing.assert_close(loss.double(), ref_loss, **TIGHT)
    torch.testing.assert_close(grad.double(), ref_grad, **TIGHT)
    if scope == "token":  # the per-token clamp zeroes whole tokens' gradients; the reference's does not
        dead = (grad.abs().sum(-1) == 0) & mask
        assert dead.sum() >= 1


def test_hook_single_view_full_vocab_defaults_to_the_reference_entry_clip():
    student, views, y, mask = _case(seed=9, num_views=1)
    mb = _single_view_batch(y, mask)
    hidden_size = 8
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, N, hidden_size, generator=g)
    weight = torch.randn(V, hidden_size, generator=g)
    teacher = TeacherOutputs(view_hidden=hidden, view_output_weight=weight)
    cfg = AVSDLossConfig(temperature=TAU, loss="full_vocab", mode="single", token_clip=0.002,
                         normalization="global_token_mean")
    assert cfg.single_view_clip == "entry"
    loss, _, _ = avsd_microbatch_loss(student.float(), mb, teacher, cfg, tp_group=None)
    view_logits = (hidden[0] @ weight.t()).double()
    for per_entry, same in ((True, True), (False, False)):
        ref = ref_single_view_jsd(student, view_logits, mask, beta=0.5, clip=0.002, per_entry=per_entry)
        assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6) is same


# ----------------------------------------------------------------------------------------------------------------
# 4. arithmetic mode keeps a token with some -inf views


def test_arithmetic_mode_drops_a_token_only_when_student_or_target_is_not_finite():
    student, views, y, mask = _case(seed=11)
    mask[:] = True
    views[0, 1, y[1]] = -math.inf  # one view cannot produce y_1: log q_A stays finite -> kept
    views[:, 2, y[2]] = -math.inf  # no view can: log q_A = -inf -> dropped
    student[3, y[3]] = -math.inf  # the student cannot: dropped
    views[1, 4, y[4]] = -math.inf  # consensus / avsd lose this token (log q_G = -inf), arithmetic keeps it
    ell_m = torch.log_softmax(views / TAU, -1).gather(-1, y.expand(M, -1)[..., None]).squeeze(-1)
    for mode, expected_count in (("arithmetic", N - 2), ("consensus", N - 4), ("avsd", N - 4)):
        ref_loss, ref_grad = _grad_of(lambda s: ref_tinker_loss(s, views, y, mask, mode=mode)[0], student)
        _, ref_count = ref_tinker_loss(student, views, y, mask, mode=mode)
        out = {}

        def kernel(s):
            loss, out["count"], out["metrics"] = avsd_sampled_token_loss(
                s, y, ell_m.float(), mask, temperature=TAU, mode=mode, gate="avsd", group=None)
            return loss

        loss, grad = _grad_of(kernel, student.float())
        assert int(out["count"]) == ref_count == expected_count, mode
        torch.testing.assert_close(loss.double(), ref_loss, **TIGHT)
        torch.testing.assert_close(grad.double(), ref_grad, **TIGHT)
        assert all(math.isfinite(v) for m in out["metrics"].values() for v in m.tolist()), mode
