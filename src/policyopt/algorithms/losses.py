"""Per-token policy and value losses, and the reward model's pairwise losses.

The policy and value losses are per token (no reduction; see aggregation.py). Log-probabilities and
entropies of tokens live in logprobs.py.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

# every policy loss takes (logp, old_logp, advantages, mask, eps_low, eps_high) and returns
# (per-token loss [B, T], clipped [B, T] bool): the tokens whose gradient clipping removed (for CISPO,
# whose weight was clipped). logp, old_logp, mask are [B, T] (mask = 1 on real answer tokens);
# advantages are [B] (one per answer, broadcast over its tokens) or [B, T]
POLICY_LOSSES = Registry("policy loss")

__all__ = [
    "POLICY_LOSSES",
    "clipped_surrogate",
    "gspo_loss",
    "gspo_token_loss",
    "cispo_loss",
    "policy_log_ratio",
    "SEQUENCE_LEVEL_LOSSES",
    "clipped_value_loss",
    "bradley_terry_loss",
    "grouped_pairwise_loss",
]


@POLICY_LOSSES.register("ppo_clip")
def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
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
        mask: [B, T] answer-token mask; unused (every token is its own ratio; the aggregation drops
            padding), accepted for the registry's common signature.
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


def _per_token_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    """[B] -> [B, 1] (broadcast over tokens); [B, T] unchanged."""
    return advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log s_i = (1/|y_i|) sum_t m_it (logp_it - old_logp_it), [B, 1]; 0 for a row with no valid token.

    Padding is dropped with ``torch.where`` (NaN/inf there neither leaks into s_i nor into its gradient).
    """
    if mask is None or mask.shape != logp.shape:
        raise ValueError(f"GSPO needs the answers' token mask with the shape of logp {tuple(logp.shape)}, got "
                         f"{None if mask is None else tuple(mask.shape)}")
    valid = mask.bool()
    diff = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    length = valid.sum(dim=-1, keepdim=True).to(logp.dtype).clamp(min=1)
    return diff.sum(dim=-1, keepdim=True) / length


def _sequence_clip(ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float):
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) and where clipping removed the
    gradient, both [B, T] with 0 / False at padding."""
    valid = mask.bool()
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))  # [B, T]; padding -> 0
    unclipped_obj = ratio * advantages
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped_obj, clipped_obj).expand(valid.shape)
    clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    return torch.where(valid, loss, torch.zeros_like(loss)), clipped.expand(valid.shape) & valid


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> Tuple[Tensor, Tensor]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071): one importance
    ratio per answer, the geometric mean of its token ratios, clipped at the sequence level.

        s_i    = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|)
               = exp( (1/|y_i|) * sum_t m_it * (logp_it - old_logp_it) )
        loss_i = -min( s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i )
        loss_it = loss_i on every answer token (m_it = 1), 0 on padding

    |y_i| = sum_t m_it counts only the answer's valid tokens: padding changes neither s_i nor its
    gradient. The gradient flows through s_i, so every token of answer i gets
    d loss_i / d logp_it = -A_i * s_i / |y_i| while unclipped. With the ``seq_mean_token_mean``
    aggregation the loss is the paper's objective, J = (1/G) sum_i min(s_i A_i, clip(s_i) A_i)
    (another aggregation weighs the answers differently).

    Recommended clip range: the paper's clip_ratio_low = 3e-4 and clip_ratio_high = 4e-4 (the defaults
    here; the recipes pass their config's clip_ratio_low/high, whose defaults are token-level values),
    since s_i is a per-token geometric mean and so stays much closer to 1 than token ratios do.

    ``clipped`` marks the answer tokens of sequences whose gradient clipping removed:
    (A_i > 0 and s_i > 1 + eps_high) or (A_i < 0 and s_i < 1 - eps_low); False on padding.
    Per-token advantages [B, T] are accepted (A_it in place of A_i, token by token); GSPO proper has
    one advantage per answer.

    Returns:
        (per_token_loss [B, T], clipped [B, T] bool)
    """
    advantages = _per_token_advantages(advantages, logp)
    ratio = torch.exp(_sequence_log_ratio(logp, old_logp, mask))  # [B, 1], carries the gradient
    return _sequence_clip(ratio, advantages, mask, eps_low, eps_high)


@POLICY_LOSSES.register("gspo_token")
def gspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> Tuple[Tensor, Tensor]:
    """GSPO-token (Zheng et al. 2025, arXiv:2507.18071): GSPO's sequence ratio in value, with a
    per-token gradient, so that answers may carry per-token advantages.

        s_it    = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)] = exp( sg[log s_i] + logp_it - sg[logp_it] )
        loss_it = -min( s_it * A_it, clip(s_it, 1 - eps_low, 1 + eps_high) * A_it )     (0 on padding)

    with s_i as in :func:`gspo_loss` (sg = stop-gradient). s_it equals s_i in value, so the losses and
    the clipping decisions are GSPO's; but d loss_it / d logp_iu is 0 for u != t:
    d loss_it / d logp_it = -A_it * s_i while unclipped. With A_it = A_i for every token and the
    ``seq_mean_token_mean`` aggregation, the gradient equals GSPO's.

    Recommended clip range, as for GSPO: clip_ratio_low = 3e-4, clip_ratio_high = 4e-4 (the defaults).
    ``clipped`` marks answer tokens with (A_it > 0 and s_it > 1 + eps_high) or
    (A_it < 0 and s_it < 1 - eps_low); False on padding.

    Returns:
        (per_token_loss [B, T], clipped [B, T] bool)
    """
    advantages = _per_token_advantages(advantages, logp)
    log_s = _sequence_log_ratio(logp, old_logp, mask).detach()  # [B, 1]
    valid = mask.bool()
    token_grad = torch.where(valid, logp - logp.detach(), torch.zeros_like(logp))  # 0 in value
    ratio = torch.exp(log_s + token_grad)  # [B, T]
    return _sequence_clip(ratio, advantages, mask, eps_low, eps_high)


