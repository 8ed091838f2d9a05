"""What GRPO and PPO share: their settings, their models and data, and the rollout-and-score step.

Both recipes run the same loop, rollout -> score -> advantages -> update -> metrics; they differ in
the advantages and the update. Everything before the advantages, and the rollout's metrics, is here
once, so a new rollout engine or reward path lands in both at the same time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ..algorithms import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SEQUENCE_LEVEL_LOSSES,
    overlong_penalty,
    policy_log_ratio,
    zero_spread_groups,
)
from ..data.batching import decode_completions, encode_prompts
from ..data.loading import prompt_text
from ..data.sources import DataConfig, PromptSource
from ..evaluation import PassAtK, evaluate
from ..models.forward import TokenBatch, trim_padding
from ..models.loading import frozen_copy
from ..models.lora import is_adapter_model, reference_policy
from ..models.setup import ModelConfig, forward_autocast, load_or_build
from ..rewards.combine import RewardScores, RewardSpec
from ..rewards.harness import RewardHarness
from ..rollout.engine import RolloutConfig, RolloutEngine, build_engine, importance_weights, mismatch_metrics
from ..rollout.sampling import SamplingConfig, answer_noise
from ..runtime.distributed import launched_world_size, world
from ..runtime.run import Run, RunSettings

log = logging.getLogger(__name__)

LossAggregation = Literal[tuple(LOSS_AGGREGATIONS)]
PolicyLoss = Literal[tuple(POLICY_LOSSES)]


@dataclass
class RLConfig(RunSettings):
    """Settings GRPO and PPO share, under the same names."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the policy (and tokenizer) to train
    data: DataConfig = field(default_factory=DataConfig)  # training prompts and held-out rows
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # how answers are sampled during training
    # what samples them (policyopt's sampler or a colocated vLLM engine) and the off-policy correction
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # reward functions (built-in names, file.py:function, or rm:/path/to/reward_model), weighted and summed
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.1)]
    )
    reward_on_error: Literal["raise", "skip"] = "raise"  # raise: stop the run; skip: score the sample as missing
    reward_timeout: float = 300.0  # seconds one call of a reward function may take (0: no limit); see reward_workers
    # 0: reward functions run in the trainer (the timeout holds on its main thread, for Python code); N: in N
    # worker processes, killed and replaced at the timeout or when they crash (rm: reward models stay in the trainer)
    reward_workers: int = 0
    # stop when a reward function returns None (could not score) for every answer of this many training
    # batches in a row (0: never); each such batch logs a warning
    reward_max_unscored_batches: int = 3

    # batch geometry: each step samples prompts_per_step * group_size answers (the rollout batch)
    steps: int = 200  # training steps, one rollout batch each (60 left most tasks where they started: benchmarks/defaults.py)
    prompts_per_step: int = 64  # prompts sampled per step
    group_size: int = 8  # answers sampled per prompt (G)
    update_epochs: int = 1  # optimisation passes over each rollout batch (GRPO's mu, PPO's epochs)
    num_minibatches: int = 1  # optimizer steps per pass; each minibatch is rollout batch / num_minibatches answers
    grad_accum_steps: int = 1  # micro-batches per optimizer step (same gradient, less memory)
    # forward passes are further split so that none runs more than this many prompt + answer tokens
    # (same gradient; bounds activation memory for long answers and large groups); 0: no limit
    max_tokens_per_forward: int = 8192

    # objective
    beta: float = 0.0  # KL coefficient against the frozen reference; 0 skips the reference model entirely (GRPO: 0.04)
    policy_loss: PolicyLoss = "ppo_clip"  # the per-token policy loss (algorithms.POLICY_LOSSES)
    clip_ratio_low: float = 0.2  # the ratio pi/pi_old is clipped below at 1 - clip_ratio_low
    clip_ratio_high: float = 0.2  # and above at 1 + clip_ratio_high (> low: DAPO's clip-higher)
    # how per-token losses become one number (algorithms.LOSS_AGGREGATIONS): seq_mean_token_mean
    # (DeepSeekMath), token_mean (DAPO, PPO) or seq_sum_constant (Dr. GRPO: sum / (answers * max_new_tokens))
    loss_aggregation: LossAggregation = "seq_mean_token_mean"

    # pass@k at each evaluation, beside greedy accuracy: eval_samples answers per held-out prompt at
    # eval_temperature, scored with the unbiased estimator 1 - C(n - c, k) / C(n, k) (algorithms.pass_at_k)
    eval_pass_k: int = 0  # k of pass@k (0: off); logged as eval/pass@<k>, with eval/pass@1_sampled
    eval_samples: int = 8  # n >= k answers sampled per held-out prompt for pass@k
    eval_temperature: float = 1.0  # the temperature those answers are sampled at (> 0)
    eval_pass_reward: str = "accuracy"  # the reward (by its logged name) that decides if an answer is correct
    eval_pass_threshold: float = 1.0  # an answer is correct when that reward scores it >= this

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        self.sampling.validate()
        self.rollout.validate()
        for name in ("steps", "prompts_per_step", "group_size", "update_epochs", "num_minibatches",
                     "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_forward < 0:
            raise ValueError(f"max_tokens_per_forward must be >= 0 (0: no limit), got {self.max_tokens_per_forward}")
        rollout = self.rollout_size
        if rollout % self.num_minibatches:
            raise ValueError(f"num_minibatches ({self.num_minibatches}) must divide the rollout batch "
                             f"prompts_per_step * group_size = {self.prompts_per_step} * {self.group_size} = {rollout}")
        if self.minibatch_size % self.grad_accum_steps:
            raise ValueError(f"grad_accum_steps ({self.grad_accum_steps}) must divide the minibatch "
                             f"({self.minibatch_size} answers)")
        if self.beta < 0 or self.clip_ratio_low < 0 or self.clip_ratio_high < 0:
            raise ValueError("beta, clip_ratio_low and clip_ratio_high must be >= 0")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward function or reward model")
        for name in ("reward_timeout", "reward_workers", "reward_max_unscored_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_pass_k:
            self._validate_pass_at_k()
        ranks = launched_world_size()
        if ranks > 1 and self.prompts_per_step % (ranks * self.num_minibatches):
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of the number of "
                             f"processes x num_minibatches ({ranks} x {self.num_minibatches}): each rank takes "
                             "an equal share of every minibatch's prompts")

    def _validate_pass_at_k(self) -> None:
        if not 1 <= self.eval_pass_k <= self.eval_samples:
            raise ValueError(f"eval_pass_k must be in [1, eval_samples={self.eval_samples}] (0: off), "
                             f"got {self.eval_pass_k}")
        if self.eval_temperature <= 0:
            raise ValueError(f"eval_temperature must be > 0 for pass@k (0 samples one answer n times), "
                             f"got {self.eval_temperature}")
        names = [spec.name for spec in self.rewards]
        if self.eval_pass_reward not in names:
            raise ValueError(f"eval_pass_reward={self.eval_pass_reward!r} names none of the run's rewards "
                             f"({', '.join(map(str, names))}); pass@k needs one to decide which answers are correct")

    def pass_at_k(self) -> PassAtK | None:
        """What the evaluator samples for pass@k; None when off."""
        if not self.eval_pass_k:
            return None
        return PassAtK(self.eval_pass_k, self.eval_samples, self.eval_temperature, self.eval_pass_reward,
                       self.eval_pass_threshold, seed=self.seed)

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.num_minibatches

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.update_epochs * self.num_minibatches

    def derived(self) -> dict:
        ranks = world().size
        normaliser = {"seq_mean_token_mean": f"{self.minibatch_size} answers (token mean within each)",
                      "token_mean": "the minibatch's answer tokens",
                      "seq_sum_constant": f"{self.minibatch_size} answers x {self.sampling.max_new_tokens} tokens"}
        return {"answers per step": f"{self.rollout_size} ({self.prompts_per_step} prompts x {self.group_size})"
                                    + (f", {self.rollout_size // ranks} on each of {ranks} ranks" if ranks > 1 else ""),
                "optimizer steps per rollout": f"{self.optimizer_steps_per_step} ({self.update_epochs} passes x "
                                               f"{self.num_minibatches} minibatches of {self.minibatch_size})",
                "optimizer steps in all": self.steps * self.optimizer_steps_per_step,
                "loss normaliser": normaliser.get(self.loss_aggregation, self.loss_aggregation)}


@dataclass
class Actors:
    """The models and data an RL run starts with."""

    source: PromptSource
    policy: torch.nn.Module
    tokenizer: object
    device: torch.device
    # the starting policy, frozen: a copy, or with LoRA the policy with its adapter disabled; None when beta = 0
    reference: torch.nn.Module | None
    reward_functions: RewardHarness  # the run's rewards, called under reward_timeout, failures per reward_on_error
    autocast: torch.dtype | None  # forward passes run under this dtype (None: the weights' own)
    engine: RolloutEngine | None = None  # samples the answers (rollout.engine); set by load_actors


def load_actors(run: Run, config: RLConfig) -> Actors:
    """Prompts, the policy (the model this run built, when resuming), its frozen reference, rewards."""
    source = PromptSource(config.data, config.seed)
    rewards = RewardHarness.from_specs(config.rewards, timeout=config.reward_timeout, workers=config.reward_workers,
                                       on_error=config.reward_on_error,
                                       max_unscored_batches=config.reward_max_unscored_batches)  # before any build
    texts = [prompt_text(r["prompt"]) for r in (source.train_rows or source.eval_rows)]
    model_config = run.model_source(config.model)
    policy, tokenizer, device = load_or_build(model_config, texts, config.seed, save_dir=run.build_dir)
    skipped = source.drop_long_prompts(tokenizer)
    if skipped:
        log.warning("skipped %d training prompts longer than data.max_prompt_tokens=%d",
                    skipped, config.data.max_prompt_tokens)
    run.values.setdefault("prompts_skipped_too_long", skipped)
    reference = None
    if config.beta > 0:  # with LoRA: the base under the adapter, switched off (no second copy of the model)
        reference = reference_policy(policy) if is_adapter_model(policy) else frozen_copy(policy)
    policy = world().prepare_model(policy)  # sharded in place under distributed.strategy=fsdp
    actors = Actors(source, policy, tokenizer, device, reference, rewards,
                    forward_autocast(model_config, policy, device))
    actors.engine = build_engine(config.rollout, policy, tokenizer, device, actors.autocast,
                                 config.data.max_prompt_tokens + config.sampling.max_new_tokens, config.seed)
    return actors


def evaluator(actors: Actors, config: RLConfig) -> Callable[[], dict]:
    """Held-out greedy evaluation of the policy with the run's reward functions (and pass@k, when set)."""
    def run_eval() -> dict:
        ranks = world()
        rows = actors.source.eval_rows[ranks.rank::ranks.size]  # each rank answers its share of the rows
        with ranks.unsharded(actors.policy):
            metrics = evaluate(actors.policy, actors.tokenizer, rows, actors.reward_functions,
                               config.sampling.max_new_tokens, config.data.max_prompt_tokens, actors.device,
                               on_error=config.reward_on_error, autocast=actors.autocast,
                               pass_k=config.pass_at_k())
        return mean_over_ranks(metrics, len(rows))
    return run_eval


def mean_over_ranks(metrics: dict, count: int) -> dict:
    """Per-rank means of ``count`` rows each, combined into the means over every rank's rows."""
    if world().size == 1:
        return metrics
    parts = world().gather_objects((metrics, count))
    combined = {}
    for key in sorted(set().union(*(m for m, _ in parts))):
        valid = [(m[key], n) for m, n in parts if key in m and not math.isnan(m[key])]
        combined[key] = sum(v * n for v, n in valid) / sum(n for _, n in valid) if valid else math.nan
    return combined


@dataclass
class ScoredRollout:
    """One step's answers and their scores."""

    tokens: TokenBatch  # prompts once each, answers group-contiguous (trimmed of shared padding)
    finished: torch.Tensor  # [N] bool: the answer ended with EOS
    scores: RewardScores  # per function [N, F] and the weighted total [N] (NaN: no function applied)
    num_truncated: int  # prompts cut to data.max_prompt_tokens
    generation_seconds: float
    # [N, T] the engine's own log pi(o_t) of its samples (rollout.engine=vllm); None from policyopt's sampler
    engine_logp: torch.Tensor | None = None
    engine_metrics: dict = field(default_factory=dict)  # the weight sync's and the engine-vs-trainer mismatch's

    @property
    def lengths(self) -> torch.Tensor:
        return self.tokens.completion_mask.sum(1)


def rollout_and_score(actors: Actors, config: RLConfig) -> ScoredRollout:
    """Sample G answers to each of the step's prompts from the current policy, then score every answer.

    Every dataset column reaches the reward functions, repeated for each of a prompt's answers.
    """
    started = time.perf_counter()
    first = actors.source.prompts_drawn
    drawn = list(enumerate(actors.source.next_batch(config.prompts_per_step), start=first))
    # every rank draws the step's prompts and takes its share; a prompt's key (its place in the stream)
    # seeds its answers' noise, so the answers are the same on any number of ranks
    keys, rows = zip(*world().share(drawn, pieces=config.num_minibatches))
    prompts = [r["prompt"] for r in rows]
    G = config.group_size
    prompt_ids, prompt_mask, num_truncated = encode_prompts(actors.tokenizer, prompts, config.data.max_prompt_tokens,
                                                            actors.device)
    with world().unsharded(actors.policy):
        # the engine takes the policy's weights as they are now (after the last step's updates; at the first
        # step and after a resume, the loaded ones); policyopt's sampler uses them in place
        synced = actors.engine.sync_weights(actors.policy)
        rollout = actors.engine.generate(prompt_ids, prompt_mask, G, config.sampling,
                                         noise=answer_noise(config.seed, list(keys), G, config.sampling.max_new_tokens))
    completions = decode_completions(actors.tokenizer, rollout.completion_ids, rollout.completion_mask)
    generation_seconds = time.perf_counter() - started
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
    scores = actors.reward_functions.score([p for p in prompts for _ in range(G)], completions, columns)
    tokens = TokenBatch(*trim_padding(prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask),
                        group_size=G)
    engine_logp = None if rollout.logprobs is None else rollout.logprobs[:, :tokens.completion_ids.size(1)]
    return ScoredRollout(tokens, rollout.finished, scores, num_truncated, generation_seconds, engine_logp,
                         {f"rollout/{key}": value for key, value in synced.items()})


def off_policy_correction(scored: ScoredRollout, old_logp: torch.Tensor | None, config: RLConfig,
                          log_into: ScoredRollout | None = None):
    """Truncated importance weights [N, T] for answers the engine sampled (``engine.importance_weights``),
    or None: with policyopt's own sampler (no engine log-probs: pi_engine is pi_old, every weight exactly 1)
    or rollout.is_correction=off. The engine-vs-trainer mismatch (``engine.mismatch_metrics``) joins the
    step's metrics (the ``engine_metrics`` of ``log_into``, default ``scored``: the rollout whose metrics
    are logged). ``old_logp``: the trainer's log pi_old [N, T] of the answers.
    """
    if scored.engine_logp is None or old_logp is None:
        return None
    mask = scored.tokens.completion_mask
    engine_logp = scored.engine_logp.to(old_logp.device)
    weights = importance_weights(old_logp, engine_logp, mask, config.rollout.is_correction, config.rollout.is_cap)
    (log_into or scored).engine_metrics.update(mismatch_metrics(old_logp, engine_logp, mask, weights,
                                                                config.rollout.is_cap))
    return weights


def rollout_metrics(scored: ScoredRollout, seconds: float) -> dict:
    """What every RL step logs about its answers: rewards per function, lengths, throughput, failures.

    Over the whole step's batch: with several ranks, their answers' numbers are gathered first.
    """
    ranks = world()
    lengths = ranks.gather(scored.lengths.float())
    rewards = ranks.gather(scored.scores.total.float())
    per_function = ranks.gather(scored.scores.per_function.float())
    counts = ranks.sum_dict({"prompt_tokens": float(scored.tokens.prompt_mask.sum()) * scored.tokens.group_size,
                             "truncated": scored.num_truncated, "failed": scored.scores.num_failed})
    metrics = {
        "reward/mean": float(rewards.nanmean()),
        "reward/std": nanstd(rewards),
        "completion_length": float(lengths.mean()),
        "frac_finished": float(ranks.gather(scored.finished.float()).mean()),
        "seconds_per_step": seconds,
        "generation_seconds": scored.generation_seconds,
        "tokens_per_second": (counts["prompt_tokens"] + float(lengths.sum())) / seconds,
        "prompts_truncated": int(counts["truncated"]),
        "reward_failures": int(counts["failed"]),
    }
    for j, name in enumerate(scored.scores.names):
        column = per_function[:, j]
        metrics[f"reward/{name}/mean"] = float(column.nanmean())
        metrics[f"reward/{name}/std"] = nanstd(column)
    engine = scored.engine_metrics  # means over the ranks (each rank syncs and samples its own engine)
    metrics.update(engine if ranks.size == 1 else {k: v / ranks.size for k, v in ranks.sum_dict(engine).items()})
    return metrics


def accumulate_gradients(micro_batches: list[torch.Tensor], filler: torch.Tensor, loss_of, sums: dict) -> float:
    """Backward through ``loss_of(rows, sums)`` for each micro-batch; returns the summed loss.

    Under fsdp every rank must run as many forward and backward passes as the others (each joins the
    shards' collectives), so a rank with fewer micro-batches runs empty ones: ``filler`` rows with the
    loss multiplied by 0, counted in no sum.
    """
    micro_batches = [rows for rows in micro_batches if len(rows)]
    total = 0.0
    for i in range(world().equalise(len(micro_batches))):
        empty = i >= len(micro_batches)
        loss = loss_of(filler if empty else micro_batches[i], defaultdict(float) if empty else sums)
        if empty:
            loss = loss * 0.0
        loss.backward()
        total += float(loss.detach())
    return total


PER_UPDATE_SUMS = ("updates", "skipped", "loss", "grad_norm")  # Run.optimizer_step's: the same on every rank


def summed_over_ranks(sums: dict) -> defaultdict:
    """An update's sums (tokens, clipped tokens, entropy, ...) over every rank's answers."""
    shared = {k: v for k, v in sums.items() if k not in PER_UPDATE_SUMS}
    return defaultdict(float, {**sums, **world().sum_dict(shared)})


def nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.std()) if valid.numel() > 1 else math.nan


