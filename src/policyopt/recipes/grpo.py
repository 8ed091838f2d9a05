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
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate_loss,
    zero_spread_groups,
    zero_std_group_fraction,
)
from ..inspector import InspectConfig, inspected_update
from ..models.forward import FORWARD_LAYOUTS, forward_in_chunks, forward_rows, split_rows
from ..models.setup import describe
from ..runtime.distributed import world
from ..runtime.run import Run
from .doctor import preflight
from .rl import (
    Actors,
    RLConfig,
    ScoredRollout,
    accumulate_gradients,
    concat_rollouts,
    dynamic_sampling_metrics,
    evaluator,
    load_actors,
    off_policy_correction,
    ratio_metrics,
    record_ratio_diagnostics,
    rollout_and_score,
    rollout_metrics,
    select_groups,
    summed_over_ranks,
    with_overlong_penalty,
)

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig(RLConfig):
    output_dir: str = "runs/grpo"  # where config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json go
    advantage_estimator: Literal[tuple(ADVANTAGE_ESTIMATORS)] = "grpo"  # algorithms.ADVANTAGE_ESTIMATORS
    scale_rewards: bool = True  # divide by the group std (false: Dr. GRPO's mean-only baseline)
    advantage_eps: float = 1e-4  # added to the group std in the advantage's denominator
    # KL coefficient against the frozen reference, the starting model (0 skips it). DeepSeekMath's 0.04, not TRL's 0:
    # on digit_sort it turned a mean of -21.7 points over 3 seeds into +35.8 (benchmarks/README.md, third round)
    beta: float = 0.04
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = "k3"  # the per-token KL term in the loss (when beta > 0)
    # the training forward (all give the same gradient; see models.forward.grouped_logprobs):
    # packed = one row per prompt, its answers back to back under a block mask, no padding;
    # shared = the prompt once, its KV cache gathered per answer; padded = [prompt | answer] per answer;
    # auto = packed or shared, whichever costs less for the batch at hand
    forward_layout: Literal[FORWARD_LAYOUTS] = "auto"
    # DAPO (Yu et al. 2025, arXiv:2503.14476): dynamic sampling, the soft overlong punishment, overlong filtering
    dynamic_sampling: bool = False  # train only on groups whose rewards differ; sample more prompts to refill
    max_generation_rounds: int = 3  # dynamic sampling: rollouts per step at most (then train on what was found)
    # the soft overlong punishment: 0 up to L_max - this many tokens, then down to -1 at L_max =
    # sampling.max_new_tokens, added to each answer's reward (logged as reward/overlong); 0: off
    overlong_penalty_cache: int = 0
    overlong_filter: bool = False  # answers cut at sampling.max_new_tokens (no EOS) are masked out of the loss
    inspect: InspectConfig = field(default_factory=InspectConfig)  # a few groups per step kept for `policyopt inspect`

    def validate(self) -> None:
        super().validate()
        self.inspect.validate()
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2: GRPO's advantage compares answers to the same prompt, and a "
                f"group of {self.group_size} gives every answer zero advantage"
            )
        if self.max_generation_rounds < 1:
            raise ValueError(f"max_generation_rounds must be >= 1, got {self.max_generation_rounds}")
        if not 0 <= self.overlong_penalty_cache <= self.sampling.max_new_tokens:
            raise ValueError(f"overlong_penalty_cache must be in [0, sampling.max_new_tokens="
                             f"{self.sampling.max_new_tokens}] (0: off), got {self.overlong_penalty_cache}")
        if self.dynamic_sampling and max(world().size, self.distributed.world_size) > 1:
            raise ValueError("dynamic_sampling runs on one process for now: each rank would refill its own share "
                             "of the batch to a different size")


