"""Supervised fine-tuning: teacher-forced next-token prediction on demonstrations.

    L_SFT = - (1 / sum_i |o_i|) * sum_i sum_t log pi_theta(o_{i,t} | q_i, o_{i,<t})

The prompt q is context only: the loss covers completion tokens (and the closing EOS), never the
prompt. Read top to bottom: data, model, optimizer, the loop, the final evaluation and outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..data.arithmetic import completion_for
from ..data.batching import encode_completions, encode_prompts
from ..data.loading import completion_text, prompt_text
from ..data.sources import DataConfig, ShuffledOrder, demonstration_rows
from ..evaluation import evaluate
from ..models.forward import TokenBatch, forward_rows
from ..rewards.builtin import extract_answer
from ..models.setup import ModelConfig, describe, forward_autocast, load_or_build
from ..rewards.combine import RewardSpec
from ..rewards.harness import RewardHarness
from ..runtime.distributed import launched_world_size
from ..runtime.optim import OptimConfig
from ..runtime.run import Run, RunSettings

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(RunSettings):
    output_dir: str = "runs/sft"  # where config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json go
    model: ModelConfig = field(default_factory=ModelConfig)  # the model to fine-tune (null: a tiny one built here)
    data: DataConfig = field(default_factory=DataConfig)  # demonstrations (prompt + completion) and held-out rows
    # rewards scored on greedy held-out answers (accuracy_*, reward_* in the summary); null: grpo's defaults
    # (accuracy + 0.1 format) on the built-in task or on a file whose held-out rows have an answer and whose
    # completions use <answer>X</answer>, else none (eval/nll only; the log says so)
    rewards: list[RewardSpec] | None = None
    reward_timeout: float = 300.0  # seconds one call of a reward function may take at evaluation (0: no limit)
    reward_workers: int = 0  # 0: rewards run in the trainer; N: in N worker processes (see policyopt grpo --help)
    steps: int = 300  # optimizer steps, one batch each
    max_seconds: float = 0.0  # also stop after this much training time (0: no limit)
    batch_size: int = 32  # demonstrations per optimizer step
    eval_every: int = 50  # evaluate on the held-out rows every N steps (0: only before and after training)
    max_new_tokens: int = 16  # length limit of the greedy answers at evaluation
    save_final: bool = True  # write the trained model to final/
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))  # AdamW and its schedule

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.batch_size % launched_world_size():
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of the number of processes "
                             f"({launched_world_size()}): each rank takes an equal share of every batch")
        if self.max_seconds < 0:
            raise ValueError("max_seconds must be >= 0")
        if self.reward_timeout < 0 or self.reward_workers < 0:
            raise ValueError("reward_timeout and reward_workers must be >= 0")


def _completion(row: dict, column: str) -> str:
    if column in row:
        return completion_text(row[column])
    return completion_for(row["answer"])  # built-in held-out rows carry only the answer


def nll(model, tokenizer, rows, config: SFTConfig, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean negative log-likelihood of the rows' completion tokens, their number); prompts are context only."""
    prompt_ids, prompt_mask, _ = encode_prompts(tokenizer, [r["prompt"] for r in rows],
                                                config.data.max_prompt_tokens, device)
    completion_ids, completion_mask = encode_completions(
        tokenizer, [_completion(r, config.data.completion_column) for r in rows], device=device)
    batch = TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size=1)
    logp, _, _ = forward_rows(model, batch, torch.arange(len(rows)), temperature=1.0, layout="padded",
                              autocast=autocast)
    mask = completion_mask[:, :logp.size(1)].float()
    return -(logp * mask).sum() / mask.sum().clamp(min=1), mask.sum()


def nll_rows(config: SFTConfig, eval_rows: list[dict]) -> list[dict]:
    """The held-out rows ``eval/nll`` scores, logged once: every built-in row (its target is the demonstrations'
    ``<answer>X</answer>`` template), and only the rows of a file that have a completion to score."""
    column = config.data.completion_column
    if config.data.path is None:
        rows, what = eval_rows, "the built-in <answer>X</answer> demonstrations"
    else:
        rows, what = [r for r in eval_rows if r.get(column)], f"their {column!r} column"
    if rows:
        log.info("eval/nll = mean negative log-likelihood per completion token of %d held-out rows' completions (%s)",
                 len(rows), what)
    elif eval_rows:
        log.info("eval/nll not measured: the held-out rows have no %r column to score", column)
    return rows


def sft_rewards(config: SFTConfig, train_rows: list[dict], eval_rows: list[dict]) -> list[RewardSpec]:
    """What scores SFT's greedy held-out answers: ``rewards`` when given; else grpo's defaults (accuracy, and
    format at 0.1) where they can judge the answers: the built-in task, or held-out rows with an ``answer``
    whose demonstrations use the built-in ``<answer>X</answer>`` template. Otherwise none, and the log says
    that accuracy is not measured and how to measure it."""
    if config.rewards is not None:
        return config.rewards
    defaults = [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.1)]
    if config.data.path is None:
        return defaults
    has_answers = bool(eval_rows) and all(r.get("answer") is not None for r in eval_rows)
    sample = train_rows[:200]
    templated = sum(extract_answer(_completion(r, config.data.completion_column)) is not None for r in sample)
    if has_answers and templated >= 0.9 * len(sample):
        log.info("held-out answers scored by grpo's default rewards (accuracy + format): the rows have answers "
                 "and the demonstrations use <answer>X</answer>")
        return defaults
    why = ("the demonstrations do not use the <answer>X</answer> template the built-in accuracy reads"
           if has_answers else "the held-out rows have no 'answer' column")
    log.info("accuracy not measured (accuracy_* null): no rewards given and %s; rewards=my_rewards.py:fn (the "
             "function grpo will use) scores greedy held-out answers", why)
    return []