def select_groups(scored: ScoredRollout, keep: torch.Tensor) -> ScoredRollout:
    """The groups (a prompt and its G answers) of ``scored`` where ``keep`` [B] is True, in order, with the
    padding that no kept row needs trimmed again. Counts (truncated prompts, failures, seconds) stay the
    whole rollout's."""
    tokens, G = scored.tokens, scored.tokens.group_size
    groups = keep.to(torch.bool).cpu().nonzero().flatten()
    rows = (groups[:, None] * G + torch.arange(G)).flatten()
    on = tokens.prompt_ids.device
    kept_tokens = TokenBatch(*trim_padding(tokens.prompt_ids[groups.to(on)], tokens.prompt_mask[groups.to(on)],
                                           tokens.completion_ids[rows.to(on)], tokens.completion_mask[rows.to(on)]),
                             group_size=G)
    s = scored.scores
    scores = RewardScores(s.per_function[rows], s.total[rows], s.names, s.num_failed)
    engine_logp = None if scored.engine_logp is None else \
        scored.engine_logp[rows.to(on)][:, :kept_tokens.completion_ids.size(1)]
    return ScoredRollout(kept_tokens, scored.finished[rows.to(scored.finished.device)], scores,
                         scored.num_truncated, scored.generation_seconds, engine_logp, dict(scored.engine_metrics))


