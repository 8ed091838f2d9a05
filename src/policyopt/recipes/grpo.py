"""GRPO: Group Relative Policy Optimization (DeepSeekMath, arXiv:2402.03300), one step top to bottom.

For each prompt q, sample G answers o_1..o_G from pi_old, score them r_1..r_G, and maximise

    J(theta) = agg_{i,t} [ min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i) - beta * k3_it ]

    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i    = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)       the same for every token of answer i
    k3_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1            against a frozen reference model

where agg is the loss aggregation (per-answer token mean then mean over answers by default). There
is no value model. The steps below follow the seed's order: freeze the old policy, sample, score,
group advantages, then mu optimisation passes over minibatches with clipping and the KL term.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..algorithms import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    kl_k3,
    zero_std_group_fraction,
)
from ..data.batching import decode_completions, encode_prompts
from ..data.loading import prompt_text
from ..data.sources import DataConfig, PromptSource
from ..evaluation import evaluate, headline
from ..models.forward import FORWARD_LAYOUTS, grouped_logprobs
from ..models.loading import autocast_context, frozen_copy, load_causal_lm
from ..models.setup import ModelConfig, describe, forward_autocast, load_or_build
from ..rewards.combine import RewardSpec, score_completions
from ..rollout.sampling import SamplingConfig, sample_completions
from ..runtime.checkpoint import (
    list_checkpoints,
    load_training_state,
    resolve_resume,
    restore_rng_state,
    rng_state,
    save_pretrained_atomic,
    save_training_checkpoint,
)
from ..runtime.config import ConfigError, save_config
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import NonFiniteUpdates, apply_update, build_optimizer, build_scheduler, check_optim
from ..runtime.plots import plot_run
from ..runtime.seeding import set_seed
from ..runtime.signals import StopRequests, TrainingInterrupted

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.1)]
    )
    reward_on_error: str = "raise"  # raise: stop the run; skip: score the sample as missing and count it
    max_bad_updates_in_a_row: int = 5  # non-finite loss/gradient updates are skipped; this many in a row stop the run

    # batch geometry: each step samples prompts_per_step * group_size answers (the rollout batch)
    steps: int = 60
    prompts_per_step: int = 64
    group_size: int = 8  # G
    num_iterations: int = 1  # mu: optimisation passes over each rollout batch
    minibatch_size: int | None = None  # answers per optimizer step; null: the whole rollout batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (same gradient, less memory)
    # forward passes are further split so that none runs more than this many prompt + answer tokens
    # (same gradient; bounds activation memory for long answers and large groups); 0: no limit
    max_tokens_per_forward: int = 8192

    # objective
    beta: float = 0.0  # KL coefficient; 0 skips the reference model entirely
    eps_low: float = 0.2
    eps_high: float = 0.2
    scale_rewards: bool = True  # divide by the group std (False: Dr. GRPO's mean-only baseline)
    advantage_eps: float = 1e-4
    loss_aggregation: str = "seq_mean_token_mean"  # or token_mean (DAPO), seq_sum_constant (Dr. GRPO)
    # the training forward (all give the same gradient; see models.forward.grouped_logprobs):
    # packed = one row per prompt, its answers back to back under a block mask, no padding;
    # shared = the prompt once, its KV cache gathered per answer; padded = [prompt | answer] per answer;
    # auto = packed or shared, whichever costs less for the batch at hand
    forward_layout: str = "auto"

    # optimizer (steps counted in optimizer steps)
    lr: float = 5e-4
    lr_schedule: str = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    eval_every: int = 10  # 0: only before and after training
    save_every: int = 0  # checkpoint the full training state every N steps (0: never; SIGTERM/Ctrl-C always do)
    keep_last: int = 2  # training checkpoints kept on disk
    resume: str | None = None  # auto: continue from the newest complete checkpoint in output_dir; or a path
    tensorboard: bool = True

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.sampling.validate()
        check_optim("", self.lr, self.warmup_steps, self.weight_decay, self.max_grad_norm)
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2: GRPO's advantage compares answers to the same prompt, and a "
                f"group of {self.group_size} gives every answer zero advantage"
            )
        for name in ("steps", "prompts_per_step", "num_iterations", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_forward < 0:
            raise ValueError(f"max_tokens_per_forward must be >= 0 (0: no limit), got {self.max_tokens_per_forward}")
        rollout = self.prompts_per_step * self.group_size
        minibatch = self.minibatch_size or rollout
        if minibatch < 1 or rollout % minibatch:
            raise ValueError(
                f"minibatch_size ({minibatch}) must divide the rollout batch prompts_per_step * group_size = "
                f"{self.prompts_per_step} * {self.group_size} = {rollout}"
            )
        if minibatch % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps ({self.grad_accum_steps}) must divide minibatch_size ({minibatch})"
            )
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("beta, eps_low and eps_high must be >= 0")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}; "
                             f"got {self.loss_aggregation!r}")
        if self.reward_on_error not in ("raise", "skip"):
            raise ValueError(f"reward_on_error must be raise or skip, got {self.reward_on_error!r}")
        if self.forward_layout not in FORWARD_LAYOUTS:
            raise ValueError(f"forward_layout must be one of {', '.join(FORWARD_LAYOUTS)}; got {self.forward_layout!r}")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward function")
        if self.eval_every < 0 or self.save_every < 0 or self.keep_last < 1:
            raise ValueError("eval_every and save_every must be >= 0, keep_last >= 1")

    @property
    def optimizer_steps_per_step(self) -> int:
        rollout = self.prompts_per_step * self.group_size
        return self.num_iterations * rollout // (self.minibatch_size or rollout)


def run_grpo(config: GRPOConfig) -> dict:
    """Train with GRPO; returns the summary also written to ``summary.json``."""
    start_time = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    set_seed(config.seed)
    G = config.group_size

    checkpoint_root = out / "checkpoints"
    resume_from = resolve_resume(config.resume, checkpoint_root)
    if resume_from is None and list_checkpoints(checkpoint_root):
        raise ConfigError(f"{out} already holds checkpoints of an earlier run: continue it with resume=auto "
                          "(--resume), or choose another output_dir")

    # --- Setup: prompts, policy, frozen reference (only if beta > 0), rewards, optimizer. ---
    source = PromptSource(config.data, config.seed)
    texts = [prompt_text(r["prompt"]) for r in (source.train_rows or source.eval_rows)]
    model_config = config.model
    if resume_from is not None and model_config.name_or_path is None:
        # the tiny model this run built at its start, not a new one
        model_config = dataclasses.replace(model_config, name_or_path=str(out / "initial"))
    policy, tokenizer, device = load_or_build(model_config, texts, config.seed, save_dir=out / "initial")
    skipped_prompts = source.drop_long_prompts(tokenizer)
    if skipped_prompts:
        log.warning("skipped %d training prompts longer than data.max_prompt_tokens=%d",
                    skipped_prompts, config.data.max_prompt_tokens)
    reference = frozen_copy(policy) if config.beta > 0 else None
    amp_dtype = forward_autocast(model_config, policy, device)  # None unless bf16 autocast pays off here
    reward_functions = [spec.load() for spec in config.rewards]
    reward_names = [name for name, _, _ in reward_functions]
    optimizer = build_optimizer(policy, config.lr, config.weight_decay)
    total_optimizer_steps = config.steps * config.optimizer_steps_per_step
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.warmup_steps, total_optimizer_steps)
    sample_generator = torch.Generator(device=device).manual_seed(config.seed)
    log.info("GRPO on %s, G=%d, %d prompts/step, beta=%g", describe(policy), G, config.prompts_per_step, config.beta)

    def run_eval() -> dict:
        with autocast_context(device, amp_dtype):
            return evaluate(policy, tokenizer, source.eval_rows, reward_functions, config.sampling.max_new_tokens,
                            config.data.max_prompt_tokens, device, on_error=config.reward_on_error)

    def training_state() -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state({"sampling": sample_generator}), "data": source.state_dict(),
                "before": before, "history": history,
                "elapsed": elapsed_earlier + time.perf_counter() - start_time}

    if resume_from is None:
        elapsed_earlier, first_step = 0.0, 1
        (out / "metrics.jsonl").unlink(missing_ok=True)
        logger = MetricsLogger(out, tensorboard=config.tensorboard)
        before = run_eval()
        logger.log(0, before)
        history = [(0, headline(before))]
    else:
        state = load_training_state(resume_from)
        weights = load_causal_lm(str(resume_from), next(policy.parameters()).dtype, device)
        policy.load_state_dict(weights.state_dict())
        del weights
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        source.load_state_dict(state["data"])
        restore_rng_state(state["rng"], {"sampling": sample_generator})
        before, history, elapsed_earlier = state["before"], state["history"], state["elapsed"]
        first_step = state["step"] + 1
        shutil.copyfile(resume_from / "metrics.jsonl", out / "metrics.jsonl")  # drop records after the checkpoint
        logger = MetricsLogger(out, tensorboard=config.tensorboard, purge_step=first_step)
        log.info("resumed from %s at step %d", resume_from, first_step)

    stop = StopRequests()
    bad_in_a_row = 0
    progress = tqdm(range(first_step, config.steps + 1), desc="grpo", dynamic_ncols=True, disable=None,
                    initial=first_step - 1, total=config.steps)
    with stop:
        for step in progress:
            step_start = time.perf_counter()
            rows = source.next_batch(config.prompts_per_step)
            prompts = [r["prompt"] for r in rows]

            # 1. Freeze the old policy: answers are sampled with the current weights, pi_old = pi_theta now.
            # 2. Sample G answers per prompt.
            prompt_ids, prompt_mask, num_truncated = encode_prompts(tokenizer, prompts, config.data.max_prompt_tokens,
                                                                    device)
            with autocast_context(device, amp_dtype):
                rollout = sample_completions(policy, prompt_ids, prompt_mask, G, config.sampling,
                                             tokenizer.eos_token_id, tokenizer.pad_token_id, sample_generator,
                                             record_logprobs=False)  # recomputed in training
            completions = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
            generation_seconds = time.perf_counter() - step_start

            # 3. Score every answer; each dataset column reaches the reward functions, repeated per answer.
            columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
            scores = score_completions(reward_functions, [p for p in prompts for _ in range(G)], completions,
                                       columns, on_error=config.reward_on_error)
            rewards = scores.total.to(device)  # [N], NaN where no function applied

            # 4. Group-relative advantages, one per answer, broadcast over its tokens.
            advantages = group_advantages(rewards, G, scale=config.scale_rewards, eps=config.advantage_eps)  # [N]

            completion_ids, completion_mask = rollout.completion_ids, rollout.completion_mask  # [N, T]
            n = completion_ids.size(0)
            minibatch = config.minibatch_size or n
            off_policy = config.num_iterations > 1 or minibatch < n

            # tokens one answer costs in a forward: its own, plus its prompt (an upper bound when shared)
            row_tokens = completion_mask.sum(1) + prompt_mask.sum(1).repeat_interleave(G)

            def logprobs(model, rows, with_entropy=False):
                # log pi(o_t | q, o_<t) for answer `rows`: [len(rows), T'], each prompt run once per group
                with autocast_context(device, amp_dtype):
                    return grouped_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows,
                                            G, config.sampling.temperature, with_entropy, config.forward_layout)

            # pi_old log-probs are needed only once the policy moves before the last update; with one
            # update per rollout, pi_old = pi_theta.detach() and no extra forward pass is spent.
            with torch.no_grad():
                chunks = _micro_batches(torch.arange(n, device=device), 1, row_tokens, config.max_tokens_per_forward)
                old_logp = _logprobs_in_chunks(logprobs, policy, chunks) if off_policy else None
                ref_logp = _logprobs_in_chunks(logprobs, reference, chunks) if reference is not None else None

            # 5. mu optimisation passes over minibatches.
            policy.train()
            sums = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0, "grad_norm": 0.0,
                    "updates": 0, "skipped": 0}
            for _ in range(config.num_iterations):
                for mb_start in range(0, n, minibatch):
                    mb_rows = torch.arange(mb_start, mb_start + minibatch, device=device)
                    mb_sequences = minibatch
                    mb_tokens = float(completion_mask[mb_rows].sum())
                    loss_value = 0.0
                    for micro_rows in _micro_batches(mb_rows, config.grad_accum_steps, row_tokens,
                                                     config.max_tokens_per_forward,
                                                     skip=(advantages == 0) if reference is None else None):
                        # (Zero-advantage answers add nothing to the gradient when there is no KL term, so
                        # they are skipped; the normaliser keeps the whole minibatch's counts.)
                        logp, entropy = logprobs(policy, micro_rows, with_entropy=True)
                        width = logp.size(1)
                        mask_c = completion_mask[micro_rows, :width]
                        old = old_logp[micro_rows, :width] if old_logp is not None else logp.detach()
                        per_token, clipped = clipped_surrogate(logp, old, advantages[micro_rows],
                                                               config.eps_low, config.eps_high)
                        if reference is not None:
                            kl = kl_k3(logp, ref_logp[micro_rows, :width])
                            per_token = per_token + config.beta * kl
                            sums["kl"] += float((kl.detach() * mask_c).sum())
                        loss = aggregate_loss(per_token, mask_c, config.loss_aggregation, num_sequences=mb_sequences,
                                              num_tokens=mb_tokens, constant=config.sampling.max_new_tokens)
                        loss.backward()
                        loss_value += float(loss.detach())
                        sums["clip"] += float((clipped.float() * mask_c).sum())
                        sums["entropy"] += float((entropy * mask_c).sum())
                        sums["tokens"] += float(mask_c.sum())
                    grad_norm, applied = apply_update(policy, optimizer, scheduler, loss_value, config.max_grad_norm)
                    sums["updates"] += 1
                    if not applied:
                        # skipped: the weights keep their last good values; too many in a row stops the run
                        sums["skipped"] += 1
                        bad_in_a_row += 1
                        if bad_in_a_row >= config.max_bad_updates_in_a_row:
                            raise NonFiniteUpdates(
                                f"step {step}: {bad_in_a_row} optimizer updates in a row had a non-finite loss or "
                                f"gradient; stopping. The last good checkpoint is intact in {checkpoint_root}")
                        continue
                    bad_in_a_row = 0
                    sums["loss"] += loss_value
                    sums["grad_norm"] += grad_norm

            # --- Metrics, evaluation, checkpoints. ---
            seconds = time.perf_counter() - step_start
            lengths = rollout.lengths.float()
            trained_tokens = max(sums["tokens"], 1.0)
            metrics = {
                "reward/mean": float(rewards.nanmean()),
                "reward/std": float(_nanstd(rewards)),
                "frac_reward_zero_std": zero_std_group_fraction(rewards, G),
                "loss": sums["loss"] / max(sums["updates"] - sums["skipped"], 1),
                "clip_fraction": sums["clip"] / trained_tokens,
                "entropy": sums["entropy"] / trained_tokens,
                "completion_length": float(lengths.mean()),
                "frac_finished": float(rollout.finished.float().mean()),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": sums["grad_norm"] / max(sums["updates"] - sums["skipped"], 1),
                "skipped_updates": sums["skipped"],
                "seconds_per_step": seconds,
                "generation_seconds": generation_seconds,
                "tokens_per_second": float(rollout.prompt_mask.sum() + lengths.sum()) / seconds,
                "prompts_truncated": num_truncated,
                "reward_failures": scores.num_failed,
            }
            if reference is not None:
                metrics["kl"] = sums["kl"] / trained_tokens
            for j, name in enumerate(reward_names):
                column = scores.per_function[:, j]
                metrics[f"reward/{name}/mean"] = float(column.nanmean())
                metrics[f"reward/{name}/std"] = float(_nanstd(column))
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                metrics.update(run_eval())
                history.append((step, headline(metrics)))
            logger.log(step, metrics)
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{history[-1][1]:.3f}")
            if (config.save_every and step % config.save_every == 0) or stop.requested:
                saved = save_training_checkpoint(checkpoint_root, step, policy, tokenizer, training_state(),
                                                 logger.path, keep_last=config.keep_last)
                if stop.requested:
                    logger.close()
                    raise TrainingInterrupted(stop.requested, saved)

    after = run_eval()
    logger.log(config.steps, after)
    history.append((config.steps, headline(after)))
    logger.close()
    save_pretrained_atomic(policy, tokenizer, out / "final")
    plot_run(out / "metrics.jsonl", out / "curves.png", title="GRPO")
    summary = {
        "recipe": "grpo",
        "steps": config.steps,
        "accuracy_before": headline(before),
        "accuracy_after": headline(after),
        "eval_before": before,
        "eval_after": after,
        "eval_history": history,
        "prompts_skipped_too_long": skipped_prompts,
        "seconds": elapsed_earlier + time.perf_counter() - start_time,
        "model_dir": str(out / "final"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _logprobs_in_chunks(logprobs, model, chunks: list[torch.Tensor]) -> torch.Tensor:
    """log-probs of every completion token of ``model``, [N, T'], one forward per row chunk (no grad)."""
    parts = [logprobs(model, rows)[0] for rows in chunks]
    width = max(p.size(1) for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.size(1))) for p in parts])


def _micro_batches(rows: torch.Tensor, pieces: int, row_tokens: torch.Tensor, max_tokens: int,
                   skip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Split ``rows`` into ``pieces`` equal micro-batches, drop the ``skip``ped rows, then cut each so that
    its rows' ``row_tokens`` sum to at most ``max_tokens`` (0: no cut). Order is kept, so the answers of
    one prompt stay together and its prompt is run once per micro-batch it spans."""
    out = []
    for piece in rows.chunk(pieces):
        if skip is not None:
            piece = piece[~skip[piece]]
        if piece.numel() == 0:
            continue
        if not max_tokens:
            out.append(piece)
            continue
        start, total = 0, 0
        for i, tokens in enumerate(row_tokens[piece].tolist()):
            if total and total + tokens > max_tokens:
                out.append(piece[start:i])
                start, total = i, 0
            total += tokens
        out.append(piece[start:])
    return out


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.std()) if valid.numel() > 1 else math.nan
