"""Reward shaping that depends on an answer's length, not on its content.

Pure torch functions; no model, no state. The trainer adds the result to the answers' rewards.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["overlong_penalty"]


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13), per answer.

        R_length(L) = 0                                     if L <= max_len - cache_len
                    = ((max_len - cache_len) - L) / cache_len  if max_len - cache_len < L <= max_len
                    = -1                                    if L > max_len

    L is the answer's length in tokens; the penalty falls linearly from 0 to -1 over the last
    ``cache_len`` tokens before ``max_len`` (DAPO: max_len 20,480 with a 4,096-token cache). It is
    added to the correctness reward. With cache_len = 0 it is 0 up to max_len and -1 beyond.

    Args:
        lengths: [N] answer lengths (integer or float tensor, or anything ``torch.as_tensor`` takes).
        max_len: L_max, the longest answer that is not punished in full.
        cache_len: L_cache, 0 <= cache_len <= max_len.
    Returns:
        penalties [N] in [-1, 0] (float32, or the floating dtype of ``lengths``).
    Raises:
        ValueError: cache_len < 0, or cache_len > max_len.
    """
    if cache_len < 0 or cache_len > max_len:
        raise ValueError(f"overlong_penalty needs 0 <= cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    lengths = torch.as_tensor(lengths)
    dtype = lengths.dtype if torch.is_floating_point(lengths) else torch.float32
    length = lengths.to(dtype)
    start = max_len - cache_len
    linear = (start - length) / max(cache_len, 1)
    zeros, minus_one = torch.zeros_like(length), torch.full_like(length, -1.0)
    return torch.where(length <= start, zeros, torch.where(length <= max_len, linear, minus_one))
