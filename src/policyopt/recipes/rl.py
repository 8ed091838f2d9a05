"""What GRPO and PPO share: their settings, their models and data, and the rollout-and-score step.

Both recipes run the same loop, rollout -> score -> advantages -> update -> metrics; they differ in
the advantages and the update. Everything before the advantages, and the rollout's metrics, is here
once, so a new rollout engine or reward path lands in both at the same time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ..algorithms import LOSS_AGGREGATIONS, POLICY_LOSSES
from ..data.batching import decode_completions, encode_prompts
from ..data.loading import prompt_text
from ..data.sources import DataConfig, PromptSource
from ..evaluation import evaluate
from ..models.forward import TokenBatch, trim_padding
from ..models.loading import frozen_copy
from ..models.lora import is_adapter_model, reference_policy
from ..models.setup import ModelConfig, forward_autocast, load_or_build
from ..rewards.combine import RewardScores, RewardSpec
from ..rewards.harness import RewardHarness
from ..rollout.sampling import SamplingConfig, sample_completions
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
    steps: int = 60  # training steps, one rollout batch each
    prompts_per_step: int = 64  # prompts sampled per step
    group_size: int = 8  # answers sampled per prompt (G)
    update_epochs: int = 1  # optimisation passes over each rollout batch (GRPO's mu, PPO's epochs)
    num_minibatches: int = 1  # optimizer steps per pass; each minibatch is rollout batch / num_minibatches answers
    grad_accum_steps: int = 1  # micro-batches per optimizer step (same gradient, less memory)
    # forward passes are further split so that none runs more than this many prompt + answer tokens
    # (same gradient; bounds activation memory for long answers and large groups); 0: no limit
    max_tokens_per_forward: int = 8192

    # objective
    beta: float = 0.0  # KL coefficient against the frozen reference; 0 skips the reference model entirely
    policy_loss: PolicyLoss = "ppo_clip"  # the per-token policy loss (algorithms.POLICY_LOSSES)
    clip_ratio_low: float = 0.2  # the ratio pi/pi_old is clipped below at 1 - clip_ratio_low
    clip_ratio_high: float = 0.2  # and above at 1 + clip_ratio_high (> low: DAPO's clip-higher)
    # how per-token losses become one number (algorithms.LOSS_AGGREGATIONS): seq_mean_token_mean
    # (DeepSeekMath), token_mean (DAPO, PPO) or seq_sum_constant (Dr. GRPO: sum / (answers * max_new_tokens))
    loss_aggregation: LossAggregation = "seq_mean_token_mean"

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        self.sampling.validate()
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
        normaliser = {"seq_mean_token_mean": f"{self.minibatch_size} answers (token mean within each)",
                      "token_mean": "the minibatch's answer tokens",
                      "seq_sum_constant": f"{self.minibatch_size} answers x {self.sampling.max_new_tokens} tokens"}
        return {"answers per step": f"{self.rollout_size} ({self.prompts_per_step} prompts x {self.group_size})",
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


def load_actors(run: Run, config: RLConfig) -> Actors:
    """Prompts, the policy (the model this run built, when resuming), its frozen reference, rewards."""
    source = PromptSource(config.data, config.seed)
    rewards = RewardHarness.from_specs(config.rewards, timeout=config.reward_timeout, workers=config.reward_workers,
                                       on_error=config.reward_on_error,
                                       max_unscored_batches=config.reward_max_unscored_batches)  # before any build
    texts = [prompt_text(r["prompt"]) for r in (source.train_rows or source.eval_rows)]
    model_config = run.model_source(config.model)
    policy, tokenizer, device = load_or_build(model_config, texts, config.seed, save_dir=run.initial_dir)
    skipped = source.drop_long_prompts(tokenizer)
    if skipped:
        log.warning("skipped %d training prompts longer than data.max_prompt_tokens=%d",
                    skipped, config.data.max_prompt_tokens)
    run.values.setdefault("prompts_skipped_too_long", skipped)
    reference = None
    if config.beta > 0:  # with LoRA: the base under the adapter, switched off (no second copy of the model)
        reference = reference_policy(policy) if is_adapter_model(policy) else frozen_copy(policy)
    return Actors(source, policy, tokenizer, device, reference, rewards,
                  forward_autocast(model_config, policy, device))


def evaluator(actors: Actors, config: RLConfig) -> Callable[[], dict]:
    """Held-out greedy evaluation of the policy with the run's reward functions."""
    def run_eval() -> dict:
        return evaluate(actors.policy, actors.tokenizer, actors.source.eval_rows, actors.reward_functions,
                        config.sampling.max_new_tokens, config.data.max_prompt_tokens, actors.device,
                        on_error=config.reward_on_error, autocast=actors.autocast)
    return run_eval


@dataclass
class ScoredRollout:
    """One step's answers and their scores."""

    tokens: TokenBatch  # prompts once each, answers group-contiguous (trimmed of shared padding)
    finished: torch.Tensor  # [N] bool: the answer ended with EOS
    scores: RewardScores  # per function [N, F] and the weighted total [N] (NaN: no function applied)
    num_truncated: int  # prompts cut to data.max_prompt_tokens
    generation_seconds: float

    @property
    def lengths(self) -> torch.Tensor:
        return self.tokens.completion_mask.sum(1)


def rollout_and_score(actors: Actors, config: RLConfig, generator: torch.Generator) -> ScoredRollout:
    """Sample G answers to each of the step's prompts from the current policy, then score every answer.

    Every dataset column reaches the reward functions, repeated for each of a prompt's answers.
    """
    started = time.perf_counter()
    rows = actors.source.next_batch(config.prompts_per_step)
    prompts = [r["prompt"] for r in rows]
    G = config.group_size
    prompt_ids, prompt_mask, num_truncated = encode_prompts(actors.tokenizer, prompts, config.data.max_prompt_tokens,
                                                            actors.device)
    rollout = sample_completions(actors.policy, prompt_ids, prompt_mask, G, config.sampling,
                                 actors.tokenizer.eos_token_id, actors.tokenizer.pad_token_id, generator,
                                 autocast=actors.autocast)
    completions = decode_completions(actors.tokenizer, rollout.completion_ids, rollout.completion_mask)
    generation_seconds = time.perf_counter() - started
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
    scores = actors.reward_functions.score([p for p in prompts for _ in range(G)], completions, columns)
    tokens = TokenBatch(*trim_padding(prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask),
                        group_size=G)
    return ScoredRollout(tokens, rollout.finished, scores, num_truncated, generation_seconds)


def rollout_metrics(scored: ScoredRollout, seconds: float) -> dict:
    """What every RL step logs about its answers: rewards per function, lengths, throughput, failures."""
    lengths = scored.lengths.float()
    rewards = scored.scores.total
    prompt_tokens = float(scored.tokens.prompt_mask.sum()) * scored.tokens.group_size
    metrics = {
        "reward/mean": float(rewards.nanmean()),
        "reward/std": nanstd(rewards),
        "completion_length": float(lengths.mean()),
        "frac_finished": float(scored.finished.float().mean()),
        "seconds_per_step": seconds,
        "generation_seconds": scored.generation_seconds,
        "tokens_per_second": (prompt_tokens + float(lengths.sum())) / seconds,
        "prompts_truncated": scored.num_truncated,
        "reward_failures": scored.scores.num_failed,
    }
    for j, name in enumerate(scored.scores.names):
        column = scored.scores.per_function[:, j]
        metrics[f"reward/{name}/mean"] = float(column.nanmean())
        metrics[f"reward/{name}/std"] = nanstd(column)
    return metrics


def nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.std()) if valid.numel() > 1 else math.nan
