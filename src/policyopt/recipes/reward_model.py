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

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..algorithms import grouped_pairwise_loss
from ..data.arithmetic import ArithmeticTask, make_rows
from ..data.loading import prompt_text
from ..data.preferences import (
    BuiltinPreferenceConfig,
    PreferenceColumns,
    PreferenceGroup,
    count_pairs,
    load_preference_groups,
    split_groups,
    write_groups,
)
from ..data.sources import EVAL_SEED_OFFSET, ShuffledOrder
from ..models.loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from ..models.lora import apply_lora
from ..models.reward_model import (
    encode_for_scoring,
    load_scalar_model,
    max_length_of,
    save_reward_stats,
    scalar_model_from_causal_lm,
    sequence_scores,
)
from ..models.setup import ModelConfig, describe, load_or_build
from ..rollout.preferences import builtin_preferences
from ..runtime.distributed import launched_world_size
from ..runtime.optim import OptimConfig
from ..runtime.run import Run, RunSettings

log = logging.getLogger(__name__)


@dataclass
class PreferenceDataConfig:
    path: str | None = None  # pairs / rankings file; null: the built-in arithmetic task's labeller
    eval_path: str | None = None  # held-out preferences; null: hold out eval_size prompts of `path`
    eval_size: int = 200  # prompts held out of `path` when eval_path is null
    columns: PreferenceColumns = field(default_factory=PreferenceColumns)  # column names in the file
    task: ArithmeticTask = field(default_factory=ArithmeticTask)  # the built-in task (built-in data only)
    builtin: BuiltinPreferenceConfig = field(default_factory=BuiltinPreferenceConfig)  # the built-in labeller
    heldout_rl_size: int = 200  # built-in: the RL recipes' held-out prompts (same seed) are never used here

    def validate(self) -> None:
        self.task.validate()
        self.builtin.validate()
        if self.eval_size < 0:
            raise ValueError(f"data.eval_size must be >= 0, got {self.eval_size}")


@dataclass
class RewardModelConfig(RunSettings):
    output_dir: str = "runs/reward"  # where config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json go
    # the backbone: a causal LM (usually the SFT policy) or a reward-model checkpoint; null builds a tiny
    # model and tokenizer on the preference text
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)  # preferences to learn and hold out
    head_init: Literal["normal", "zero"] = "normal"  # a fresh head: normal N(0, 1/sqrt(d+1)) or zero; a loaded head is kept
    epochs: float = 1.0  # passes over the training prompts (InstructGPT: 1; more tends to overfit)
    batch_size: int = 32  # prompts per step (each with all its pairs)
    center_rewards_coefficient: float = 0.0  # TRL's; 0.01 is the recommended value when used
    max_length: int = 512  # tokens of prompt + answer + EOS; longer rows lose the start of the prompt
    eval_every: int = 50  # held-out pairwise accuracy every N steps (0: only before and after training)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))  # AdamW and its schedule

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        if not self.epochs > 0 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("epochs must be > 0, batch_size >= 1 and max_length >= 2")
        if self.batch_size % launched_world_size():
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of the number of processes "
                             f"({launched_world_size()}): each rank scores an equal share of every batch's prompts")
        if self.center_rewards_coefficient < 0:
            raise ValueError("center_rewards_coefficient must be >= 0")
        if self.model.lora.quantize != "none":
            raise ValueError("model.lora.quantize is for causal LMs (sft, ppo, grpo); the reward model trains "
                             "LoRA on an unquantized backbone: set model.lora.quantize=none")


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


def preference_groups(config: RewardModelConfig, run: Run, device) -> tuple[list, list]:
    """(training groups, held-out groups): from a file, or labelled on the built-in task (then written out)."""
    data = config.data
    if data.path is not None:
        train_groups = load_preference_groups(data.path, data.columns)
        if data.eval_path is not None:
            return train_groups, load_preference_groups(data.eval_path, data.columns)
        return split_groups(train_groups, data.eval_size, config.seed)
    sampler = sampler_tokenizer = None
    if data.builtin.policy is not None:
        sampler_tokenizer = load_tokenizer(data.builtin.policy)
        sampler = load_causal_lm(data.builtin.policy, resolve_dtype(config.model.dtype, device), device)
    # the RL recipes hold out these prompts (same seed): the reward model never sees them
    rl_heldout = {r["prompt"] for r in make_rows(data.heldout_rl_size, data.task, seed=config.seed + EVAL_SEED_OFFSET)}
    train_groups, eval_groups = builtin_preferences(data.builtin, data.task, config.seed, sampler_tokenizer, sampler,
                                                    exclude=rl_heldout, device=device)
    if run.world.is_main:
        write_groups(train_groups, run.out / "preferences_train.jsonl")
        write_groups(eval_groups, run.out / "preferences_eval.jsonl")
    return train_groups, eval_groups


