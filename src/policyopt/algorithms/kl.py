"""Per-token estimators of KL(pi_theta || pi_ref) from log-probabilities of sampled tokens.

Notation (all per token, for a token y sampled from pi_theta):
    logp      = log pi_theta(y)
    ref_logp  = log pi_ref(y)
    log_ratio = ref_logp - logp = log( pi_ref(y) / pi_theta(y) )

See J. Schulman, "Approximating KL Divergence" (2020).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

__all__ = ["KL_ESTIMATORS", "kl_k1", "kl_k2", "kl_k3", "K3_LOG_RATIO_CLAMP"]

# every estimator takes (logp, ref_logp) of the sampled tokens and returns a per-token estimate
KL_ESTIMATORS = Registry("KL estimator")

K3_LOG_RATIO_CLAMP = 20.0


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 estimator:  k1 = -log_ratio = logp - ref_logp.

    Unbiased estimator of KL(pi_theta || pi_ref) under samples from pi_theta, but high variance and
    can be negative per token.
    """
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 estimator:  k2 = 0.5 * log_ratio^2,  log_ratio = ref_logp - logp.

    Always >= 0, low variance, but biased (its expectation is an f-divergence that matches KL only
    to second order when pi_theta is close to pi_ref). Used as a loss on on-policy samples
    (differentiating through logp only), its expected gradient, E[(logp - ref_logp) * grad logp],
    equals grad KL(pi_theta || pi_ref).
    """
    log_ratio = ref_logp - logp
    return 0.5 * log_ratio * log_ratio


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator (the GRPO KL term):  k3 = exp(log_ratio) - log_ratio - 1,  log_ratio = ref_logp - logp.

    Unbiased estimator of KL(pi_theta || pi_ref) under samples from pi_theta (since
    E_{pi_theta}[pi_ref/pi_theta] = 1), and always >= 0 (e^x >= 1 + x), with lower variance than k1.

    Numerical safety: log_ratio is clamped to [-20, 20] before use (both in exp and in the linear
    term, as verl does), so exp cannot overflow; the clamped value still gives k3 >= 0. The clamp
    only affects tokens whose probability ratio exceeds e^20, where the estimate is meaningless
    anyway; gradients are zero for clamped tokens.
    """
    log_ratio = (ref_logp - logp).clamp(min=-K3_LOG_RATIO_CLAMP, max=K3_LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0
