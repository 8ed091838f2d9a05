"""Per-token policy/value losses and log-prob utilities (no reduction; see aggregation.py)."""

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
    "token_entropy",
    "selective_log_softmax",
    "gather_logprobs",
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


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, computed stably.

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,     p = softmax(z)

    -inf logits (masked vocabulary entries) are replaced by the dtype's most negative finite value,
    so they contribute exactly 0 and gradients stay finite.
    """
    z = logits.clamp(min=torch.finfo(logits.dtype).min)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


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


# Rows of logits handled at once by gather_logprobs: bounds its float32 temporaries to ~64 MB.
GATHER_CHUNK_ELEMENTS = 1 << 24


def gather_logprobs(logits: Tensor, columns: Tensor, tokens: Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """log p(tokens[k] | logits[columns[k]] / temperature) for K (column, token) pairs, memory-lean.

        z_c = logits_c / tau,   lse_c = logsumexp_v z_cv,   logp_k = z_{c_k, tok_k} - lse_{c_k}
        d logp_k / d logits_c = [c = c_k] (onehot(tok_k) - softmax(z_c)) / tau
        H_c = lse_c - sum_v softmax(z_c)_v z_cv            (entropy per column, no gradient)

    logits: [C, V] in any float dtype (bf16 under autocast); columns, tokens: [K] integer. A column may
    serve several tokens (a prompt's last position predicts the first token of each of its G answers).
    Returns (logp [K], entropy [C] or None), float32 (float64 for float64 logits). temperature <= 0 (greedy) means 1.

    Nothing of size [C, V] is built besides the gradient itself: the forward and backward walk the rows
    in chunks, in float32, and save only the logits (already alive) and lse. The autograd composition of
    gather, division, float cast and logsumexp keeps 2-4 extra [C, V] tensors alive at the peak.
    """
    tau = float(temperature) if temperature > 0 else 1.0  # greedy (0): the untempered distribution
    return _GatheredLogprobs.apply(logits, columns, tokens, tau, with_entropy)


def _chunks(num_rows: int, vocab: int):
    step = max(1, GATHER_CHUNK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


class _GatheredLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, columns, tokens, temperature, with_entropy):
        C, V = logits.shape
        wide = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        lse = torch.empty(C, dtype=wide, device=logits.device)
        entropy = torch.empty(C, dtype=wide, device=logits.device) if with_entropy else None
        for start, end in _chunks(C, V):
            z = logits[start:end].to(wide)
            if temperature != 1.0:
                z = z / temperature
            lse[start:end] = torch.logsumexp(z, dim=-1)
            if with_entropy:
                p = torch.exp(z - lse[start:end, None])
                # masked (-inf) entries have p = 0 and contribute 0, not 0 * -inf
                entropy[start:end] = lse[start:end] - (p * z).nan_to_num_(0.0).sum(-1)
        logp = logits[columns, tokens].to(wide) / temperature - lse[columns]
        ctx.save_for_backward(logits, columns, tokens, lse)
        ctx.temperature = temperature
        if entropy is None:
            return logp, None
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, columns, tokens, lse = ctx.saved_tensors
        tau = ctx.temperature
        C, V = logits.shape
        g = grad_logp.to(lse.dtype) / tau
        g_per_column = torch.zeros(C, dtype=lse.dtype, device=logits.device).index_add_(0, columns, g)
        grad = torch.empty_like(logits)
        for start, end in _chunks(C, V):
            z = logits[start:end].to(lse.dtype)
            if tau != 1.0:
                z = z / tau
            chunk = torch.exp(z - lse[start:end, None]).mul_(-g_per_column[start:end, None])
            inside = (columns >= start) & (columns < end)
            chunk.index_put_((columns[inside] - start, tokens[inside]), g[inside], accumulate=True)
            grad[start:end] = chunk
        return grad, None, None, None, None
