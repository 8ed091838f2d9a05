"""pass@k: the chance that at least one of k sampled answers to a problem is correct.

Pure math on counts; no model, no state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pass_at_k"]


def pass_at_k(num_samples: int, num_correct, k: int) -> Tensor:
    """The unbiased pass@k estimator (Chen et al. 2021, arXiv:2107.03374, Eq. 1), per problem.

        pass@k = 1 - C(n - c, k) / C(n, k)

    for a problem with n >= k sampled answers of which c are correct: the probability that k answers
    drawn without replacement from the n include at least one correct one. It is 1 when n - c < k
    (every draw of k includes a correct answer) and 0 when c = 0. Averaged over problems it estimates
    pass@k without the bias of drawing exactly k answers and checking them (which is the case n = k).
    The binomials are Python integers, so the ratio is exact before its rounding to float64.

    Args:
        num_samples: n, answers sampled per problem (the same for every problem).
        num_correct: c per problem, integers in [0, n]: an int, a list, or an integer tensor [P].
        k: 1 <= k <= n.
    Returns:
        pass@k per problem, float64 [P] (a 0-d tensor for an int ``num_correct``).
    Raises:
        ValueError: k outside [1, n], or a count outside [0, n].
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    counts = torch.as_tensor(num_correct)
    if torch.is_floating_point(counts) or bool(((counts < 0) | (counts > num_samples)).any()):
        raise ValueError(f"correct counts must be integers in [0, n={num_samples}], got {counts.tolist()}")
    total = math.comb(num_samples, k)
    values = [1.0 - math.comb(num_samples - c, k) / total for c in counts.reshape(-1).tolist()]
    return torch.tensor(values, dtype=torch.float64).reshape(counts.shape)
