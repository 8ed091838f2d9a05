"""Per-token policy/value losses and log-prob utilities (no reduction; see aggregation.py)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "clipped_surrogate",
    "clipped_value_loss",
    "bradley_terry_loss",
    "token_entropy",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]


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


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, computed stably.

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,     p = softmax(z)

    -inf logits (masked vocabulary entries) are replaced by the dtype's most negative finite value,
    so they contribute exactly 0 and gradients stay finite.
    """
    z = logits.clamp(min=torch.finfo(logits.dtype).min)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def selective_log_softmax_and_entropy(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``selective_log_softmax`` and ``token_entropy`` of the same logits, sharing one logsumexp.

        lse = logsumexp(z),   log p(token) = z[token] - lse,   H = lse - sum_v softmax(z)_v z_v

    The entropy is a metric: it carries no gradient. Sharing ``lse`` and skipping the clamp saves
    two of the five passes over the [B, T, V] logits that the two functions make on their own
    (92 -> 75 ms forward+backward for 32 x 32 tokens x 8192 entries on a 2-core CPU). Rows whose
    logits hold -inf (masked vocabulary) give 0 * -inf there, so those rows are recomputed with
    ``token_entropy``. Low-precision logits go through the float32 per-row path of
    ``selective_log_softmax``.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logp = selective_log_softmax(logits, tokens)
        with torch.no_grad():
            entropy = torch.stack([token_entropy(row.float()) for row in logits])
        return logp, entropy
    lse = torch.logsumexp(logits, dim=-1)
    logp = torch.gather(logits, -1, tokens.long().unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1)
        entropy = lse - torch.einsum("...v,...v->...", p, logits)
        bad = entropy.isnan()
        if bad.any():
            entropy[bad] = token_entropy(logits[bad])
    return logp, entropy.detach()


def selective_log_softmax(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[..., token] without materialising the full [B, T, V] log_softmax.

        log p(token) = logits[token] - logsumexp(logits over V)

    Only a gather and a logsumexp are computed, which saves a [B, T, V] tensor of memory.
    For float16/bfloat16 logits, logsumexp in low precision is inaccurate, so the computation is
    done in float32 one batch row at a time (materialising only a [T, V] float32 copy) and the
    result is returned in float32; float32/float64 inputs keep their dtype.

    Args:
        logits: [B, T, V] (any leading shape works for the full-precision path).
        tokens: integer [B, T].
    Returns:
        [B, T] log-probabilities.
    """
    idx = tokens.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, idx).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_idx in zip(logits, idx):
        row32 = row_logits.float()
        rows.append(torch.gather(row32, -1, row_idx).squeeze(-1) - torch.logsumexp(row32, dim=-1))
    return torch.stack(rows)