def scalar_model(config: RewardModelConfig, run: Run, train_groups, device):
    """(a scalar head on the given backbone or on a tiny model built on the data's text, its tokenizer)."""
    model_config = run.model_source(config.model)
    if config.model.name_or_path is None:
        texts = [prompt_text(g.prompt) + a for g in train_groups for a in g.answers]
        causal, tokenizer, _ = load_or_build(model_config, texts, config.seed, save_dir=run.build_dir,
                                             with_lora=False)  # the adapter goes on the scalar model below
        model = scalar_model_from_causal_lm(causal, config.head_init)
    else:
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
        model = load_scalar_model(config.model.name_or_path, resolve_dtype(config.model.dtype, device), device,
                                  config.head_init, pad_token_id=tokenizer.pad_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.model.lora.enabled:  # LoRA on the backbone; the score head trains in full (modules_to_save)
        model = apply_lora(model, config.model.lora, task="reward", seed=config.seed,
                           base_source=config.model.name_or_path or run.initial_dir)
    return model, tokenizer


def run_reward_model(config: RewardModelConfig) -> dict:
    """Train a reward model; returns the summary also written to ``summary.json``."""
    run = Run(config, "reward", total_steps=0)
    device = resolve_device(config.model.device)
    train_groups, eval_groups = preference_groups(config, run, device)  # 1. data: one group per prompt
    log.info("reward model data: %d prompts / %d pairs for training, %d / %d held out", len(train_groups),
             count_pairs(train_groups), len(eval_groups), count_pairs(eval_groups))
    model, tokenizer = scalar_model(config, run, train_groups, device)  # 2. the model
    max_length = min(config.max_length, max_length_of(model))
    log.info("reward model: %s", describe(model))
    run.total_steps = steps = max(1, math.ceil(config.epochs * len(train_groups) / config.batch_size))
    optimizer, scheduler = config.optim.build(model, steps)
    order = ShuffledOrder(len(train_groups), config.seed)  # shuffled passes over the prompts
    run.track(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, data=order)

    def evaluate() -> dict:
        return evaluate_pairs(model, tokenizer, eval_groups, max_length, device, config.center_rewards_coefficient)

    run.begin(evaluate)
    model.train()
    for step in run.steps():  # 3. each step scores every answer of its prompts once
        started = time.perf_counter()
        batch = run.world.share([train_groups[i] for i in order.take(config.batch_size)])  # this rank's prompts
        scores = _score_answers(model, tokenizer, batch, max_length, device)
        chosen, rejected, group_id, margin = _pair_tensors(batch, scores)
        loss = grouped_pairwise_loss(chosen, rejected, group_id, margin, config.center_rewards_coefficient)
        loss = loss * (len(batch) / config.batch_size)  # a mean over the whole batch's prompts, summed over ranks
        loss.backward()
        grad_norm, applied = run.optimizer_step(model, optimizer, scheduler, float(loss.detach()), step)
        seconds = time.perf_counter() - started
        all_scores = torch.cat(scores).detach().double()
        total = run.world.sum_dict({"loss": float(loss.detach()), "pairs": len(chosen), "answers": all_scores.numel(),
                                    "right": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
                                    "score": float(all_scores.sum()), "score_sq": float((all_scores ** 2).sum())})
        mean = total["score"] / total["answers"]
        variance = (total["score_sq"] - total["answers"] * mean ** 2) / max(total["answers"] - 1, 1)
        metrics = {"loss": total["loss"], "accuracy": total["right"] / total["pairs"],
                   "margin": total["margin"] / total["pairs"], "reward/mean": mean,
                   "reward/std": max(variance, 0.0) ** 0.5 if total["answers"] > 1 else 0.0, "pairs": int(total["pairs"]),
                   "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "skipped_updates": int(not applied),
                   "seconds_per_step": seconds, "tokens_per_second": sum(len(g.answers) for g in batch) / seconds}
        run.log(step, metrics, evaluate, loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")

    # 4. final evaluation; the reward's mean and std over the training answers go beside the weights
    stats = training_score_stats(model, tokenizer, train_groups, max_length, device)
    summary = run.finish(evaluate, {"train_prompts": len(train_groups), "train_pairs": count_pairs(train_groups),
                                    "eval_prompts": len(eval_groups), "eval_pairs": count_pairs(eval_groups),
                                    "reward_mean": stats["mean"], "reward_std": stats["std"]},
                         plot={"title": "reward model", "train_key": "loss", "eval_key": "eval/pairwise_accuracy"},
                         save_also=lambda final: save_reward_stats(final, stats))
    summary["pairwise_accuracy_before"] = summary["eval_before"].get("eval/pairwise_accuracy")
    summary["pairwise_accuracy_after"] = summary["eval_after"].get("eval/pairwise_accuracy")
    return run.write_summary(summary)


@torch.no_grad()
def training_score_stats(model, tokenizer, train_groups, max_length: int, device) -> dict:
    """Mean and std of the trained model's scores over every training answer (to normalise its rewards)."""
    model.eval()
    scores = torch.cat([s for start in range(0, len(train_groups), 64)
                        for s in _score_answers(model, tokenizer, train_groups[start:start + 64], max_length, device)])
    return {"mean": float(scores.mean()), "std": float(scores.std(unbiased=False)), "num_answers": int(scores.numel()),
            "computed_on": "training answers"}