def sft_evaluator(model, tokenizer, eval_rows, reward_functions, config: SFTConfig, device, autocast):
    """Held-out NLL of the demonstrations' completions, and greedy answers scored by ``reward_functions``."""
    scored_rows = nll_rows(config, eval_rows)

    @torch.no_grad()
    def run_eval() -> dict:
        if not eval_rows:
            return {}
        model.eval()
        total, tokens = 0.0, 0.0
        for start in range(0, len(scored_rows), 256):
            loss, n = nll(model, tokenizer, scored_rows[start:start + 256], config, device, autocast)
            total, tokens = total + float(loss) * float(n), tokens + float(n)
        metrics = {"eval/nll": total / tokens} if tokens else {}
        if reward_functions:
            metrics.update(evaluate(model, tokenizer, eval_rows, reward_functions, config.max_new_tokens,
                                    config.data.max_prompt_tokens, device, autocast=autocast))
        model.train()
        return metrics
    return run_eval


def run_sft(config: SFTConfig) -> dict:
    """Train with SFT; returns the summary also written to ``summary.json``."""
    run = Run(config, "sft", total_steps=config.steps)
    train_rows, eval_rows = demonstration_rows(config.data, config.seed)  # 1. demonstrations, held-out rows
    specs = sft_rewards(config, train_rows, eval_rows)  # loaded before the model is built or anything written
    reward_functions = RewardHarness.from_specs(specs, timeout=config.reward_timeout, workers=config.reward_workers)
    texts = [prompt_text(r["prompt"]) + _completion(r, config.data.completion_column) for r in train_rows]
    model_config = run.model_source(config.model)  # 2. a given model, or a tiny one built on the text
    model, tokenizer, device = load_or_build(model_config, texts, config.seed, save_dir=run.build_dir)
    autocast = forward_autocast(model_config, model, device)
    log.info("SFT on %d demonstrations with %s", len(train_rows), describe(model))
    if config.data.path is None:  # a file's held-out rows are described where they are read
        log.info("held-out rows: %d built-in problems (data.eval_size), never trained on", len(eval_rows))
    optimizer, scheduler = config.optim.build(model, config.steps)
    order = ShuffledOrder(len(train_rows), config.seed)  # shuffled passes over the demonstrations
    run.track(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, data=order)
    evaluate_sft = sft_evaluator(model, tokenizer, eval_rows, reward_functions, config, device, autocast)
    run.begin(evaluate_sft)

    model.train()  # 3. the loop: one optimizer step per batch of demonstrations
    last_step = run.first_step - 1
    resumed_at = time.perf_counter()
    for step in run.steps():
        train_seconds = run.values.get("train_seconds", 0.0) + time.perf_counter() - resumed_at
        if config.max_seconds and run.world.max(int(train_seconds >= config.max_seconds)):  # all ranks stop
            break
        started = time.perf_counter()
        batch = run.world.share([train_rows[i] for i in order.take(config.batch_size)])  # this rank's rows
        loss, num_tokens = nll(model, tokenizer, batch, config, device, autocast)
        all_tokens = run.world.sum(float(num_tokens))
        loss = loss * (float(num_tokens) / all_tokens)  # over the whole batch's tokens, summed over ranks
        loss.backward()
        grad_norm, applied = run.optimizer_step(model, optimizer, scheduler, float(loss.detach()), step)
        loss, num_tokens = run.world.sum(loss.detach()), all_tokens
        seconds = time.perf_counter() - started
        run.values["train_seconds"] = train_seconds + seconds
        resumed_at, last_step = time.perf_counter(), step
        run.log(step, {"loss": float(loss.detach()), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                       "skipped_updates": int(not applied), "seconds_per_step": seconds,
                       "tokens_per_second": float(num_tokens) / seconds}, evaluate_sft,
                loss=f"{float(loss.detach()):.3f}")

    scored = bool(reward_functions and eval_rows)  # 4. final evaluation and outputs
    summary = run.finish(evaluate_sft, {"train_seconds": run.values.get("train_seconds", 0.0)},
                         save_model=config.save_final, last_step=last_step,
                         plot={"title": "SFT", "train_key": "loss"} if scored else None)
    summary["eval_nll_before"] = summary["eval_before"].get("eval/nll")
    summary["eval_nll_after"] = summary["eval_after"].get("eval/nll")
    if not scored:
        summary["accuracy_before"] = summary["accuracy_after"] = None
    return run.write_summary(summary)