@POLICY_LOSSES.register("cispo")
def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tuple[Tensor, Tensor]:
    """CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv:2506.13585): REINFORCE with the
    token's importance weight clipped and detached, so that no token loses its gradient.

        r_t    = exp(logp_t - old_logp_t)
        w_t    = sg[ clip(r_t, 1 - eps_low, 1 + eps_high) ]
        loss_t = -w_t * A * logp_t

    d loss_t / d logp_t = -w_t * A on every token, clipped or not (PPO-clip gives 0 on a clipped
    token); with old_logp = logp (on-policy) w_t = 1 and the gradient is REINFORCE's, -A. The value of
    the loss (-w A logp) is not a surrogate objective's value; only its gradient matters. The paper
    aggregates over all the group's tokens (``token_mean``) and clips only from above (it sets
    eps_low large; eps_low >= 1 imposes no lower bound, since r_t > 0).

    No trust region: PPO-clip gives no gradient to a token whose ratio is already past the clip on the
    side its advantage pushes (A > 0 and r_t > 1 + eps_high, A < 0 and r_t < 1 - eps_low); CISPO keeps
    pushing it, with weight 1 + eps_high (or r_t). With several optimizer steps per rollout
    (num_minibatches or update_epochs > 1) the later steps therefore keep pushing what the earlier ones
    moved most, and in a peaked policy those few unlikely tokens carry much of the gradient. So CISPO
    wants a lower learning rate than PPO-clip, or fewer updates per rollout: on the demo's task with
    4 minibatches, at the lr that suits PPO-clip (1e-3) it collapsed on 2 of 3 seeds, and at 3e-4 it
    matched GRPO (``benchmarks/README.md``, "Variants side by side"). On-policy its gradient is
    PPO-clip's with ``token_mean`` (``tests/test_grpo_family.py``).

    ``clipped`` marks the answer tokens whose weight was clipped, r_t > 1 + eps_high or
    r_t < 1 - eps_low (whatever the sign of A; their gradient is kept, with the clipped weight).
    Loss and ``clipped`` are 0 / False where ``mask`` is 0 (when a mask is given).

    Returns:
        (per_token_loss [B, T], clipped [B, T] bool)
    """
    advantages = _per_token_advantages(advantages, logp)
    valid = None
    if mask is not None:
        valid = mask.bool()
        # padding -> 0 before any arithmetic, so NaN/inf there reach neither the loss nor the gradient
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        old_logp = torch.where(valid, old_logp, torch.zeros_like(old_logp))
        advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * advantages * logp
    clipped = (ratio > 1.0 + eps_high) | (ratio < 1.0 - eps_low)
    if valid is not None:
        clipped = clipped & valid
    return loss, clipped.expand_as(loss)


# the losses whose importance ratio is one per answer (GSPO's s_i), not one per token
SEQUENCE_LEVEL_LOSSES = ("gspo", "gspo_token")


def policy_log_ratio(policy_loss: str, logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """The log of the importance ratio that the registered ``policy_loss`` clips, [B, T] (0 on padding).

        token-level losses (ppo_clip, cispo):   log r_it = logp_it - old_logp_it
        sequence-level losses (gspo, gspo_token): log s_i = (1/|y_i|) sum_t m_it (logp_it - old_logp_it),
                                                  the same on every answer token of i

    For diagnostics, computed without gradient: its sign tells on which side a clipped token was
    clipped (below 1 - eps_low or above 1 + eps_high), and exp of it is the ratio itself.
    """
    with torch.no_grad():
        valid = mask.bool()
        if policy_loss in SEQUENCE_LEVEL_LOSSES:
            log_ratio = _sequence_log_ratio(logp, old_logp, mask).expand(logp.shape)
        else:
            log_ratio = logp - old_logp
        return torch.where(valid, log_ratio, torch.zeros_like(log_ratio))


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


def grouped_pairwise_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    group: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley–Terry reward-model loss averaged over each prompt's pairs first, then over prompts.

        l_p = -log sigmoid(r_c,p - r_r,p - m_p) + center_coef * (r_c,p + r_r,p)^2
        L   = (1 / G) * sum_g (1 / |P_g|) * sum_{p in P_g} l_p

    where P_g are the pairs of prompt g and G the number of prompts in the batch. A ranking of K
    answers contributes K(K-1)/2 pairs but weighs the same as a single pair (InstructGPT: "all
    (K choose 2) comparisons from each prompt as a single batch element"). The centring term is
    TRL's ``center_rewards_coefficient`` (Eisenstein et al. 2023), which pins the scores near 0.

    Args:
        chosen_rewards, rejected_rewards: [P] scores of each pair's preferred and other answer.
        group: [P] integer id of the prompt each pair belongs to (any ids; they need not be contiguous).
        margin: [P] optional margins (Llama 2).
    """
    per_pair = bradley_terry_loss(chosen_rewards, rejected_rewards, margin)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_rewards + rejected_rewards) ** 2
    _, group_index, pairs_per_group = torch.unique(group, return_inverse=True, return_counts=True)
    weights = 1.0 / pairs_per_group[group_index].to(per_pair.dtype)
    return (per_pair * weights).sum() / pairs_per_group.numel()
