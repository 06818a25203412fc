"""GRPO's group-normalised advantages (the paper's RL baseline; TRL `GRPOTrainer`, the OPSD repository's settings).

For G prompts with n sampled completions each and scalar rewards r [G, n]:

    mean_g = (1/n) Σ_i r_{g,i}
    std_g  = sqrt( Σ_i (r_{g,i} − mean_g)² / (n − 1) )          (Bessel-corrected, like torch.std / TRL)
    A_{g,i} = r_{g,i} − mean_g                                  scale='none'  (Dr. GRPO)
    A_{g,i} = (r_{g,i} − mean_g) / (std_g + eps)                scale='group' (TRL's default, `scale_rewards="group"`,
                                                                               eps = 1e-4 as in TRL)

A group whose rewards are all equal (std_g = 0) has A = 0 for every completion, whatever the scale: it carries no
learning signal, and its share of the step is logged (`zero_variance`). Every token of completion (g, i) gets the
advantage A_{g,i} in the sampled-token policy-gradient loss (`vocab_parallel.policy_gradient_loss`).

Pure torch, no communication: the trainer computes this per DP rank on whole groups (a prompt's n completions never
span two ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["REWARD_SCALES", "GroupAdvantages", "group_advantages"]

REWARD_SCALES = ("group", "none")
"""How rewards are scaled after the group mean is subtracted (TRL `scale_rewards`)."""
DEFAULT_STD_EPS = 1e-4
"""TRL adds 1e-4 to the group std before dividing."""


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-completion advantages and the group statistics they came from."""

    advantages: Tensor
    """[G, n] A_{g,i} (the compute dtype: fp32, or fp64 for fp64 rewards)."""
    mean: Tensor
    """[G] group mean reward."""
    std: Tensor
    """[G] Bessel-corrected group std (0 for n = 1)."""
    zero_variance: Tensor
    """[G] bool: every reward of the group is equal (A = 0)."""


def group_advantages(rewards: Tensor, *, scale: str = "group", eps: float = DEFAULT_STD_EPS) -> GroupAdvantages:
    """Group-normalised advantages of rewards [G, n] (module docstring).

    Args:
        rewards: [G, n] finite float rewards, completions of a prompt along the last axis; n >= 2.
        scale: 'group' divides by std_g + eps; 'none' only subtracts the mean.
        eps: added to std_g (> 0).
    Returns:
        GroupAdvantages.
    Raises:
        ValueError: not [G, n] with n >= 2, a non-finite reward, unknown scale, eps <= 0.
        TypeError: non-floating rewards.
    """
    if not isinstance(rewards, Tensor) or not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {getattr(rewards, 'dtype', type(rewards))}")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [G prompts, n >= 2 completions], got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale={scale!r} is not one of {REWARD_SCALES}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r} must be finite and > 0")
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    mean = r.mean(dim=1)
    std = r.std(dim=1)  # unbiased, as TRL
    zero_variance = (r == r[:, :1]).all(dim=1)  # exact: a std of round-off must not scale noise up to +-1
    centred = torch.where(zero_variance[:, None], 0.0, r - mean[:, None])
    advantages = centred / (std[:, None] + eps) if scale == "group" else centred
    return GroupAdvantages(advantages=advantages, mean=mean, std=std, zero_variance=zero_variance)
