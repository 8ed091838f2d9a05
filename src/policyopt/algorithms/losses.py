"""Per-token policy and value losses, and the reward model's pairwise losses.

The policy and value losses are per token (no reduction; see aggregation.py). Log-probabilities and
entropies of tokens live in logprobs.py.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

# every policy loss takes (logp, old_logp, advantages, eps_low, eps_high) and returns
# (per-token loss [B, T], clipped [B, T] bool): the tokens whose gradient clipping removed
POLICY_LOSSES = Registry("policy loss")

__all__ = [
    "POLICY_LOSSES",
    "clipped_surrogate",
    "clipped_value_loss",
    "bradley_terry_loss",
    "grouped_pairwise_loss",
]


@POLICY_LOSSES.register("ppo_clip")
def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tuple[Tensor, Tensor]:
    """PPO / GRPO clipped surrogate, per token (eps_high > eps_low gives DAPO's clip-higher).

        ratio     = exp(logp - old_logp)
        objective = min( ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A )
        loss      = -objective

    ``clipped`` marks tokens whose gradient is zero because of clipping, i.e. the clipped branch is
    the active (smaller) one and differs from the unclipped one:

        clipped = (A > 0 and ratio > 1 + eps_high) or (A < 0 and ratio < 1 - eps_low)

    Args:
        logp: log pi_theta(token) [B, T] (carries the gradient).
        old_logp: log pi_old(token) [B, T] (behaviour policy; treated as a constant).
        advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    Returns:
        (per_token_loss [B, T], clipped [B, T] bool)
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped_obj = ratio * advantages
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped_obj, clipped_obj)
    clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    return loss, clipped.expand_as(loss)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float
) -> Tuple[Tensor, Tensor]:
    """PPO clipped value loss, per token.

        V_clip = old_V + clip(V - old_V, -c, c)
        loss   = 0.5 * max( (V - R)^2, (V_clip - R)^2 )

    ``clipped`` marks tokens where the clipped term is strictly larger (so it is the active branch
    and the gradient w.r.t. V is zero), matching TRL's ``vf_clipfrac``.

    Returns:
        (per_token_loss, clipped bool), both with the shape of ``values``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    return loss, clipped_sq > unclipped_sq


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Bradley–Terry pairwise reward-model loss, per pair (no reduction).

        loss = -log sigmoid(r_chosen - r_rejected - margin)      (margin = 0 if None; Llama-2 style)

    Computed with F.logsigmoid, so it is stable for large |r_chosen - r_rejected|.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def grouped_pairwise_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    group: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley–Terry reward-model loss averaged over each prompt's pairs first, then over prompts.

        l_p = -log sigmoid(r_c,p - r_r,p - m_p) + center_coef * (r_c,p + r_r,p)^2
        L   = (1 / G) * sum_g (1 / |P_g|) * sum_{p in P_g} l_p

    where P_g are the pairs of prompt g and G the number of prompts in the batch. A ranking of K
    answers contributes K(K-1)/2 pairs but weighs the same as a single pair (InstructGPT: "all
    (K choose 2) comparisons from each prompt as a single batch element"). The centring term is
    TRL's ``center_rewards_coefficient`` (Eisenstein et al. 2023), which pins the scores near 0.

    Args:
        chosen_rewards, rejected_rewards: [P] scores of each pair's preferred and other answer.
        group: [P] integer id of the prompt each pair belongs to (any ids; they need not be contiguous).
        margin: [P] optional margins (Llama 2).
    """
    per_pair = bradley_terry_loss(chosen_rewards, rejected_rewards, margin)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_rewards + rejected_rewards) ** 2
    _, group_index, pairs_per_group = torch.unique(group, return_inverse=True, return_counts=True)
    weights = 1.0 / pairs_per_group[group_index].to(per_pair.dtype)
    return (per_pair * weights).sum() / pairs_per_group.numel()