def run_grpo(config: GRPOConfig) -> dict:
    """Train with GRPO; returns the summary also written to ``summary.json``."""
    run = Run(config, "grpo", total_steps=config.steps)
    actors = load_actors(run, config)
    preflight(actors, config)  # the doctor's cheapest checks: rewards on a few rows; warns, changes nothing
    optimizer, scheduler = config.optim.build(actors.policy, config.steps * config.optimizer_steps_per_step)
    run.track(model=actors.policy, tokenizer=actors.tokenizer, optimizer=optimizer, scheduler=scheduler,
              data=actors.source)  # sampling needs no generator: each answer's noise comes from (seed, prompt, j)
    evaluate = evaluator(actors, config)
    run.begin(evaluate)
    log.info("GRPO on %s, G=%d, %d prompts/step, beta=%g", describe(actors.policy), config.group_size,
             config.prompts_per_step, config.beta)

    for step in run.steps():
        started = time.perf_counter()
        scored, sampled = rollout_with_signal(actors, config)  # 1-2. G answers per prompt, scored
        advantages = group_relative_advantages(scored, config, actors.device)  # 3. one A_i per answer
        old_logp, ref_logp = old_and_reference_logprobs(actors, scored, config)
        is_weights = off_policy_correction(scored, old_logp, config, log_into=sampled)  # vllm: pi_old / pi_engine
        with inspected_update(run, actors, config, step, scored, advantages):  # inspect.groups: pi_old/theta/ref
            sums = update_policy(run, step, actors, (optimizer, scheduler), scored, advantages, old_logp, ref_logp,
                                 config, is_weights)  # 4. update_epochs passes over minibatches
        metrics = step_metrics(scored, sampled, sums, scheduler.get_last_lr()[0], started, config,  # 5.
                               with_kl=ref_logp is not None)
        run.log(step, metrics, evaluate, reward=f"{metrics['reward/mean']:.3f}")

    return run.finish(evaluate, {"prompts_skipped_too_long": run.values["prompts_skipped_too_long"]},
                      plot={"title": "GRPO"})


def rollout_with_signal(actors: Actors, config: GRPOConfig) -> tuple[ScoredRollout, ScoredRollout]:
    """(the batch to train on, every answer sampled this step): one rollout each, unless dynamic sampling.

    DAPO's dynamic sampling: each round samples prompts_per_step prompts; groups whose rewards are all
    equal (zero advantage for every answer) are dropped, and rounds go on until prompts_per_step groups
    with signal are in hand (the first ones found are kept, the extra drawn prompts are consumed) or
    max_generation_rounds is reached. Then the step trains on the groups found, a smaller batch whose
    normalisers count what it holds (``update_policy``); with none, the step makes no update. The
    overlong punishment is added to the rewards before the groups are judged.
    """
    kept, rounds, found = [], [], 0
    for _ in range(config.max_generation_rounds if config.dynamic_sampling else 1):
        scored = with_overlong_penalty(rollout_and_score(actors, config), config.sampling.max_new_tokens,
                                       config.overlong_penalty_cache)
        rounds.append(scored)
        if not config.dynamic_sampling:
            return scored, scored
        signal = ~zero_spread_groups(scored.scores.total, config.group_size)
        kept.append(select_groups(scored, signal))
        found += int(signal.sum())
        if found >= config.prompts_per_step:
            break
    pad = actors.tokenizer.pad_token_id
    trained = concat_rollouts(kept, pad)
    trained = select_groups(trained, torch.arange(found) < config.prompts_per_step)
    return trained, concat_rollouts(rounds, pad)


def trained_token_mask(scored: ScoredRollout, config: GRPOConfig) -> torch.Tensor:
    """[N, T] the answer tokens the loss is taken over: all of them, less every token of the answers cut
    at sampling.max_new_tokens when overlong_filter is set (DAPO's overlong filtering)."""
    mask = scored.tokens.completion_mask
    if config.overlong_filter:
        mask = mask * scored.finished.to(mask.device, mask.dtype)[:, None]
    return mask


