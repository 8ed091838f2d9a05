"""GRPO: Group Relative Policy Optimization (DeepSeekMath, arXiv:2402.03300), one step top to bottom.

For each prompt q, sample G answers o_1..o_G from pi_old, score them r_1..r_G, and maximise

    J(theta) = agg_{i,t} [ min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i) - beta * k3_it ]

    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i    = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)       the same for every token of answer i
    k3_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1            against a frozen reference model

where agg is the loss aggregation (per-answer token mean then mean over answers by default). There
is no value model. Each step: rollout (G answers per prompt from the current policy, which is
pi_old) -> score -> group advantages -> update (update_epochs passes over minibatches, clipped, with
the KL term) -> metrics. The advantage estimator, KL estimator, policy loss and aggregation are
picked by name from the registries in ``algorithms``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

from ..algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate_loss,
    zero_std_group_fraction,
)
from ..models.forward import FORWARD_LAYOUTS, forward_in_chunks, forward_rows, split_rows
from ..models.setup import describe
from ..runtime.run import Run
from .doctor import preflight
from .rl import Actors, RLConfig, ScoredRollout, evaluator, load_actors, rollout_and_score, rollout_metrics

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig(RLConfig):
    output_dir: str = "runs/grpo"  # where config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json go
    advantage_estimator: Literal[tuple(ADVANTAGE_ESTIMATORS)] = "grpo"  # algorithms.ADVANTAGE_ESTIMATORS
    scale_rewards: bool = True  # divide by the group std (false: Dr. GRPO's mean-only baseline)
    advantage_eps: float = 1e-4  # added to the group std in the advantage's denominator
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = "k3"  # the per-token KL term in the loss (when beta > 0)
    # the training forward (all give the same gradient; see models.forward.grouped_logprobs):
    # packed = one row per prompt, its answers back to back under a block mask, no padding;
    # shared = the prompt once, its KV cache gathered per answer; padded = [prompt | answer] per answer;
    # auto = packed or shared, whichever costs less for the batch at hand
    forward_layout: Literal[FORWARD_LAYOUTS] = "auto"

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2: GRPO's advantage compares answers to the same prompt, and a "
                f"group of {self.group_size} gives every answer zero advantage"
            )


def run_grpo(config: GRPOConfig) -> dict:
    """Train with GRPO; returns the summary also written to ``summary.json``."""
    run = Run(config, "grpo", total_steps=config.steps)
    actors = load_actors(run, config)
    preflight(actors, config)  # the doctor's cheapest checks: rewards on a few rows; warns, changes nothing
    optimizer, scheduler = config.optim.build(actors.policy, config.steps * config.optimizer_steps_per_step)
    generator = torch.Generator(device=actors.device).manual_seed(config.seed)
    run.track(model=actors.policy, tokenizer=actors.tokenizer, optimizer=optimizer, scheduler=scheduler,
              data=actors.source, sampling=generator)
    evaluate = evaluator(actors, config)
    run.begin(evaluate)
    log.info("GRPO on %s, G=%d, %d prompts/step, beta=%g", describe(actors.policy), config.group_size,
             config.prompts_per_step, config.beta)

    for step in run.steps():
        started = time.perf_counter()
        scored = rollout_and_score(actors, config, generator)  # 1-2. G answers per prompt, each scored
        advantages = group_relative_advantages(scored, config, actors.device)  # 3. one A_i per answer
        old_logp, ref_logp = old_and_reference_logprobs(actors, scored, config)
        sums = update_policy(run, step, actors, (optimizer, scheduler), scored, advantages, old_logp, ref_logp,
                             config)  # 4. update_epochs passes over minibatches
        metrics = step_metrics(scored, sums, scheduler.get_last_lr()[0], started, config,  # 5.
                               with_kl=ref_logp is not None)
        run.log(step, metrics, evaluate, reward=f"{metrics['reward/mean']:.3f}")

    return run.finish(evaluate, {"prompts_skipped_too_long": run.values["prompts_skipped_too_long"]},
                      plot={"title": "GRPO"})


def group_relative_advantages(scored: ScoredRollout, config: GRPOConfig, device) -> torch.Tensor:
    """A_i [N] from the registered estimator: each answer against the other answers to its prompt."""
    estimator = ADVANTAGE_ESTIMATORS.get_fn(config.advantage_estimator)
    rewards = scored.scores.total.to(device)  # [N], NaN where no function applied (advantage 0)
    return estimator(rewards, config.group_size, scale=config.scale_rewards, eps=config.advantage_eps)


def old_and_reference_logprobs(actors: Actors, scored: ScoredRollout, config: GRPOConfig):
    """(log pi_old [N, T] or None, log pi_ref [N, T] or None), without gradients.

    pi_old is needed only once the policy moves before the last update; with one update per rollout,
    pi_old = pi_theta.detach() and no extra forward pass is spent. pi_ref only when beta > 0.
    """
    tokens = scored.tokens
    n = tokens.completion_ids.size(0)
    chunks = split_rows(torch.arange(n, device=actors.device), 1, tokens.row_tokens(), config.max_tokens_per_forward)
    options = dict(temperature=config.sampling.temperature, layout=config.forward_layout, autocast=actors.autocast)
    off_policy = config.update_epochs > 1 or config.num_minibatches > 1
    old = forward_in_chunks(actors.policy, tokens, chunks, **options)[0] if off_policy else None
    ref = forward_in_chunks(actors.reference, tokens, chunks, **options)[0] if actors.reference is not None else None
    return old, ref


def update_policy(run: Run, step: int, actors: Actors, optimization, scored: ScoredRollout,
                  advantages: torch.Tensor, old_logp, ref_logp, config: GRPOConfig) -> dict:
    """update_epochs passes over the rollout in num_minibatches optimizer steps; returns sums for the metrics.

    At beta = 0, answers with zero advantage add nothing to the gradient, so they get no forward or
    backward; the loss normaliser still counts the whole minibatch (answers and tokens).
    """
    optimizer, scheduler = optimization
    tokens = scored.tokens
    n = tokens.completion_ids.size(0)
    row_tokens = tokens.row_tokens()
    skip = (advantages == 0) if ref_logp is None else None
    sums: dict = defaultdict(float)
    actors.policy.train()
    for _ in range(config.update_epochs):
        for minibatch in torch.arange(n, device=actors.device).split(config.minibatch_size):
            minibatch_tokens = float(tokens.completion_mask[minibatch].sum())
            loss_value = 0.0
            for rows in split_rows(minibatch, config.grad_accum_steps, row_tokens, config.max_tokens_per_forward,
                                   skip):
                loss = micro_batch_loss(actors, tokens, rows, advantages, old_logp, ref_logp, minibatch_tokens,
                                        config, sums)
                loss.backward()
                loss_value += float(loss.detach())
            run.optimizer_step(actors.policy, optimizer, scheduler, loss_value, step, sums)
    return sums


def micro_batch_loss(actors: Actors, tokens, rows, advantages, old_logp, ref_logp, minibatch_tokens: float,
                     config: GRPOConfig, sums: dict) -> torch.Tensor:
    """The clipped surrogate plus beta * KL on answer ``rows``, aggregated with the whole minibatch's counts."""
    logp, entropy, _ = forward_rows(actors.policy, tokens, rows, temperature=config.sampling.temperature,
                                    layout=config.forward_layout, autocast=actors.autocast, with_entropy=True)
    width = logp.size(1)
    mask = tokens.completion_mask[rows, :width]
    old = old_logp[rows, :width] if old_logp is not None else logp.detach()
    policy_loss = POLICY_LOSSES.get_fn(config.policy_loss)
    per_token, clipped = policy_loss(logp, old, advantages[rows], mask, config.clip_ratio_low, config.clip_ratio_high)
    if ref_logp is not None:
        kl = KL_ESTIMATORS.get_fn(config.kl_estimator)(logp, ref_logp[rows, :width])
        per_token = per_token + config.beta * kl
        sums["kl"] += float((kl.detach() * mask).sum())
    sums["clip"] += float((clipped.float() * mask).sum())
    sums["entropy"] += float((entropy * mask).sum())
    sums["tokens"] += float(mask.sum())
    return aggregate_loss(per_token, mask, config.loss_aggregation, num_sequences=config.minibatch_size,
                          num_tokens=minibatch_tokens, constant=config.sampling.max_new_tokens)


def step_metrics(scored: ScoredRollout, sums: dict, lr: float, started: float, config: GRPOConfig,
                 with_kl: bool) -> dict:
    """The rollout's metrics plus the update's: loss, clipping, entropy, KL, gradient norm, skipped updates.

    Per-token means are over the tokens that were trained on; with none (every group's rewards equal at
    beta = 0), entropy, clip fraction and KL are missing (null), not 0.
    """
    metrics = rollout_metrics(scored, time.perf_counter() - started)
    trained = sums["tokens"]
    applied = max(sums["updates"] - sums["skipped"], 1)
    per_token = (lambda key: sums[key] / trained if trained else float("nan"))
    metrics.update({
        "frac_reward_zero_std": zero_std_group_fraction(scored.scores.total, config.group_size),
        "loss": sums["loss"] / applied,
        "clip_fraction": per_token("clip"),
        "entropy": per_token("entropy"),
        "lr": lr,
        "grad_norm": sums["grad_norm"] / applied,
        "skipped_updates": int(sums["skipped"]),
        "trained_tokens": int(trained),
    })
    if with_kl:
        metrics["kl"] = per_token("kl")
    return metrics
