"""Reduction of per-token losses to a scalar, with gradient-accumulation-exact normalisers, and the
mask utilities it rests on (masked mean, last valid position)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .registry import Registry

__all__ = ["LOSS_AGGREGATIONS", "aggregate_loss", "last_token_index", "masked_mean"]

# every aggregation takes (masked per-token loss [B, T] with 0 at padding, mask [B, T] bool) and the
# minibatch's num_sequences, num_tokens and constant, and returns the scalar loss
LOSS_AGGREGATIONS = Registry("loss aggregation")


def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean over masked elements:  sum(v * m) / max(sum(m), 1)  (over ``dim``, or all elements).

    Values at mask == 0 are dropped with ``torch.where`` (so NaN/inf padding does not leak), and an
    all-zero mask gives 0 rather than NaN.
    """
    mask_b = mask.bool()
    filled = torch.where(mask_b, values, torch.zeros_like(values))
    m = mask_b.to(values.dtype)
    if dim is None:
        return filled.sum() / m.sum().clamp(min=1)
    return filled.sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last valid (mask = 1) position of each row of a [B, T] mask; 0 for an empty row.

        last_i = max { t : m_it = 1 }

    Works for right- and left-padded masks alike.
    """
    positions = torch.arange(mask.size(-1), device=mask.device)
    return (positions * mask.bool().long()).argmax(dim=-1)


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_sequences: Optional[int] = None,
    num_tokens: Optional[Union[float, Tensor]] = None,
    constant: Optional[float] = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar with the aggregation registered as ``mode``.

    num_sequences defaults to B and num_tokens to sum(m). They exist for gradient accumulation: when
    a minibatch is split into micro-batches, pass the WHOLE minibatch's num_sequences / num_tokens to
    every micro-batch; the micro-batch losses then sum exactly to the whole-minibatch loss (and so
    their gradients sum to its gradient).

    Raises:
        ValueError: unknown mode, shape mismatch, missing/non-positive constant for
        seq_sum_constant, or non-positive num_sequences.
    """
    reduce = LOSS_AGGREGATIONS.get_fn(mode)
    if per_token_loss.shape != mask.shape or per_token_loss.dim() != 2:
        raise ValueError(
            f"per_token_loss and mask must both be [B, T], got {tuple(per_token_loss.shape)} and {tuple(mask.shape)}"
        )
    if num_sequences is None:
        num_sequences = per_token_loss.shape[0]
    if num_sequences <= 0:
        raise ValueError(f"num_sequences must be positive, got {num_sequences}")
    mask_b = mask.bool()
    if num_tokens is None:
        num_tokens = mask_b.sum()
    masked = torch.where(mask_b, per_token_loss, torch.zeros_like(per_token_loss))
    return reduce(masked, mask_b, num_sequences=num_sequences, num_tokens=num_tokens, constant=constant)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(masked: Tensor, mask: Tensor, *, num_sequences: int, num_tokens, constant) -> Tensor:
    """DeepSeekMath GRPO: each answer's token mean, then the mean over answers.

        L = sum_i [ (sum_t m_it l_it) / max(sum_t m_it, 1) ] / num_sequences
    """
    per_seq = masked.sum(dim=-1) / mask.sum(dim=-1).to(masked.dtype).clamp(min=1)
    return per_seq.sum() / num_sequences


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(masked: Tensor, mask: Tensor, *, num_sequences: int, num_tokens, constant) -> Tensor:
    """DAPO (and PPO): one mean over every token of the minibatch, so long answers weigh more.

        L = sum_{i,t} m_it l_it / max(num_tokens, 1)
    """
    if isinstance(num_tokens, Tensor):
        denom = num_tokens.to(device=masked.device, dtype=masked.dtype).clamp(min=1)
    else:
        denom = max(float(num_tokens), 1.0)
    return masked.sum() / denom


@LOSS_AGGREGATIONS.register("seq_sum_constant")
def seq_sum_constant(masked: Tensor, mask: Tensor, *, num_sequences: int, num_tokens, constant) -> Tensor:
    """Dr. GRPO: token sums over a fixed constant (e.g. max new tokens), free of any length bias.

        L = sum_{i,t} m_it l_it / (num_sequences * constant)
    """
    if constant is None or constant <= 0:
        raise ValueError(
            "loss aggregation 'seq_sum_constant' (Dr. GRPO) needs a positive constant, e.g. the maximum "
            f"number of new tokens; got constant={constant!r}"
        )
    return masked.sum() / (num_sequences * constant)
