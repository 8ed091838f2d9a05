"""Pure-torch math for RL post-training: advantages, KL estimators, losses, loss aggregation."""

from .advantages import ADVANTAGE_ESTIMATORS, gae_advantages, group_advantages, whiten, zero_std_group_fraction
from .aggregation import LOSS_AGGREGATIONS, aggregate_loss, masked_mean
from .kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from .losses import (
    POLICY_LOSSES,
    bradley_terry_loss,
    clipped_surrogate,
    clipped_value_loss,
    selective_log_softmax,
    gather_logprobs,
    token_entropy,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "group_advantages",
    "zero_std_group_fraction",
    "whiten",
    "gae_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "clipped_surrogate",
    "clipped_value_loss",
    "bradley_terry_loss",
    "token_entropy",
    "selective_log_softmax",
    "gather_logprobs",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "masked_mean",
]
