"""Advantage estimators: GRPO group-relative advantages, GAE, and whitening.

Pure torch functions; no model, no state.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .registry import Registry

# outcome advantage estimators: (rewards [N], group_size, scale, eps) -> one advantage per answer [N],
# broadcast over its tokens by the trainer
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")

__all__ = ["ADVANTAGE_ESTIMATORS", "group_advantages", "zero_std_group_fraction", "whiten", "gae_advantages"]


def _check_groups(rewards: Tensor, group_size: int, *, min_group_size: int) -> int:
    """Validate the group layout and return the number of groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor of shape [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < min_group_size:
        if min_group_size >= 2:
            raise ValueError(
                "GRPO needs at least 2 answers per prompt (group_size=1 gives every answer zero "
                f"advantage); set group_size >= 2 (got group_size={group_size})"
            )
        raise ValueError(f"group_size must be >= {min_group_size}, got {group_size}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards N={n} is not divisible by group_size={group_size}; rewards must be laid "
            f"out group-contiguously as N = num_prompts * group_size"
        )
    return n // group_size


def _group_stats(grouped: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """NaN-aware per-group statistics of a [num_groups, G] tensor.

    Returns (valid, mean, unbiased_std, zero_spread), where zero_spread marks groups whose valid
    values are all exactly equal or that have fewer than 2 valid values.
    """
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)
    sq_dev = torch.where(valid, (grouped - mean) ** 2, torch.zeros_like(grouped))
    var = sq_dev.sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    std = var.sqrt()
    inf = torch.full_like(grouped, float("inf"))
    gmax = torch.where(valid, grouped, -inf).amax(dim=1, keepdim=True)
    gmin = torch.where(valid, grouped, inf).amin(dim=1, keepdim=True)
    zero_spread = (count < 2) | (gmax == gmin)
    return valid, mean, std, zero_spread


@ADVANTAGE_ESTIMATORS.register("grpo")
def group_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO group-relative advantages (outcome supervision).

    Rewards are laid out group-contiguously: rows i*G .. i*G+G-1 are the G answers to prompt i.
    For answer j of group g:

        A_j = (r_j - mean_g) / (std_g + eps)     if scale
        A_j =  r_j - mean_g                      otherwise (Dr. GRPO: no std scaling)

    where mean_g and std_g are taken over the *valid* (non-NaN) rewards of group g, and std_g is the
    UNBIASED sample standard deviation (Bessel correction, divide by n_valid - 1), as in TRL
    (``torch.std``) and verl:

        std_g = sqrt( sum_j (r_j - mean_g)^2 / (n_valid_g - 1) )

    Special cases:
      * NaN rewards (unscorable samples) are excluded from mean_g / std_g and get advantage 0.
      * A group whose valid rewards are all equal, or that has fewer than 2 valid rewards, carries no
        learning signal: every member gets exactly 0 (not 0/eps round-off noise).

    Args:
        rewards: float tensor [N], N = num_prompts * group_size.
        group_size: G, answers per prompt; must be >= 2.
        scale: divide by (std_g + eps).
        eps: added to std_g in the denominator.

    Returns:
        advantages [N] (floating dtype of ``rewards``; float32 if rewards are integer/bool).

    Raises:
        ValueError: group_size < 2, or N not divisible by group_size.
    """
    num_groups = _check_groups(rewards, group_size, min_group_size=2)
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.float32)
    grouped = rewards.reshape(num_groups, group_size)
    valid, mean, std, zero_spread = _group_stats(grouped)
    adv = grouped - mean
    if scale:
        adv = adv / (std + eps)
    keep = valid & ~zero_spread
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def zero_std_group_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups with zero reward spread (no GRPO learning signal).

        frac = #{g : valid rewards of g all equal, or n_valid_g < 2} / num_groups

    NaN rewards are ignored, as in :func:`group_advantages`. With group_size=1 every group has fewer
    than 2 values, so the fraction is 1.0.

    Raises:
        ValueError: group_size < 1, or N not divisible by group_size.
    """
    num_groups = _check_groups(rewards, group_size, min_group_size=1)
    if num_groups == 0:
        return 0.0
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.float32)
    _, _, _, zero_spread = _group_stats(rewards.reshape(num_groups, group_size))
    return float(zero_spread.sum().item()) / num_groups


def whiten(values: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening (used for PPO advantages).

        mean = sum(m * x) / sum(m)
        var  = sum(m * (x - mean)^2) / (sum(m) - 1)        (unbiased, Bessel; as TRL's masked_whiten)
        y    = (x - mean) / sqrt(var + eps)                 if shift_mean
        y    = (x - mean) / sqrt(var + eps) + mean          otherwise (scale only, keep the mean)

    Statistics are taken over the elements where mask is nonzero (all elements if mask is None).
    Positions where mask == 0 are set to 0 in the output. With fewer than 2 valid elements var is 0.
    """
    if mask is None:
        mask_b = torch.ones_like(values, dtype=torch.bool)
    else:
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")
        mask_b = mask.bool()
    zeros = torch.zeros_like(values)
    count = mask_b.sum().to(values.dtype)
    mean = torch.where(mask_b, values, zeros).sum() / count.clamp(min=1)
    sq_dev = torch.where(mask_b, (values - mean) ** 2, zeros)
    var = sq_dev.sum() / (count - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask_b, out, zeros)


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> Tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over token sequences.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                          (returns, the value targets)

    with V_{t+1} = 0 and A_{t+1} = 0 after the last valid (mask = 1) token of each row (the episode
    ends there). Masks are right-padded (ones then zeros); rewards/values at padded positions are
    ignored. Advantages and returns are 0 at masked positions. The computation follows whatever
    autograd state the inputs carry; pass detached values for PPO.

    Args:
        rewards, values, mask: [B, T].
    Returns:
        (advantages [B, T], returns [B, T])
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and mask must all have the same [B, T] shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    mask_b = mask.bool()
    m = mask_b.to(values.dtype)
    v = torch.where(mask_b, values, torch.zeros_like(values))  # where, not *, so inf/NaN padding is dropped
    r = torch.where(mask_b, rewards, torch.zeros_like(rewards)).to(v.dtype)
    T = rewards.shape[1]
    last = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    adv_rev = []
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv_rev.append(last)
        next_value = v[:, t]
    advantages = torch.stack(adv_rev[::-1], dim=1)
    returns = (advantages + v) * m
    return advantages, returns