def concat_rollouts(parts: list[ScoredRollout], pad_token_id: int) -> ScoredRollout:
    """One rollout holding the groups of ``parts`` in order: prompts left-padded and answers right-padded
    (with ``pad_token_id``, mask 0) to the widest part; counts and seconds summed."""
    if not parts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len({p.tokens.group_size for p in parts}) > 1 or len({tuple(p.scores.names) for p in parts}) > 1:
        raise ValueError("concat_rollouts: the rollouts differ in group size or reward functions")
    prompt_width = max(p.tokens.prompt_ids.size(1) for p in parts)
    answer_width = max(p.tokens.completion_ids.size(1) for p in parts)

    def padded(tensor, width, value, left):
        extra = width - tensor.size(1)
        return torch.nn.functional.pad(tensor, (extra, 0) if left else (0, extra), value=value)

    tokens = TokenBatch(torch.cat([padded(p.tokens.prompt_ids, prompt_width, pad_token_id, True) for p in parts]),
                        torch.cat([padded(p.tokens.prompt_mask, prompt_width, 0, True) for p in parts]),
                        torch.cat([padded(p.tokens.completion_ids, answer_width, pad_token_id, False) for p in parts]),
                        torch.cat([padded(p.tokens.completion_mask, answer_width, 0, False) for p in parts]),
                        group_size=parts[0].tokens.group_size)
    scores = RewardScores(torch.cat([p.scores.per_function for p in parts]), torch.cat([p.scores.total for p in parts]),
                          parts[0].scores.names, sum(p.scores.num_failed for p in parts))
    engine_logp = None if any(p.engine_logp is None for p in parts) else \
        torch.cat([padded(p.engine_logp, answer_width, 0.0, False) for p in parts])
    engine_metrics = {k: v for p in parts for k, v in p.engine_metrics.items()}  # the last sync's
    return ScoredRollout(tokens, torch.cat([p.finished for p in parts]), scores,
                         sum(p.num_truncated for p in parts), sum(p.generation_seconds for p in parts),
                         engine_logp, engine_metrics)


