"""The candidate loss's sampled-token metrics (log p_s, log p_m, log q_T and their difference at y_t over K_t)
against a float64 re-derivation from the definitions: K_t = the views' top-k union plus y_t, each distribution
renormalised over K_t, consensus q_G ∝ exp(mean_m log p_m)."""

import pytest
import torch

from avsd_megatron.vocab_parallel.candidate_loss import avsd_candidate_loss

M, N, V, K, TAU = 3, 7, 40, 4, 0.7
NAMES = ("full_solution", "partial_solution", "answer_only")


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g) * 2
    views = torch.randn(M, N, V, generator=g) * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = views[0, 0].argmax()  # one y_t already in K_t (not appended), the others mostly appended
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    return student, views, y, mask


def _float64_at_y(student, views, y, mode):
    """Per token t: (log p_s(y_t), [log p_m(y_t)]_m, log q_T(y_t)) over K_t, in float64, by Python loops."""
    rows = []
    for t in range(N):
        support = sorted({int(i) for m in range(M) for i in views[m, t].topk(K).indices} | {int(y[t])})
        idx = torch.tensor(support)
        slot = support.index(int(y[t]))
        log_p_s = torch.log_softmax(student[t, idx].double() / TAU, dim=0)
        log_p_m = torch.log_softmax(views[:, t, idx].double() / TAU, dim=1)  # [M, |K_t|]
        if mode == "consensus":
            log_q = torch.log_softmax(log_p_m.mean(dim=0), dim=0)
        else:  # single: view 0
            log_q = log_p_m[0]
        rows.append((log_p_s[slot].item(), log_p_m[:, slot].tolist(), log_q[slot].item()))
    return rows


def _mean(metrics, name):
    total, count = metrics[name].tolist()
    return total / count


@pytest.mark.parametrize("mode", ["consensus", "single"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_token_metrics_match_float64_definitions(mode, seed):
    student, views, y, mask = _case(seed)
    used_views = views if mode == "consensus" else views[:1]
    names = NAMES if mode == "consensus" else NAMES[:1]
    _, count, metrics = avsd_candidate_loss(
        student, y, used_views, mask, k=K, temperature=TAU, mode=mode, gate="avsd", beta=0.5, token_clip=0.0,
        group=None, vocab_size=V, view_names=names,
    )
    ref = _float64_at_y(student, used_views if mode == "consensus" else views, y, mode)
    if mode == "single":  # the single-view run's K_t holds only view 0's top-k
        ref = []
        for t in range(N):
            support = sorted({int(i) for i in views[0, t].topk(K).indices} | {int(y[t])})
            idx, slot = torch.tensor(support), support.index(int(y[t]))
            log_p_s = torch.log_softmax(student[t, idx].double() / TAU, dim=0)[slot].item()
            log_p_0 = torch.log_softmax(views[0, t, idx].double() / TAU, dim=0)[slot].item()
            ref.append((log_p_s, [log_p_0], log_p_0))
    kept = [r for r, keep in zip(ref, mask.tolist()) if keep]
    assert int(count) == len(kept) == int(metrics["mv_tinker_student_logprob_mean"][1])

    def mean(values):
        return sum(values) / len(values)

    assert _mean(metrics, "mv_tinker_student_logprob_mean") == pytest.approx(mean([r[0] for r in kept]), abs=1e-5)
    assert _mean(metrics, "mv_tinker_target_logprob_mean") == pytest.approx(mean([r[2] for r in kept]), abs=1e-5)
    assert _mean(metrics, "mv_tinker_advantage_mean") == pytest.approx(
        mean([r[2] - r[0] for r in kept]), abs=1e-5)
    for m, name in enumerate(names):
        assert _mean(metrics, f"mv_tinker_view_logprob_{name}") == pytest.approx(
            mean([r[1][m] for r in kept]), abs=1e-5)


def test_view_names_must_match_the_views():
    student, views, y, mask = _case(0)
    with pytest.raises(ValueError, match="view_names has 2 names"):
        avsd_candidate_loss(student, y, views, mask, k=K, temperature=TAU, mode="avsd", gate="avsd", beta=0.5,
                            token_clip=0.0, group=None, vocab_size=V, view_names=NAMES[:2])


def test_default_view_names_number_the_views():
    student, views, y, mask = _case(0)
    _, _, metrics = avsd_candidate_loss(student, y, views, mask, k=K, temperature=TAU, mode="avsd", gate="avsd",
                                        beta=0.5, token_clip=0.0, group=None, vocab_size=V)
    assert {f"mv_tinker_view_logprob_view{m}" for m in range(M)} <= set(metrics)
