"""PPO-for-LLMs pieces that are not shared with GRPO: per-token reward shaping, the adaptive KL
controller, explained variance, and the pairwise reward-model objective averaged per prompt.

Pure torch functions; no model, no state. GAE, whitening and the clipped losses live beside them
(``advantages.py``, ``losses.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import kl_k1
from .losses import bradley_terry_loss

__all__ = [
    "adaptive_kl_coef",
    "explained_variance",
    "grouped_pairwise_loss",
    "kl_shaped_rewards",
    "last_token_index",
]


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last valid (mask = 1) position of each row of a [B, T] mask; 0 for an empty row.

        last_i = max { t : m_it = 1 }

    Works for right- and left-padded masks alike.
    """
    positions = torch.arange(mask.size(-1), device=mask.device)
    return (positions * mask.bool().long()).argmax(dim=-1)


def kl_shaped_rewards(
    scores: Tensor, logp_old: Tensor, logp_ref: Tensor | None, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO rewards: a k1 KL penalty on every response token, the sequence score on the last.

        k1_t = log pi_old(o_t) - log pi_ref(o_t)
        r_t  = -beta * k1_t                      for every valid token t (mask = 1)
        r_T += score                             at T, the last valid token of the row
        r_t  = 0                                 at padding

    (Ziegler et al. 2019; InstructGPT; TRL's PPOTrainer.) The k1 term uses the behaviour policy's
    log-probabilities, so it is a constant in the loss: the KL reaches the policy gradient through
    the returns and advantages, which is the unbiased "k1 in reward" form. With ``logp_ref=None``
    (no reference model, beta = 0) the KL part is zero. A row with an empty mask gets no reward.

    Args:
        scores: [B] sequence scores (reward model or reward functions, penalties already applied).
        logp_old, logp_ref: [B, T] log-probabilities of the sampled tokens.
        mask: [B, T] right-padded response mask (ones then zeros).
    Returns:
        (rewards [B, T], kl [B, T] = k1 masked to 0 at padding, non_score_rewards [B, T] = -beta * kl)
    """
    if logp_old.shape != mask.shape or scores.shape != mask.shape[:1]:
        raise ValueError(f"scores [B] and logp_old/mask [B, T] do not match: {tuple(scores.shape)}, "
                         f"{tuple(logp_old.shape)}, {tuple(mask.shape)}")
    valid = mask.bool()
    zeros = torch.zeros_like(logp_old)
    kl = torch.where(valid, kl_k1(logp_old, logp_ref), zeros) if logp_ref is not None else zeros
    non_score = -beta * kl
    rewards = non_score.clone()
    rows = torch.arange(mask.size(0), device=mask.device)
    has_tokens = valid.any(dim=-1)
    last = last_token_index(mask)
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, kl, non_score


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019) adaptive KL controller: one update of the KL coefficient.

        e     = clip(KL / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    KL is the current policy's KL from the reference, summed over a response's tokens and averaged
    over the batch; n_steps is the number of episodes (responses) in the batch. The coefficient grows
    when KL is above target and shrinks below it, by at most 20% * n_steps / horizon per update.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """How much of the returns' variance the value predictions explain, over valid tokens:

        EV = 1 - Var[R - V] / Var[R]

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse than that.
    Population variances over the masked elements; NaN when Var[R] = 0.
    """
    valid = mask.bool()
    r = returns[valid].double()
    v = values[valid].double()
    if r.numel() == 0:
        return float("nan")
    var_r = r.var(unbiased=False)
    if var_r == 0:
        return float("nan")
    return float(1.0 - (r - v).var(unbiased=False) / var_r)


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
