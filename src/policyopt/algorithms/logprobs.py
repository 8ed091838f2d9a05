"""Log-probabilities and entropies of tokens from logits, without building a [C, V] log-softmax."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["GATHER_CHUNK_ELEMENTS", "gather_logprobs", "token_entropy"]


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, computed stably.

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,     p = softmax(z)

    -inf logits (masked vocabulary entries) are replaced by the dtype's most negative finite value,
    so they contribute exactly 0 and gradients stay finite.
    """
    z = logits.clamp(min=torch.finfo(logits.dtype).min)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


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
