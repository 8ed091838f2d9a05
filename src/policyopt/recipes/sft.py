"""Supervised fine-tuning: teacher-forced next-token prediction on demonstrations.

    L_SFT = - (1 / sum_i |o_i|) * sum_i sum_t log pi_theta(o_{i,t} | q_i, o_{i,<t})

The prompt q is context only: the loss covers completion tokens (and the closing EOS), never the
prompt. Read top to bottom: data, model, optimizer, the loop, the final evaluation and outputs.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.arithmetic import completion_for
from ..data.batching import encode_completions, encode_prompts
from ..data.loading import completion_text, prompt_text
from ..data.sources import DataConfig, demonstration_rows
from ..evaluation import evaluate, headline
from ..models.forward import completion_logprobs, trim_padding
from ..models.loading import autocast_context
from ..models.setup import ModelConfig, describe, forward_autocast, load_or_build
from ..rewards.combine import RewardSpec
from ..runtime.checkpoint import save_pretrained_atomic
from ..runtime.config import save_config
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import build_optimizer, build_scheduler, check_optim
from ..runtime.plots import plot_run
from ..runtime.seeding import set_seed

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    output_dir: str = "runs/sft"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # null: accuracy + format on the built-in task, none (NLL only) for a dataset file
    rewards: list[RewardSpec] | None = None
    steps: int = 300  # optimizer steps
    max_seconds: float = 0.0  # stop after this much training time as well (0: no limit)
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50  # 0: only before and after training
    max_new_tokens: int = 16  # greedy answers at evaluation
    tensorboard: bool = True
    save_final: bool = True

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        check_optim("", self.lr, self.warmup_steps, self.weight_decay, self.max_grad_norm)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_every < 0 or self.max_seconds < 0:
            raise ValueError("eval_every and max_seconds must be >= 0")


def _completion(row: dict, column: str) -> str:
    if column in row:
        return completion_text(row[column])
    return completion_for(row["answer"])  # built-in held-out rows carry only the answer


def _nll_batch(model, tokenizer, rows, config: SFTConfig, device):
    prompt_ids, prompt_mask, _ = encode_prompts(tokenizer, [r["prompt"] for r in rows],
                                                config.data.max_prompt_tokens, device)
    completion_ids, completion_mask = encode_completions(
        tokenizer, [_completion(r, config.data.completion_column) for r in rows], device=device)
    batch = trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp, _ = completion_logprobs(model, *batch)
    mask = batch[3].float()
    return -(logp * mask).sum() / mask.sum().clamp(min=1), mask.sum()


@torch.no_grad()
def _eval_nll(model, tokenizer, rows, config, device) -> float:
    total, tokens = 0.0, 0.0
    for start in range(0, len(rows), 256):
        loss, n = _nll_batch(model, tokenizer, rows[start:start + 256], config, device)
        total += float(loss) * float(n)
        tokens += float(n)
    return total / max(tokens, 1.0)


def run_sft(config: SFTConfig, model=None, tokenizer=None) -> dict:
    """Train with SFT; returns the summary also written to ``summary.json``.

    ``model``/``tokenizer`` let the demo continue training an in-memory model (its SFT control).
    """
    start_time = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    set_seed(config.seed)

    # 1. Data: demonstrations and held-out prompts.
    train_rows, eval_rows = demonstration_rows(config.data, config.seed)
    texts = [prompt_text(r["prompt"]) + _completion(r, config.data.completion_column) for r in train_rows]

    # 2. Model: a given one, a path, or a tiny model built on the demonstrations' text.
    if model is None:
        model, tokenizer, device = load_or_build(config.model, texts, config.seed, save_dir=out / "initial")
    else:
        device = next(model.parameters()).device
    amp_dtype = forward_autocast(config.model, model, device)  # None unless bf16 autocast pays off here
    log.info("SFT on %d demonstrations with %s", len(train_rows), describe(model))
    specs = config.rewards
    if specs is None:
        specs = [RewardSpec("accuracy"), RewardSpec("format")] if config.data.path is None else []
    reward_functions = [spec.load() for spec in specs]

    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.warmup_steps, config.steps)
    logger = MetricsLogger(out, tensorboard=config.tensorboard)

    def run_eval(step: int) -> dict:
        model.eval()
        with autocast_context(device, amp_dtype):
            metrics = {"eval/nll": _eval_nll(model, tokenizer, eval_rows, config, device)} if eval_rows else {}
            if reward_functions and eval_rows:
                metrics.update(evaluate(model, tokenizer, eval_rows, reward_functions, config.max_new_tokens,
                                        config.data.max_prompt_tokens, device))
        model.train()
        logger.log(step, metrics)
        return metrics

    before = run_eval(0)

    # 3. The loop: shuffled passes over the demonstrations, one optimizer step per batch.
    rng = random.Random(config.seed)
    order: list[int] = []
    model.train()
    train_start = time.perf_counter()
    step = 0
    progress = tqdm(total=config.steps, desc="sft", dynamic_ncols=True, disable=None)
    while step < config.steps:
        if config.max_seconds and time.perf_counter() - train_start >= config.max_seconds:
            break
        if len(order) < config.batch_size:
            epoch_order = list(range(len(train_rows)))
            rng.shuffle(epoch_order)
            order += epoch_order
        batch_rows = [train_rows[i] for i in order[:config.batch_size]]
        del order[:config.batch_size]
        step_start = time.perf_counter()
        with autocast_context(device, amp_dtype):
            loss, num_tokens = _nll_batch(model, tokenizer, batch_rows, config, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        seconds = time.perf_counter() - step_start
        logger.log(step, {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                          "seconds_per_step": seconds, "tokens_per_second": float(num_tokens) / seconds})
        progress.update(1)
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            run_eval(step)
    progress.close()
    train_seconds = time.perf_counter() - train_start

    # 4. Final evaluation and outputs.
    after = run_eval(step)
    logger.close()
    if config.save_final:
        save_pretrained_atomic(model, tokenizer, out / "final")
    if reward_functions and eval_rows:
        plot_run(out / "metrics.jsonl", out / "curves.png", title="SFT", train_key="loss")
    summary = {
        "recipe": "sft",
        "steps": step,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start_time,
        "eval_nll_before": before.get("eval/nll"),
        "eval_nll_after": after.get("eval/nll"),
        "accuracy_before": headline(before) if reward_functions and eval_rows else None,
        "accuracy_after": headline(after) if reward_functions and eval_rows else None,
        "model_dir": str(out / "final") if config.save_final else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {**summary, "model": model, "tokenizer": tokenizer}
