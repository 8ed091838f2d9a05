"""PPO-for-LLMs pieces that are not shared with GRPO: per-token reward shaping, the adaptive KL
controller and explained variance.

Pure torch functions; no model, no state. GAE, whitening and the clipped losses live beside them
(``advantages.py``, ``losses.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import last_token_index
from .kl import kl_k1

__all__ = [
    "adaptive_kl_coef",
    "explained_variance",
    "kl_shaped_rewards",
]


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
