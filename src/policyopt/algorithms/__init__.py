"""Pure-torch math for RL post-training: advantages, KL estimators, losses, loss aggregation, log-probs.

Nothing here imports the rest of policyopt: only torch.
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    gae_advantages,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    whiten,
    zero_spread_groups,
    zero_std_group_fraction,
)
from .aggregation import LOSS_AGGREGATIONS, aggregate_loss, last_token_index, masked_mean
from .kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from .logprobs import gather_logprobs, token_entropy
from .losses import (
    POLICY_LOSSES,
    SEQUENCE_LEVEL_LOSSES,
    bradley_terry_loss,
    cispo_loss,
    clipped_surrogate,
    clipped_value_loss,
    grouped_pairwise_loss,
    gspo_loss,
    gspo_token_loss,
    policy_log_ratio,
)
from .pass_at_k import pass_at_k
from .ppo import adaptive_kl_coef, explained_variance, kl_shaped_rewards
from .registry import Registry
from .shaping import overlong_penalty

__all__ = [
    "Registry",
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "SEQUENCE_LEVEL_LOSSES",
    "LOSS_AGGREGATIONS",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "zero_std_group_fraction",
    "zero_spread_groups",
    "whiten",
    "gae_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "clipped_surrogate",
    "gspo_loss",
    "gspo_token_loss",
    "cispo_loss",
    "policy_log_ratio",
    "clipped_value_loss",
    "bradley_terry_loss",
    "grouped_pairwise_loss",
    "token_entropy",
    "gather_logprobs",
    "aggregate_loss",
    "masked_mean",
    "last_token_index",
    "kl_shaped_rewards",
    "adaptive_kl_coef",
    "explained_variance",
    "overlong_penalty",
    "pass_at_k",
]
