"""Advantage estimators: GRPO group-relative advantages, GAE, and whitening.

Pure torch functions; no model, no state.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .registry import Registry

# outcome advantage estimators: (rewards [N], group_size, scale, eps) -> one advantage per answer [N],
# broadcast over its tokens by the trainer
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "zero_std_group_fraction",
    "zero_spread_groups",
    "whiten",
    "gae_advantages",
]


def _check_groups(rewards: Tensor, group_size: int, *, min_group_size: int, method: str = "GRPO") -> int:
    """Validate the group layout and return the number of groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor of shape [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < min_group_size:
        if min_group_size >= 2:
            raise ValueError(
                f"{method} needs at least 2 answers per prompt (group_size=1 gives every answer zero "
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


def _grouped(rewards: Tensor, group_size: int, *, min_group_size: int, method: str = "GRPO") -> Tensor:
    """The rewards as a float [num_groups, group_size] tensor, after ``_check_groups``."""
    num_groups = _check_groups(rewards, group_size, min_group_size=min_group_size, method=method)
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.float32)
    return rewards.reshape(num_groups, group_size)


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
    grouped = _grouped(rewards, group_size, min_group_size=2)
    valid, mean, std, zero_spread = _group_stats(grouped)
    adv = grouped - mean
    if scale:
        adv = adv / (std + eps)
    keep = valid & ~zero_spread
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """RLOO, REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740): each answer against the
    mean of the OTHER answers to its prompt.

        A_i = r_i - (1 / (n_g - 1)) * sum_{j in g, j != i} r_j  =  (n_g / (n_g - 1)) * (r_i - mean_g)

    over the n_g valid (non-NaN) rewards of group g (n_g = G when every answer was scored). This is
    the Dr. GRPO advantage (r_i - mean_g) times n_g / (n_g - 1).

    ``scale`` and ``eps`` are accepted for the registry's common signature and are UNUSED: the paper's
    estimator has no std scaling, and honouring the config's default ``scale_rewards=true`` would turn
    RLOO into GRPO times n_g / (n_g - 1), so the flag does not change it. RLOO's KL term belongs in
    the sequence reward (R = r - beta * log(pi/pi_ref)), which is the trainer's business.

    Special cases, as in :func:`group_advantages`: NaN rewards are excluded from the baseline and get
    0; a group whose valid rewards are all equal, or that has fewer than 2 valid rewards (no "other"
    answer to compare against), gives its members exactly 0.

    Args:
        rewards: float tensor [N], N = num_prompts * group_size, group-contiguous.
        group_size: G, answers per prompt; must be >= 2.
    Returns:
        advantages [N] (floating dtype of ``rewards``; float32 if rewards are integer/bool).
    """
    grouped = _grouped(rewards, group_size, min_group_size=2, method="RLOO")
    valid, _, _, zero_spread = _group_stats(grouped)
    count = valid.sum(dim=1, keepdim=True)
    total = torch.where(valid, grouped, torch.zeros_like(grouped)).sum(dim=1, keepdim=True)
    others_mean = (total - grouped) / (count - 1).clamp(min=1)
    adv = grouped - others_mean
    keep = valid & ~zero_spread
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def _batch_normalise(values: Tensor, valid: Tensor, scale: bool, eps: float) -> Tensor:
    """(x - mean_batch) / (std_batch + eps) over the valid entries of a flat tensor (only the centring
    when not ``scale``); unbiased std; 0 at invalid entries, and 0 everywhere when the valid values are
    all equal or fewer than 2."""
    zeros = torch.zeros_like(values)
    kept = values[valid]
    if kept.numel() < 2 or bool(kept.amax() == kept.amin()):
        return zeros
    mean = kept.mean()
    out = values - mean
    if scale:
        out = out / (kept.std(unbiased=True) + eps)
    return torch.where(valid, out, zeros)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): no per-prompt baseline; the rewards are
    normalised over the WHOLE batch (every answer of every prompt in the step's rollout).

        A_i = (r_i - mean_batch) / (std_batch + eps)      if scale
        A_i =  r_i - mean_batch                           otherwise

    mean_batch and std_batch are over all valid (non-NaN) rewards; std_batch is the unbiased sample
    standard deviation (divide by n_valid - 1), as in :func:`group_advantages`. ``scale`` keeps its
    meaning from the other estimators (divide by the std; here the batch's), and ``eps`` is added to
    that std. ``group_size`` only checks the layout (N divisible by it; 1 is allowed).

    REINFORCE++ puts the KL term in the reward, r_t = 1[t = EOS] * r - beta * k1_t, and normalises the
    per-token returns; that per-token shaping is the trainer's business (see
    ``algorithms.ppo.kl_shaped_rewards``). This estimator is the outcome form: one scalar reward per
    answer, broadcast over its tokens.

    Special cases: NaN rewards are excluded from the statistics and get 0; when the batch's valid
    rewards are all equal, or fewer than 2, every answer gets exactly 0.

    Returns:
        advantages [N] (floating dtype of ``rewards``; float32 if rewards are integer/bool).
    """
    _check_groups(rewards, group_size, min_group_size=1)
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.float32)
    return _batch_normalise(rewards, ~torch.isnan(rewards), scale, eps)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4
) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv:2501.03262): subtract the group mean, then
    normalise over the WHOLE batch instead of within the group (GRPO).

        x_i = r_i - mean_g                                 (mean over the valid rewards of i's group g)
        A_i = (x_i - mean_batch(x)) / (std_batch(x) + eps) if scale
        A_i =  x_i - mean_batch(x)                         otherwise (then it equals Dr. GRPO's advantage)

    mean_batch and std_batch are over the x of every valid (non-NaN) reward in the batch, including
    the zeros of groups whose rewards are all equal; std_batch is the unbiased sample standard
    deviation. Since every group's x sum to 0, mean_batch(x) = 0 up to round-off. ``scale`` and
    ``eps`` mean what they mean for the other estimators, with the batch's std in place of the group's.

    REINFORCE++ puts the KL term in the reward (r - beta * k1, per token); that is the trainer's
    business (see ``algorithms.ppo.kl_shaped_rewards``), not this estimator's.

    Special cases: NaN rewards are excluded and get 0; a group whose valid rewards are all equal, or
    that has fewer than 2 valid rewards, gives its members exactly 0 (its x are 0 and mean_batch is 0).

    Args:
        rewards: float tensor [N], N = num_prompts * group_size, group-contiguous.
        group_size: G, answers per prompt; must be >= 2.
    Returns:
        advantages [N] (floating dtype of ``rewards``; float32 if rewards are integer/bool).
    """
    grouped = _grouped(rewards, group_size, min_group_size=2, method="REINFORCE++-baseline")
    valid, mean, _, zero_spread = _group_stats(grouped)
    centred = torch.where(valid & ~zero_spread, grouped - mean, torch.zeros_like(grouped))
    adv = _batch_normalise(centred.reshape(-1), valid.reshape(-1), scale, eps).reshape(grouped.shape)
    adv = torch.where(zero_spread, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def zero_spread_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups carry no learning signal: [num_groups] bool, True where the group's valid
    (non-NaN) rewards are all equal or fewer than 2.

        zero_spread_g = (n_valid_g < 2) or (max_{i in g} r_i == min_{i in g} r_i)

    Such a group gives every answer exactly 0 advantage under the group estimators (GRPO, Dr. GRPO,
    RLOO, REINFORCE++-baseline); DAPO's dynamic sampling drops it. Rewards are group-contiguous [N].
    """
    grouped = _grouped(rewards, group_size, min_group_size=1)
    return _group_stats(grouped)[3].reshape(-1)


def zero_std_group_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups with zero reward spread (no GRPO learning signal).

        frac = #{g : valid rewards of g all equal, or n_valid_g < 2} / num_groups

    NaN rewards are ignored, as in :func:`group_advantages`. With group_size=1 every group has fewer
    than 2 values, so the fraction is 1.0.

    Raises:
        ValueError: group_size < 1, or N not divisible by group_size.
    """
    grouped = _grouped(rewards, group_size, min_group_size=1)
    if grouped.shape[0] == 0:
        return 0.0
    _, _, _, zero_spread = _group_stats(grouped)
    return float(zero_spread.sum().item()) / grouped.shape[0]


def whiten(values: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8,
           total: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Masked whitening (used for PPO advantages).

        mean = sum(m * x) / sum(m)
        var  = sum(m * (x - mean)^2) / (sum(m) - 1)        (unbiased, Bessel; as TRL's masked_whiten)
        y    = (x - mean) / sqrt(var + eps)                 if shift_mean
        y    = (x - mean) / sqrt(var + eps) + mean          otherwise (scale only, keep the mean)

    Statistics are taken over the elements where mask is nonzero (all elements if mask is None).
    Positions where mask == 0 are set to 0 in the output. With fewer than 2 valid elements var is 0.
    ``total`` turns a local sum into the sum over the whole batch (several ranks: their all-reduce), so
    the statistics are the batch's, not one shard's.
    """
    total = total or (lambda x: x)
    if mask is None:
        mask_b = torch.ones_like(values, dtype=torch.bool)
    else:
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")
        mask_b = mask.bool()
    zeros = torch.zeros_like(values)
    count = total(mask_b.sum().to(values.dtype))
    mean = total(torch.where(mask_b, values, zeros).sum()) / count.clamp(min=1)
    sq_dev = torch.where(mask_b, (values - mean) ** 2, zeros)
    var = total(sq_dev.sum()) / (count - 1).clamp(min=1)
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