def group_relative_advantages(scored: ScoredRollout, config: GRPOConfig, device) -> torch.Tensor:
    """A_i [N] from the registered estimator: each answer against the other answers to its prompt.

    With several ranks, the estimator sees the whole step's rewards (REINFORCE++ normalises over the
    batch) and each rank keeps its own answers' advantages.
    """
    estimator = ADVANTAGE_ESTIMATORS.get_fn(config.advantage_estimator)
    rewards = scored.scores.total.to(device)  # [N], NaN where no function applied (advantage 0)
    everyone = world().gather(rewards)
    advantages = estimator(everyone, config.group_size, scale=config.scale_rewards, eps=config.advantage_eps)
    n = rewards.numel()
    return advantages[world().rank * n: (world().rank + 1) * n]


def old_and_reference_logprobs(actors: Actors, scored: ScoredRollout, config: GRPOConfig):
    """(log pi_old [N, T] or None, log pi_ref [N, T] or None), without gradients.

    pi_old is needed only once the policy moves before the last update; with one update per rollout,
    pi_old = pi_theta.detach() and no extra forward pass is spent, unless an engine sampled the answers
    (rollout.engine=vllm): its pi differs slightly, and the trainer's pi_old is what the IS weights need.
    pi_ref only when beta > 0.
    """
    tokens = scored.tokens
    n = tokens.completion_ids.size(0)
    chunks = split_rows(torch.arange(n, device=actors.device), 1, tokens.row_tokens(), config.max_tokens_per_forward)
    options = dict(temperature=config.sampling.temperature, layout=config.forward_layout, autocast=actors.autocast)
    off_policy = config.update_epochs > 1 or config.num_minibatches > 1 or scored.engine_logp is not None
    with world().unsharded(actors.policy):
        old = forward_in_chunks(actors.policy, tokens, chunks, **options)[0] if off_policy else None
    ref = forward_in_chunks(actors.reference, tokens, chunks, **options)[0] if actors.reference is not None else None
    return old, ref


def update_policy(run: Run, step: int, actors: Actors, optimization, scored: ScoredRollout,
                  advantages: torch.Tensor, old_logp, ref_logp, config: GRPOConfig, is_weights=None) -> dict:
    """update_epochs passes over the rollout in num_minibatches optimizer steps; returns sums for the metrics.

    At beta = 0, answers with zero advantage add nothing to the gradient, so they get no forward or
    backward; the loss normaliser still counts the whole minibatch (answers and tokens), over all
    ranks: each rank's minibatch m is its share of the global minibatch m. Answers the overlong filter
    masks out count in neither. The normalisers count the minibatch as it is, so a batch that dynamic
    sampling left short is num_minibatches near-equal minibatches of what it holds.
    """
    optimizer, scheduler = optimization
    tokens = scored.tokens
    n = tokens.completion_ids.size(0)
    row_tokens = tokens.row_tokens()
    loss_mask = trained_token_mask(scored, config)
    trained_rows = loss_mask.any(dim=1)  # False: an answer the overlong filter masks out, no forward needed
    skip = (~trained_rows | (advantages == 0)) if ref_logp is None else ~trained_rows
    sums: dict = defaultdict(float)
    actors.policy.train()
    ranks = world()
    for _ in range(config.update_epochs):
        for minibatch in torch.arange(n, device=actors.device).tensor_split(config.num_minibatches):
            counts = (ranks.sum(float(trained_rows[minibatch].sum())), ranks.sum(float(loss_mask[minibatch].sum())))
            micro_batches = split_rows(minibatch, config.grad_accum_steps, row_tokens, config.max_tokens_per_forward,
                                       skip)
            loss_value = accumulate_gradients(micro_batches, minibatch[:1], lambda rows, into: micro_batch_loss(
                actors, tokens, rows, advantages, old_logp, ref_logp, loss_mask, counts, config, into, is_weights), sums)
            run.optimizer_step(actors.policy, optimizer, scheduler, loss_value, step, sums)
    return sums


