"""PPO for language models (Ziegler et al. 2019; InstructGPT; "The N+ implementation details of RLHF
with PPO"), one step top to bottom, with four models: the policy pi_theta, a frozen reference pi_ref,
the reward model or reward functions, and a value model V (a head on the policy's backbone by default).

For each prompt q, sample an answer o from pi_old (the policy before this step's updates) and score it
(score s). Each response token gets a reward, the KL penalty, and the last token also gets the score:

    k1_t = log pi_old(o_t) - log pi_ref(o_t)
    r_t  = -beta * k1_t  (+ s on the last token;  s -= missing_eos_penalty when o never emitted EOS)

Generalised advantage estimation with the values V_t = V(q, o_<t) of the old critic (V = 0 after the
last token), then whitening over the batch's valid tokens:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * A_{t+1}        R_t = A_t + V_t (the value targets)

and update_epochs passes over shuffled minibatches minimise, with one backward pass,

    L = mean_t [ -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]
      + vf_coef * mean_t [ 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2) ]

    rho_t = pi_theta(o_t) / pi_old(o_t),   means over the minibatch's valid tokens.

beta is fixed, or adapted towards a target KL after every step (Ziegler et al.'s controller).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

from ..algorithms import (
    POLICY_LOSSES,
    adaptive_kl_coef,
    aggregate_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_shaped_rewards,
    whiten,
)
from ..models.forward import forward_in_chunks, forward_rows, split_rows
from ..models.loading import ModelLoadError, resolve_dtype
from ..models.lora import plain_weights
from ..models.reward_model import load_scalar_model, scalar_model_from_causal_lm
from ..models.setup import describe
from ..models.value_head import PolicyAndValue
from ..runtime.distributed import world
from ..runtime.run import Run
from .rl import (Actors, LossAggregation, RLConfig, ScoredRollout, accumulate_gradients, evaluator, load_actors,
                 off_policy_correction, rollout_and_score, rollout_metrics, summed_over_ranks)

log = logging.getLogger(__name__)


@dataclass
class PPOConfig(RLConfig):
    output_dir: str = "runs/ppo"  # where config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json go
    steps: int = 100  # training steps, one rollout batch each
    group_size: int = 1  # answers sampled per prompt
    update_epochs: int = 4  # passes over each rollout batch (shuffled minibatches each pass)
    beta: float = 0.05  # KL coefficient of the per-token penalty in the reward (the initial one when adaptive_kl)
    loss_aggregation: LossAggregation = "token_mean"  # PPO's usual: one mean over the minibatch's tokens
    missing_eos_penalty: float | None = None  # subtracted from the score of answers cut at max_new_tokens
    # the value model: a head on the policy's backbone (shared) or a second transformer (separate)
    value_model: Literal["shared", "separate"] = "shared"
    value_model_path: str | None = None  # separate only: initialise from here (e.g. the reward model); null: the policy
    value_head_init: Literal["zero", "normal", "keep"] = "zero"  # keep: a loaded head as is (separate only)
    adaptive_kl: bool = False  # adapt beta after each step towards kl_target (Ziegler et al.'s controller)
    kl_target: float = 6.0  # adaptive: target of sum_t k1_t per answer
    kl_horizon: float = 10000.0  # adaptive: answers over which beta may move by ~20%
    clip_value: float = 0.2  # the new value may move at most this far from V_old in the clipped value loss
    vf_coef: float = 0.1  # weight of the value loss beside the policy loss
    gamma: float = 1.0  # discount over answer tokens
    lam: float = 0.95  # GAE's lambda: 1 gives Monte-Carlo returns, 0 one-step TD
    whiten_rewards: bool = False  # whiten per-token rewards (scale only) before GAE

    def validate(self) -> None:
        super().validate()
        if self.value_head_init == "keep" and self.value_model == "shared":
            raise ValueError("value_head_init=keep needs value_model=separate (a shared head is always new)")
        if self.value_model_path is not None and self.value_model != "separate":
            raise ValueError("value_model_path needs value_model=separate")
        if self.clip_value < 0 or self.vf_coef < 0:
            raise ValueError("clip_value and vf_coef must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0 or self.beta == 0):
            raise ValueError("adaptive_kl needs beta > 0, kl_target > 0 and kl_horizon > 0")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError("missing_eos_penalty is subtracted from the score: give a number >= 0")


@dataclass
class Advantages:
    """What step 3 computes for the update and the metrics; all [N, T] except ``score`` and ``scored`` [N]."""

    score: torch.Tensor  # s per answer, penalties applied, 0 where unscored
    scored: torch.Tensor  # bool: answers with a score (the others take no part in the update)
    mask: torch.Tensor  # the tokens that count in the losses
    old_logp: torch.Tensor
    old_values: torch.Tensor
    kl: torch.Tensor  # k1 per token
    non_score: torch.Tensor  # -beta * k1
    advantages: torch.Tensor  # GAE, whitened
    returns: torch.Tensor  # the value targets
    is_weights: torch.Tensor | None = None  # truncated pi_old / pi_engine when an engine sampled (rollout.engine=vllm)


def run_ppo(config: PPOConfig) -> dict:
    """Train with PPO; returns the summary also written to ``summary.json``."""
    run = Run(config, "ppo", total_steps=config.steps)
    actors = load_actors(run, config)  # policy, frozen reference, reward functions
    value_model = separate_value_model(config, actors) if config.value_model == "separate" else None
    actor_critic = PolicyAndValue(actors.policy, value_model, head_init=config.value_head_init)
    optimizer, scheduler = config.optim.build(actor_critic, config.steps * config.optimizer_steps_per_step)
    shuffle_generator = torch.Generator().manual_seed(config.seed + 1)
    run.values.setdefault("beta", config.beta)  # moves when adaptive_kl: part of the checkpoint
    run.track(model=actors.policy, tokenizer=actors.tokenizer, optimizer=optimizer, scheduler=scheduler,
              data=actors.source, value=actor_critic.value_module(),
              shuffle=shuffle_generator)
    evaluate = evaluator(actors, config)
    run.begin(evaluate)
    log.info("PPO on %s with a %s value model, %d answers/step, beta=%g", describe(actors.policy),
             actor_critic.layout, config.rollout_size, run.values["beta"])

    for step in run.steps():
        started = time.perf_counter()
        scored = rollout_and_score(actors, config)  # 1-2. answers from pi_old, scored
        beta = run.values["beta"]
        adv = gae_from_kl_shaped_rewards(actor_critic, actors, scored, config, beta)  # 3. r_t, V_old, GAE
        sums = update_actor_critic(run, step, actor_critic, (optimizer, scheduler), scored, adv, config,
                                   shuffle_generator, actors.autocast)  # 4. update_epochs passes
        batch = whole_batch(adv)  # with several ranks, the answers of all of them
        kl_per_answer = float(batch["kl"].mean()) if batch["kl"].numel() else 0.0
        if config.adaptive_kl:  # beta towards the target KL (sum over an answer's tokens, mean over answers)
            run.values["beta"] = adaptive_kl_coef(beta, kl_per_answer, config.kl_target, config.kl_horizon,
                                                  config.rollout_size)
        metrics = step_metrics(scored, batch, sums, scheduler.get_last_lr()[0], beta, kl_per_answer, started)  # 5.
        run.log(step, metrics, evaluate, score=f"{metrics['score']:.3f}", kl=f"{kl_per_answer:.3f}")

    return run.finish(evaluate, {"value_model": actor_critic.layout, "final_kl_coef": run.values["beta"]},
                      plot={"title": "PPO"}, save_also=actor_critic.save_value)


def separate_value_model(config: PPOConfig, actors: Actors):
    """The critic as its own transformer: a copy of the policy, or ``value_model_path`` (e.g. the reward model).

    Its head starts at ``value_head_init`` (``keep``: a loaded checkpoint's trained head). It reads the
    policy's token ids, so it must share the policy's vocabulary.
    """
    head_init = "zero" if config.value_head_init == "keep" else config.value_head_init
    if config.value_model_path is None:
        return scalar_model_from_causal_lm(plain_weights(actors.policy), head_init)  # LoRA: trained in full
    value_model = load_scalar_model(config.value_model_path, resolve_dtype(config.model.dtype, actors.device),
                                    actors.device, head_init=head_init, pad_token_id=actors.tokenizer.pad_token_id,
                                    reset_head=config.value_head_init != "keep")
    if value_model.config.vocab_size < len(actors.tokenizer):
        raise ModelLoadError(f"value model {config.value_model_path}: its vocabulary ({value_model.config.vocab_size}) "
                             f"is smaller than the policy's ({len(actors.tokenizer)}); a separate value model reads "
                             "the policy's tokens, so it needs the policy's tokenizer")
    return value_model


@torch.no_grad()
def gae_from_kl_shaped_rewards(actor_critic, actors: Actors, scored: ScoredRollout, config: PPOConfig,
                               beta: float) -> Advantages:
    """pi_old and V_old of every token (one pass of policy and critic), pi_ref, the per-token rewards
    (-beta k1 on every token, the score on the last), GAE and whitening."""
    score = scored.scores.total.to(actors.device)  # [N], NaN where no function applied
    if config.missing_eos_penalty is not None:
        score = score - config.missing_eos_penalty * (~scored.finished).float().to(actors.device)
    scored_rows = ~score.isnan()  # unscored answers take no part in the update
    score = torch.nan_to_num(score, nan=0.0)
    tokens = scored.tokens
    mask = tokens.completion_mask * scored_rows[:, None].long()
    n = tokens.completion_ids.size(0)
    chunks = split_rows(torch.arange(n, device=actors.device), config.num_minibatches, tokens.row_tokens(),
                        config.max_tokens_per_forward)
    options = dict(temperature=config.sampling.temperature, autocast=actors.autocast)
    with world().unsharded(actors.policy):
        old_logp, old_values = forward_in_chunks(actor_critic, tokens, chunks, **options)
    ref_logp = forward_in_chunks(actors.reference, tokens, chunks, **options)[0] if actors.reference else None
    rewards, kl, non_score = kl_shaped_rewards(score, old_logp, ref_logp, mask, beta)
    if config.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, old_values, mask, config.gamma, config.lam)
    advantages = whiten(advantages, mask, total=world().sum)  # statistics over every rank's tokens
    return Advantages(score, scored_rows, mask, old_logp, old_values, kl, non_score, advantages,
                      returns, off_policy_correction(scored, old_logp, config))


def update_actor_critic(run: Run, step: int, actor_critic, optimization, scored: ScoredRollout, adv: Advantages,
                        config: PPOConfig, shuffle_generator: torch.Generator, autocast) -> dict:
    """update_epochs passes over shuffled minibatches; policy and value losses share one backward pass."""
    optimizer, scheduler = optimization
    tokens = scored.tokens
    n = tokens.completion_ids.size(0)
    row_tokens = tokens.row_tokens()
    sums: dict = defaultdict(float)
    ranks = world()
    place = ranks.places(n, config.num_minibatches)  # each local answer's index in the whole step's batch
    actor_critic.train()
    for _ in range(config.update_epochs):
        # one permutation of the whole batch (the same on every rank); each rank trains its answers in it
        order = torch.randperm(n * ranks.size, generator=shuffle_generator)
        for minibatch in order.split(config.minibatch_size):
            minibatch = ranks.local_rows(minibatch, place).to(adv.mask.device)
            minibatch_tokens = ranks.sum(float(adv.mask[minibatch].sum()))
            if minibatch_tokens == 0:
                continue
            micro_batches = split_rows(minibatch, config.grad_accum_steps, row_tokens, config.max_tokens_per_forward)
            loss_value = accumulate_gradients(micro_batches, torch.arange(1, device=adv.mask.device),
                                              lambda rows, into: micro_batch_loss(actor_critic, tokens, rows, adv,
                                                                                  minibatch_tokens, config, into,
                                                                                  autocast), sums)
            run.optimizer_step(actor_critic, optimizer, scheduler, loss_value, step, sums)
    return sums


def whole_batch(adv: Advantages) -> dict:
    """The numbers the step's metrics are taken over, gathered from every rank: per scored answer its
    score, KL-penalty reward and KL; per valid token the critic's V_old and the return."""
    valid = adv.mask.bool()
    mine = {"score": adv.score[adv.scored], "non_score": adv.non_score.sum(dim=1)[adv.scored],
            "kl": adv.kl.sum(dim=1)[adv.scored], "values": adv.old_values[valid], "returns": adv.returns[valid]}
    if world().size == 1:
        return mine
    parts = world().gather_objects({k: v.cpu() for k, v in mine.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in mine}


def micro_batch_loss(actor_critic, tokens, rows, adv: Advantages, minibatch_tokens: float, config: PPOConfig,
                     sums: dict, autocast) -> torch.Tensor:
    """Clipped policy loss + vf_coef * clipped value loss on ``rows``, over the minibatch's valid tokens."""
    logp, entropy, values = forward_rows(actor_critic, tokens, rows, temperature=config.sampling.temperature,
                                         autocast=autocast, with_entropy=True)
    width = logp.size(1)
    mask = adv.mask[rows, :width]
    old = adv.old_logp[rows, :width]
    policy_loss, clipped = POLICY_LOSSES.get_fn(config.policy_loss)(
        logp, old, adv.advantages[rows, :width], mask, config.clip_ratio_low, config.clip_ratio_high)
    if adv.is_weights is not None:  # the answers came from the engine's pi, not pi_old (rl.off_policy_correction)
        policy_loss = policy_loss * adv.is_weights[rows, :width]
    value_loss, value_clipped = clipped_value_loss(values, adv.old_values[rows, :width], adv.returns[rows, :width],
                                                   config.clip_value)
    valid = mask.bool()
    sums["policy_loss"] += float(policy_loss.detach()[valid].sum())
    sums["value_loss"] += float(value_loss.detach()[valid].sum())
    sums["clip"] += float(clipped[valid].sum())
    sums["value_clip"] += float(value_clipped[valid].sum())
    sums["approx_kl"] += float((0.5 * (logp.detach() - old) ** 2)[valid].sum())
    sums["entropy"] += float(entropy[valid].sum())
    sums["tokens"] += float(valid.sum())
    return aggregate_loss(policy_loss + config.vf_coef * value_loss, mask, config.loss_aggregation,
                          num_sequences=config.minibatch_size, num_tokens=minibatch_tokens,
                          constant=config.sampling.max_new_tokens)


def step_metrics(scored: ScoredRollout, batch: dict, sums: dict, lr: float, beta: float, kl_per_answer: float,
                 started: float) -> dict:
    """The rollout's metrics plus PPO's: score and KL parts of the reward, losses, clipping, the critic's fit."""
    metrics = rollout_metrics(scored, time.perf_counter() - started)
    sums = summed_over_ranks(sums)
    tokens = sums["tokens"]
    applied = max(sums["updates"] - sums["skipped"], 1)
    per_token = (lambda key: sums[key] / tokens if tokens else float("nan"))
    answered = batch["score"].numel() > 0
    non_score = float(batch["non_score"].mean()) if answered else 0.0
    score = float(batch["score"].mean()) if answered else math.nan
    metrics.update({
        "score": score,
        "non_score_reward": non_score,
        "rlhf_reward": score + non_score,
        "kl": kl_per_answer,
        "kl_coef": beta,
        "loss": sums["loss"] / applied,
        "policy_loss": per_token("policy_loss"),
        "value_loss": per_token("value_loss"),
        "clip_fraction": per_token("clip"),
        "value_clip_fraction": per_token("value_clip"),
        "approx_kl": per_token("approx_kl"),
        "entropy": per_token("entropy"),
        "explained_variance": explained_variance(batch["values"], batch["returns"], torch.ones_like(batch["values"])),
        "value/mean": float(batch["values"].mean()) if batch["values"].numel() else math.nan,
        "return/mean": float(batch["returns"].mean()) if batch["returns"].numel() else math.nan,
        "lr": lr,
        "grad_norm": sums["grad_norm"] / applied,
        "skipped_updates": int(sums["skipped"]),
    })
    return metrics
