"""Tests for avsd_megatron.signals.grpo: group-normalised advantages, by hand on toy groups.

Run: .venv/bin/python -m pytest -q tests/signals/test_grpo.py        (milliseconds)
"""

from __future__ import annotations

import math

import pytest
import torch

from avsd_megatron.signals.grpo import group_advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    out = group_advantages(rewards)
    # group 0: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s0 = math.sqrt(1.0 / 3.0)
    # group 1: mean 0.75, deviations 0.25, 0.25, 0.25, -0.75 -> std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    expected = [[0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)],
                [0.25 / 0.5001, 0.25 / 0.5001, 0.25 / 0.5001, -0.75 / 0.5001],
                [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(out.advantages, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, torch.tensor([0.5, 0.75, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out.std, torch.tensor([s0, 0.5, 0.0], dtype=torch.float64))
    assert out.zero_variance.tolist() == [False, False, True]


def test_group_advantages_scale_none_only_centres():
    out = group_advantages(torch.tensor([[3.0, 1.0], [2.0, 2.0]]), scale="none")
    assert out.advantages.tolist() == [[1.0, -1.0], [0.0, 0.0]]
    assert out.advantages.dtype == torch.float32


def test_zero_variance_group_is_exactly_zero_despite_round_off():
    out = group_advantages(torch.full((1, 3), 0.1, dtype=torch.float32))  # the mean of 0.1s is not exactly 0.1
    assert out.zero_variance.tolist() == [True] and torch.count_nonzero(out.advantages) == 0


@pytest.mark.parametrize(
    "rewards,kwargs,match",
    [
        (torch.ones(4), {}, r"\[G prompts, n >= 2 completions\]"),
        (torch.ones(2, 1), {}, r"n >= 2"),
        (torch.tensor([[1.0, float("nan")]]), {}, "finite"),
        (torch.ones(1, 2), dict(scale="batch"), "scale='batch' is not one of"),
        (torch.ones(1, 2), dict(eps=0.0), "eps=0.0 must be finite and > 0"),
    ],
)
def test_group_advantages_rejects_bad_input(rewards, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, **kwargs)
