"""Reward model: a scalar head on a transformer backbone, trained on preferences with Bradley–Terry.

For prompt x and answers y_w preferred to y_l, with r(x, y) the head's output at the last token of
[x | y | EOS],

    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))
    l(x, y_w, y_l)   = -log sigmoid(r(x, y_w) - r(x, y_l) - margin) + c * (r(x, y_w) + r(x, y_l))^2
    L                = mean over prompts of the mean over that prompt's pairs

(c is TRL's center_rewards_coefficient; margin is an optional per-pair column, Llama 2.) Each
answer is scored once per step however many pairs it is in (InstructGPT: K forward passes for
K(K-1)/2 comparisons). Held-out pairwise accuracy is the fraction of held-out pairs with
r(x, y_w) > r(x, y_l). The reward's mean and std over the training answers are saved beside the
model in ``reward_stats.json``, so users can normalise its scores.

Read top to bottom: data, model, optimizer, the loop, the final evaluation and outputs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..algorithms.ppo import grouped_pairwise_loss
from ..data.arithmetic import ArithmeticTask, make_rows
from ..data.loading import prompt_text
from ..data.preferences import (
    BuiltinPreferenceConfig,
    PreferenceColumns,
    PreferenceGroup,
    builtin_preferences,
    count_pairs,
    load_preference_groups,
    split_groups,
    write_groups,
)
from ..data.sources import EVAL_SEED_OFFSET
from ..models.loading import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from ..models.reward_model import (
    encode_for_scoring,
    load_scalar_model,
    max_length_of,
    save_reward_stats,
    scalar_model_from_causal_lm,
    sequence_scores,
)
from ..models.setup import ModelConfig, describe, load_or_build
from ..runtime.checkpoint import save_pretrained_atomic
from ..runtime.config import save_config
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import build_optimizer, build_scheduler, check_optim
from ..runtime.plots import plot_run
from ..runtime.seeding import set_seed

log = logging.getLogger(__name__)


@dataclass
class PreferenceDataConfig:
    path: str | None = None  # pairs / rankings file; null: the built-in arithmetic task's labeller
    eval_path: str | None = None  # held-out preferences; null: hold out eval_size prompts of `path`
    eval_size: int = 200
    columns: PreferenceColumns = field(default_factory=PreferenceColumns)
    task: ArithmeticTask = field(default_factory=ArithmeticTask)  # built-in data only
    builtin: BuiltinPreferenceConfig = field(default_factory=BuiltinPreferenceConfig)
    heldout_rl_size: int = 200  # built-in: the RL recipes' held-out prompts (same seed) are never used here

    def validate(self) -> None:
        self.task.validate()
        self.builtin.validate()
        if self.eval_size < 0:
            raise ValueError(f"data.eval_size must be >= 0, got {self.eval_size}")


@dataclass
class RewardModelConfig:
    output_dir: str = "runs/reward"
    seed: int = 0
    # the backbone: a causal LM (usually the SFT policy) or a reward-model checkpoint; null builds a tiny
    # model and tokenizer on the preference text
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    head_init: str = "normal"  # a fresh head: normal N(0, 1/sqrt(d+1)) or zero; a loaded head is kept
    epochs: float = 1.0  # passes over the training prompts (InstructGPT: 1; more tends to overfit)
    batch_size: int = 32  # prompts per step (each with all its pairs)
    center_rewards_coefficient: float = 0.0  # TRL's; 0.01 is the recommended value when used
    max_length: int = 512  # tokens of prompt + answer + EOS; longer rows lose the start of the prompt
    lr: float = 1e-3
    lr_schedule: str = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50  # 0: only before and after training
    tensorboard: bool = True

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        check_optim("", self.lr, self.warmup_steps, self.weight_decay, self.max_grad_norm)
        if not self.epochs > 0 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("epochs must be > 0, batch_size >= 1 and max_length >= 2")
        if self.center_rewards_coefficient < 0 or self.eval_every < 0:
            raise ValueError("center_rewards_coefficient and eval_every must be >= 0")
        if self.head_init not in ("normal", "zero"):
            raise ValueError(f"head_init must be normal or zero, got {self.head_init!r}")


def _score_answers(model, tokenizer, groups: list[PreferenceGroup], max_length: int, device) -> list[torch.Tensor]:
    """Every answer of every group, scored once: one [len(answers)] tensor per group."""
    prompts = [g.prompt for g in groups for _ in g.answers]
    answers = [a for g in groups for a in g.answers]
    ids, mask = encode_for_scoring(tokenizer, prompts, answers, max_length, device)
    return list(sequence_scores(model, ids, mask).split([len(g.answers) for g in groups]))


def _pair_tensors(groups: list[PreferenceGroup], scores: list[torch.Tensor]):
    """(chosen scores, rejected scores, prompt id, margin), one entry per pair."""
    chosen, rejected, group_id, margin = [], [], [], []
    for g, (group, s) in enumerate(zip(groups, scores)):
        better = torch.tensor([p[0] for p in group.pairs], device=s.device)
        worse = torch.tensor([p[1] for p in group.pairs], device=s.device)
        chosen.append(s[better])
        rejected.append(s[worse])
        group_id += [g] * len(group.pairs)
        margin += [p[2] for p in group.pairs]
    device = scores[0].device
    return (torch.cat(chosen), torch.cat(rejected), torch.tensor(group_id, device=device),
            torch.tensor(margin, device=device, dtype=torch.float32))


@torch.no_grad()
def evaluate_pairs(model, tokenizer, groups: list[PreferenceGroup], max_length: int, device,
                   center_coef: float = 0.0, batch_groups: int = 64) -> dict:
    """Held-out pairwise accuracy (r_chosen > r_rejected; ties count as wrong), loss, and accuracy per pair kind."""
    if not groups:
        return {}
    was_training = model.training
    model.eval()
    correct, losses, kinds = [], [], []
    for start in range(0, len(groups), batch_groups):
        chunk = groups[start:start + batch_groups]
        chosen, rejected, group_id, margin = _pair_tensors(chunk, _score_answers(model, tokenizer, chunk, max_length, device))
        correct.append((chosen > rejected).float().cpu())
        losses.append(float(grouped_pairwise_loss(chosen, rejected, group_id, margin, center_coef)) * len(chunk))
        kinds += [k for g in chunk for k in (g.kinds or [""] * len(g.pairs))]
    model.train(was_training)
    hits = torch.cat(correct)
    metrics = {"eval/pairwise_accuracy": float(hits.mean()), "eval/loss": sum(losses) / len(groups),
               "eval/pairs": float(hits.numel())}
    for kind in sorted(set(kinds) - {""}):
        chosen_kind = torch.tensor([k == kind for k in kinds])
        metrics[f"eval/pairwise_accuracy/{kind}"] = float(hits[chosen_kind].mean())
    return metrics


def run_reward_model(config: RewardModelConfig) -> dict:
    """Train a reward model; returns the summary also written to ``summary.json``."""
    start_time = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    set_seed(config.seed)
    device = resolve_device(config.model.device)

    # 1. Data: preference groups (one per prompt) from a file, or labelled on the built-in task.
    if config.data.path is not None:
        train_groups = load_preference_groups(config.data.path, config.data.columns)
        if config.data.eval_path is not None:
            eval_groups = load_preference_groups(config.data.eval_path, config.data.columns)
        else:
            train_groups, eval_groups = split_groups(train_groups, config.data.eval_size, config.seed)
    else:
        built = config.data.builtin
        sampler = sampler_tokenizer = None
        if built.policy is not None:
            sampler_tokenizer = load_tokenizer(built.policy)
            sampler = load_causal_lm(built.policy, resolve_dtype(config.model.dtype, device), device)
        # the RL recipes hold out these prompts (same seed): the reward model never sees them
        rl_heldout = {r["prompt"] for r in make_rows(config.data.heldout_rl_size, config.data.task,
                                                     seed=config.seed + EVAL_SEED_OFFSET)}
        train_groups, eval_groups = builtin_preferences(built, config.data.task, config.seed, sampler_tokenizer,
                                                        sampler, exclude=rl_heldout, device=device)
        del sampler
        write_groups(train_groups, out / "preferences_train.jsonl")
        write_groups(eval_groups, out / "preferences_eval.jsonl")
    log.info("reward model data: %d prompts / %d pairs for training, %d / %d held out", len(train_groups),
             count_pairs(train_groups), len(eval_groups), count_pairs(eval_groups))

    # 2. Model: a scalar head on the given backbone, or on a tiny model built on the data's text.
    if config.model.name_or_path is None:
        texts = [prompt_text(g.prompt) + a for g in train_groups for a in g.answers]
        causal, tokenizer, _ = load_or_build(config.model, texts, config.seed)
        model = scalar_model_from_causal_lm(causal, config.head_init)
        del causal
    else:
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
        model = load_scalar_model(config.model.name_or_path, resolve_dtype(config.model.dtype, device), device,
                                  config.head_init, pad_token_id=tokenizer.pad_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    max_length = min(config.max_length, max_length_of(model))
    log.info("reward model: %s", describe(model))

    steps = max(1, math.ceil(config.epochs * len(train_groups) / config.batch_size))
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.warmup_steps, steps)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    logger = MetricsLogger(out, tensorboard=config.tensorboard)

    def run_eval() -> dict:
        return evaluate_pairs(model, tokenizer, eval_groups, max_length, device, config.center_rewards_coefficient)

    before = run_eval()
    logger.log(0, before)

    # 3. The loop: shuffled passes over the prompts; each step scores every answer of its prompts once.
    rng = random.Random(config.seed)
    order: list[int] = []
    model.train()
    progress = tqdm(range(1, steps + 1), desc="reward", dynamic_ncols=True, disable=None)
    for step in progress:
        step_start = time.perf_counter()
        if len(order) < config.batch_size:
            epoch_order = list(range(len(train_groups)))
            rng.shuffle(epoch_order)
            order += epoch_order
        batch = [train_groups[i] for i in order[:config.batch_size]]
        del order[:config.batch_size]

        scores = _score_answers(model, tokenizer, batch, max_length, device)
        chosen, rejected, group_id, margin = _pair_tensors(batch, scores)
        loss = grouped_pairwise_loss(chosen, rejected, group_id, margin, config.center_rewards_coefficient)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()

        seconds = time.perf_counter() - step_start
        all_scores = torch.cat(scores).detach()
        metrics = {
            "loss": float(loss.detach()),
            "accuracy": float((chosen > rejected).float().mean()),
            "margin": float((chosen - rejected).detach().mean()),
            "reward/mean": float(all_scores.mean()),
            "reward/std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
            "pairs": len(chosen),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "seconds_per_step": seconds,
            "tokens_per_second": sum(len(g.answers) for g in batch) / seconds,
        }
        if config.eval_every and step % config.eval_every == 0 and step < steps:
            metrics.update(run_eval())
        logger.log(step, metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")

    # 4. Final evaluation; the reward's mean and std over the training answers go beside the weights.
    after = run_eval()
    logger.log(steps, after)
    logger.close()
    model.eval()
    with torch.no_grad():
        train_scores = torch.cat([s for start in range(0, len(train_groups), 64)
                                  for s in _score_answers(model, tokenizer, train_groups[start:start + 64],
                                                          max_length, device)])
    stats = {"mean": float(train_scores.mean()), "std": float(train_scores.std(unbiased=False)),
             "num_answers": int(train_scores.numel()), "computed_on": "training answers",
             "eval_pairwise_accuracy": after.get("eval/pairwise_accuracy")}
    save_pretrained_atomic(model, tokenizer, out / "final")
    save_reward_stats(out / "final", stats)
    plot_run(out / "metrics.jsonl", out / "curves.png", title="reward model", train_key="loss",
             eval_key="eval/pairwise_accuracy")
    summary = {
        "recipe": "reward",
        "steps": steps,
        "train_prompts": len(train_groups),
        "train_pairs": count_pairs(train_groups),
        "eval_prompts": len(eval_groups),
        "eval_pairs": count_pairs(eval_groups),
        "pairwise_accuracy_before": before.get("eval/pairwise_accuracy"),
        "pairwise_accuracy_after": after.get("eval/pairwise_accuracy"),
        "eval_after": after,
        "reward_mean": stats["mean"],
        "reward_std": stats["std"],
        "seconds": time.perf_counter() - start_time,
        "model_dir": str(out / "final"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