def with_overlong_penalty(scored: ScoredRollout, max_len: int, cache_len: int) -> ScoredRollout:
    """DAPO's soft overlong punishment (``algorithms.overlong_penalty``, L_max = ``max_len``, L_cache =
    ``cache_len``) added to each answer's total reward, and kept as the reward column ``overlong``;
    unchanged when cache_len = 0."""
    if not cache_len:
        return scored
    scores = scored.scores
    penalty = overlong_penalty(scored.lengths.cpu(), max_len, cache_len)
    scores.per_function = torch.cat([scores.per_function, penalty.to(scores.per_function.dtype)[:, None]], dim=1)
    scores.total = scores.total + penalty.to(scores.total.dtype)  # NaN (no reward applied) stays NaN
    scores.names = [*scores.names, "overlong"]
    return scored


def record_ratio_diagnostics(sums: dict, policy_loss: str, logp, old, mask, clipped) -> None:
    """Adds to ``sums`` what compares the variants: the tokens clipped below 1 - eps_low (clip_low) and
    above 1 + eps_high (clip_high), and the importance ratio's sum, count, min and max, over the tokens
    for token-level losses and over the answers (s_i) for GSPO."""
    log_ratio = policy_log_ratio(policy_loss, logp, old, mask)
    valid = mask.bool()
    sums["clip_low"] += float((clipped & valid & (log_ratio < 0)).sum())
    sums["clip_high"] += float((clipped & valid & (log_ratio > 0)).sum())
    if policy_loss in SEQUENCE_LEVEL_LOSSES:  # one s_i per answer, the same on each of its tokens
        ratio = (log_ratio.sum(1) / valid.sum(1).clamp(min=1))[valid.any(1)].exp()
    else:
        ratio = log_ratio[valid].exp()
    if ratio.numel():
        sums["ratio_sum"] += float(ratio.sum())
        sums["ratio_count"] += ratio.numel()
        sums["ratio_min"] = min(sums["ratio_min"] if "ratio_min" in sums else float("inf"), float(ratio.min()))
        sums["ratio_max"] = max(sums["ratio_max"] if "ratio_max" in sums else float("-inf"), float(ratio.max()))


def ratio_metrics(sums: dict) -> dict:
    """ratio/mean, ratio/min, ratio/max of pi_theta / pi_old over what was trained (null with nothing)."""
    if not sums.get("ratio_count"):
        return {"ratio/mean": float("nan"), "ratio/min": float("nan"), "ratio/max": float("nan")}
    return {"ratio/mean": sums["ratio_sum"] / sums["ratio_count"], "ratio/min": sums["ratio_min"],
            "ratio/max": sums["ratio_max"]}


def dynamic_sampling_metrics(trained: ScoredRollout, sampled: ScoredRollout, config: RLConfig) -> dict:
    """Rounds, groups sampled, dropped (zero spread) and trained, and the share of sampled groups kept."""
    groups = sampled.tokens.prompt_ids.size(0)
    dropped = int(zero_spread_groups(sampled.scores.total, config.group_size).sum())
    return {"dynamic_sampling/rounds": groups // config.prompts_per_step,
            "dynamic_sampling/groups_sampled": groups,
            "dynamic_sampling/groups_dropped": dropped,
            "dynamic_sampling/groups_trained": trained.tokens.prompt_ids.size(0),
            "dynamic_sampling/share_kept": (groups - dropped) / groups}
