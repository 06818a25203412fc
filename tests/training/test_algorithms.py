"""Tests for avsd_megatron.training.algorithms: the GRPO targets step (rewards -> advantages -> per-token advantages)
and the policy-gradient kernel it feeds, in one process. The TP / PP / DP equality of a GRPO step with TP1 and the
zero gradient of zero-variance groups inside Megatron's schedules are in tests/hook/test_avsd_step.py (integration);
the DP reduction of the GRPO metrics runs on 2 gloo ranks here (integration).

Run: .venv/bin/python -m pytest -q tests/training/test_algorithms.py      (seconds)
"""

from __future__ import annotations

import pytest
import torch

from avsd_megatron.hook.batch import build_avsd_batch
from avsd_megatron.rollout.engine import Completion
from avsd_megatron.training.algorithms import GRPOTargets, token_advantages
from avsd_megatron.training.config import ConfigError, from_dict
from avsd_megatron.training.tasks import Graded
from avsd_megatron.vocab_parallel import policy_gradient_loss

TAU = 0.7


class _FakeTask:
    """A grader with fixed outcomes per completion."""

    def __init__(self, outcomes):
        self.outcomes = outcomes

    def rewards(self, examples, prompts, completions, grpo):
        value = {"correct": grpo.correct_reward, "wrong": grpo.wrong_reward, "unparseable": grpo.failure_reward}
        assert len(completions) == len(self.outcomes)
        return [Graded(o, value[o]) for o in self.outcomes]


def _cfg(**grpo):
    return from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}, "algorithm": "grpo", "rollout": {"n": 3},
                      "grpo": grpo})


def _completions(lengths):
    return [Completion(tuple(range(1, k + 1)), "x", "stop") for k in lengths]


def test_grpo_rows_advantages_and_metrics():
    outcomes = ["correct", "wrong", "unparseable", "wrong", "wrong", "wrong"]  # group 2 has zero variance
    targets = GRPOTargets(_FakeTask(outcomes), _cfg(failure_reward=-1.0, scale_rewards="none"))
    rows = targets.rows([None, None], [None, None], _completions([2, 1, 3, 1, 2, 2]))
    assert rows.ids is None and rows.masks is None
    mean = (1.0 + 0.0 - 1.0) / 3
    assert rows.advantages == pytest.approx([1.0 - mean, -mean, -1.0 - mean, 0.0, 0.0, 0.0])
    m = rows.metrics
    assert m["reward/mean"] == pytest.approx(0.0)
    assert m["reward/std"] == pytest.approx((1.0 + 0.0) / 2)  # mean over groups of the Bessel std: 1 and 0
    assert m["grpo/zero_variance_frac"] == 0.5
    assert m["reward/correct_frac"] == pytest.approx(1 / 6) and m["reward/unparseable_frac"] == pytest.approx(1 / 6)
    assert [x["outcome"] for x in rows.extras] == outcomes


def grpo_rows_dp_rank(outcomes_per_rank):
    """GRPOTargets.rows on each of 2 DP ranks (the world group) with its own outcomes; returns the metrics."""
    import torch.distributed as dist

    rank = dist.get_rank()
    targets = GRPOTargets(_FakeTask(outcomes_per_rank[rank]), _cfg(), dp_group=dist.group.WORLD)
    return targets.rows([None], [None], _completions([1, 1, 1])).metrics


@pytest.mark.integration
def test_grpo_metrics_are_summed_over_data_parallel_ranks():
    from avsd_megatron.testing import run_on_ranks

    outcomes = [["correct", "wrong", "wrong"], ["wrong", "wrong", "wrong"]]  # rank 1's group has zero variance
    metrics = run_on_ranks(grpo_rows_dp_rank, 2, outcomes, timeout=120)
    assert metrics[0] == metrics[1]
    assert metrics[0]["grpo/zero_variance_frac"] == 0.5
    assert metrics[0]["reward/mean"] == pytest.approx(1 / 6)
    assert metrics[0]["reward/correct_frac"] == pytest.approx(1 / 6)
    assert metrics[0]["reward/std"] == pytest.approx((3 ** -0.5 + 0.0) / 2)  # Bessel std of {1, 0, 0} and of {0, 0, 0}


def test_token_advantages_follow_the_batch_token_order():
    comps = [[5, 6], [7], [8, 9, 10], [11]]
    batch = build_avsd_batch([[1], [2], [3], [4]], None, comps, view_names=(), micro_batch_size=2, pad_id=0)
    assert batch.num_views == 0 and batch.micro_batches[0].teacher is None and batch.teacher_seq_length == 0
    per_mb = token_advantages(batch, [0.5, -1.0, 2.0, 0.0])
    assert [a.tolist() for a in per_mb] == [[0.5, 0.5, -1.0], [2.0, 2.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match="3 advantages for the batch's 4 completions"):
        token_advantages(batch, [0.0] * 3)


def test_policy_gradient_loss_is_minus_advantage_times_logprob_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, 40, (6,), generator=g)
    adv = torch.tensor([1.0, 1.0, -0.5, -0.5, 0.0, 2.0])
    mask = torch.tensor([True, True, True, False, True, True])
    leaf = logits.clone().requires_grad_()
    ell = torch.log_softmax(leaf / TAU, -1).gather(-1, y[:, None]).squeeze(-1)
    ref = -(torch.where(mask, adv.double() * ell, 0.0)).sum()
    ref.backward()
    got_leaf = logits.float().clone().requires_grad_()
    loss, count, metrics = policy_gradient_loss(got_leaf, y, adv, mask, temperature=TAU, group=None)
    loss.backward()
    assert int(count) == 5
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_leaf.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)
    assert metrics["pg_advantage_mean"].tolist() == pytest.approx([3.5, 5.0])


def test_zero_advantages_give_exactly_zero_gradient():
    logits = torch.randn(4, 10).requires_grad_()
    loss, _, _ = policy_gradient_loss(logits, torch.tensor([1, 2, 3, 4]), torch.zeros(4),
                                      torch.ones(4, dtype=torch.bool), temperature=TAU, group=None)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_grpo_config_checks():
    with pytest.raises(ConfigError, match=r"algorithm='grpo' needs rollout.n >= 2"):
        from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}, "algorithm": "grpo"})
    with pytest.raises(ConfigError, match=r"grpo.correct_reward=0.0 must exceed"):
        _cfg(correct_reward=0.0)
    with pytest.raises(ConfigError, match="grpo.scale_rewards='batch' is not one of"):
        _cfg(scale_rewards="batch")
    cfg = _cfg()
    loss = cfg.loss_config(vocab_size=100)
    assert loss.loss == "policy_gradient" and loss.normalization == cfg.avsd.normalization
    assert cfg.teacher_config().kind == "live"  # no θ₀ copy for an algorithm without a teacher
    avsd = from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}})
    assert avsd.loss_config().loss == "sampled" and avsd.teacher_config().kind == "frozen"
    with pytest.raises(ConfigError, match="avsd.loss='policy_gradient' is not one of"):
        from_dict({"data": {"sources": ["x.jsonl"], "task": "math"}, "avsd": {"loss": "policy_gradient"}})