def micro_batch_loss(actors: Actors, tokens, rows, advantages, old_logp, ref_logp, loss_mask, minibatch_counts,
                     config: GRPOConfig, sums: dict, is_weights=None) -> torch.Tensor:
    """The clipped surrogate plus beta * KL on answer ``rows``, aggregated with the whole minibatch's counts
    ``minibatch_counts`` = (answers, tokens) under ``loss_mask`` [N, T] (``trained_token_mask``). The surrogate
    is weighted by ``is_weights`` [N, T] (truncated pi_old / pi_engine, detached) when an engine sampled."""
    logp, entropy, _ = forward_rows(actors.policy, tokens, rows, temperature=config.sampling.temperature,
                                    layout=training_layout(config), autocast=actors.autocast, with_entropy=True)
    width = logp.size(1)
    mask = loss_mask[rows, :width]
    old = old_logp[rows, :width] if old_logp is not None else logp.detach()
    policy_loss = POLICY_LOSSES.get_fn(config.policy_loss)
    per_token, clipped = policy_loss(logp, old, advantages[rows], mask, config.clip_ratio_low, config.clip_ratio_high)
    record_ratio_diagnostics(sums, config.policy_loss, logp, old, mask, clipped)
    if is_weights is not None:  # the answers came from the engine's pi, not pi_old (rl.off_policy_correction)
        per_token = per_token * is_weights[rows, :width]
    if ref_logp is not None:
        kl = KL_ESTIMATORS.get_fn(config.kl_estimator)(logp, ref_logp[rows, :width])
        per_token = per_token + config.beta * kl
        sums["kl"] += float((kl.detach() * mask).sum())
    sums["clip"] += float((clipped.float() * mask).sum())
    sums["entropy"] += float((entropy * mask).sum())
    sums["tokens"] += float(mask.sum())
    return aggregate_loss(per_token, mask, config.loss_aggregation, num_sequences=minibatch_counts[0],
                          num_tokens=minibatch_counts[1], constant=config.sampling.max_new_tokens)


def training_layout(config: GRPOConfig) -> str:
    """The training forward's layout. Under fsdp every rank must run the same number of model calls in
    the same order, so ``auto`` (which picks per micro-batch, shared taking two calls) is ``padded``."""
    return "padded" if world().sharded and config.forward_layout == "auto" else config.forward_layout


def step_metrics(scored: ScoredRollout, sampled: ScoredRollout, sums: dict, lr: float, started: float,
                 config: GRPOConfig, with_kl: bool) -> dict:
    """The rollout's metrics plus the update's: loss, clipping, entropy, KL, gradient norm, skipped updates.

    Rewards, lengths and the zero-spread share are over every answer sampled (with dynamic sampling,
    all rounds', so they describe the policy, not the filtered batch). Per-token means are over the
    tokens that were trained on; with none (every group's rewards equal at beta = 0), entropy, clip
    fractions and KL are missing (null), not 0. The ratio/* statistics are this rank's.
    """
    metrics = rollout_metrics(sampled, time.perf_counter() - started)
    metrics.update(ratio_metrics(sums))
    if config.dynamic_sampling:
        metrics.update(dynamic_sampling_metrics(scored, sampled, config))
    sums = summed_over_ranks(sums)
    trained = sums["tokens"]
    applied = max(sums["updates"] - sums["skipped"], 1)
    per_token = (lambda key: sums[key] / trained if trained else float("nan"))
    metrics.update({
        "frac_reward_zero_std": zero_std_group_fraction(world().gather(sampled.scores.total), config.group_size),
        "loss": sums["loss"] / applied,
        "clip_fraction": per_token("clip"),
        "clip_fraction_low": per_token("clip_low"),
        "clip_fraction_high": per_token("clip_high"),
        "entropy": per_token("entropy"),
        "lr": lr,
        "grad_norm": sums["grad_norm"] / applied,
        "skipped_updates": int(sums["skipped"]),
        "trained_tokens": int(trained),
    })
    if with_kl:
        metrics["kl"] = per_token("kl")
    return metrics
