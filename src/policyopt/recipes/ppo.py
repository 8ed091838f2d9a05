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

and num_ppo_epochs passes over shuffled minibatches minimise, with one backward pass,

    L = mean_t [ -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]
      + vf_coef * mean_t [ 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2) ]

    rho_t = pi_theta(o_t) / pi_old(o_t),   means over the minibatch's valid tokens.

beta is fixed, or adapted towards a target KL after every step (Ziegler et al.'s controller).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..algorithms import (
    aggregate_loss,
    clipped_surrogate,
    clipped_value_loss,
    gae_advantages,
    masked_mean,
    whiten,
)
from ..algorithms.ppo import adaptive_kl_coef, explained_variance, kl_shaped_rewards
from ..data.batching import decode_completions, encode_prompts
from ..data.loading import prompt_text
from ..data.sources import DataConfig, PromptSource
from ..evaluation import evaluate, headline
from ..models.forward import completion_logprobs, trim_padding
from ..models.loading import ModelLoadError, autocast_context, frozen_copy, resolve_dtype
from ..models.reward_model import load_scalar_model, scalar_model_from_causal_lm
from ..models.setup import ModelConfig, describe, forward_autocast, load_or_build
from ..models.value_head import PolicyAndValue
from ..rewards.combine import RewardSpec, score_completions
from ..rollout.sampling import SamplingConfig, sample_completions
from ..runtime.checkpoint import save_pretrained_atomic
from ..runtime.config import save_config
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import build_optimizer, build_scheduler, check_optim
from ..runtime.plots import plot_run
from ..runtime.seeding import set_seed

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    output_dir: str = "runs/ppo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # reward functions (built-in names, file.py:function, or rm:/path/to/reward_model), weighted and summed
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.1)]
    )
    reward_on_error: str = "raise"  # raise: stop the run; skip: drop the unscored answers from the update
    missing_eos_penalty: float | None = None  # subtracted from the score of answers cut at max_new_tokens

    # value model: a head on the policy's backbone (shared) or a second transformer (separate)
    value_model: str = "shared"
    value_model_path: str | None = None  # separate only: initialise from here (e.g. the reward model); null: the policy
    value_head_init: str = "zero"  # zero, normal, or keep (separate only: keep a loaded head, e.g. the RM's)

    # batch geometry: each step samples prompts_per_step * samples_per_prompt answers (the rollout batch)
    steps: int = 100
    prompts_per_step: int = 64
    samples_per_prompt: int = 1
    num_ppo_epochs: int = 4
    num_minibatches: int = 1  # optimizer steps per epoch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (same gradient, less memory)

    # objective
    beta: float = 0.05  # KL coefficient (the initial one when adaptive_kl)
    adaptive_kl: bool = False
    kl_target: float = 6.0  # adaptive: target of sum_t k1_t per answer
    kl_horizon: float = 10000.0  # adaptive: answers over which beta may move by ~20%
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False  # whiten per-token rewards (scale only) before GAE

    # optimizer (steps counted in optimizer steps)
    lr: float = 5e-4
    lr_schedule: str = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    eval_every: int = 10  # 0: only before and after training
    tensorboard: bool = True

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.sampling.validate()
        check_optim("", self.lr, self.warmup_steps, self.weight_decay, self.max_grad_norm)
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "num_ppo_epochs", "num_minibatches",
                     "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        rollout = self.prompts_per_step * self.samples_per_prompt
        if rollout % self.num_minibatches or (rollout // self.num_minibatches) % self.grad_accum_steps:
            raise ValueError(f"num_minibatches ({self.num_minibatches}) must divide the rollout batch ({rollout}), "
                             f"and grad_accum_steps ({self.grad_accum_steps}) the minibatch")
        if self.value_model not in ("shared", "separate"):
            raise ValueError(f"value_model must be shared or separate, got {self.value_model!r}")
        if self.value_head_init not in ("zero", "normal", "keep"):
            raise ValueError(f"value_head_init must be zero, normal or keep, got {self.value_head_init!r}")
        if self.value_head_init == "keep" and self.value_model == "shared":
            raise ValueError("value_head_init=keep needs value_model=separate (a shared head is always new)")
        if self.value_model_path is not None and self.value_model != "separate":
            raise ValueError("value_model_path needs value_model=separate")
        if self.beta < 0 or self.cliprange < 0 or self.cliprange_value < 0 or self.vf_coef < 0:
            raise ValueError("beta, cliprange, cliprange_value and vf_coef must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0 or self.beta == 0):
            raise ValueError("adaptive_kl needs beta > 0, kl_target > 0 and kl_horizon > 0")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError("missing_eos_penalty is subtracted from the score: give a number >= 0")
        if self.reward_on_error not in ("raise", "skip"):
            raise ValueError(f"reward_on_error must be raise or skip, got {self.reward_on_error!r}")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward function or reward model")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


def run_ppo(config: PPOConfig) -> dict:
    """Train with PPO; returns the summary also written to ``summary.json``."""
    start_time = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    set_seed(config.seed)

    # --- Setup: prompts, the four models (policy, reference, rewards, value), optimizer. ---
    source = PromptSource(config.data, config.seed)
    texts = [prompt_text(r["prompt"]) for r in (source.train_rows or source.eval_rows)]
    policy, tokenizer, device = load_or_build(config.model, texts, config.seed, save_dir=out / "initial")
    reference = frozen_copy(policy) if config.beta > 0 else None
    amp_dtype = forward_autocast(config.model, policy, device)  # None unless bf16 autocast pays off here
    reward_functions = [spec.load() for spec in config.rewards]
    reward_names = [name for name, _, _ in reward_functions]
    value_model = _separate_value_model(config, policy, tokenizer, device) if config.value_model == "separate" else None
    actor_critic = PolicyAndValue(policy, value_model, head_init=config.value_head_init)
    optimizer = build_optimizer(actor_critic, config.lr, config.weight_decay)
    total_optimizer_steps = config.steps * config.num_ppo_epochs * config.num_minibatches
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.warmup_steps, total_optimizer_steps)
    sample_generator = torch.Generator(device=device).manual_seed(config.seed)
    shuffle_generator = torch.Generator().manual_seed(config.seed + 1)
    beta = config.beta
    log.info("PPO on %s with a %s value model, %d answers/step, beta=%g", describe(policy), actor_critic.layout,
             config.rollout_size, beta)

    def run_eval() -> dict:
        with autocast_context(device, amp_dtype):
            return evaluate(policy, tokenizer, source.eval_rows, reward_functions, config.sampling.max_new_tokens,
                            config.data.max_prompt_tokens, device, on_error=config.reward_on_error)

    (out / "metrics.jsonl").unlink(missing_ok=True)
    logger = MetricsLogger(out, tensorboard=config.tensorboard)
    before = run_eval()
    logger.log(0, before)
    history = [(0, headline(before))]

    progress = tqdm(range(1, config.steps + 1), desc="ppo", dynamic_ncols=True, disable=None)
    for step in progress:
        step_start = time.perf_counter()
        rows = source.next_batch(config.prompts_per_step)
        prompts = [r["prompt"] for r in rows]
        S = config.samples_per_prompt

        # 1. Rollout: answers from pi_old (the current weights, before this step's updates).
        prompt_ids, prompt_mask, num_truncated = encode_prompts(tokenizer, prompts, config.data.max_prompt_tokens,
                                                                device)
        with autocast_context(device, amp_dtype):
            rollout = sample_completions(policy, prompt_ids, prompt_mask, S, config.sampling,
                                         tokenizer.eos_token_id, tokenizer.pad_token_id, sample_generator,
                                         record_logprobs=False)  # recomputed with the values
        completions = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
        generation_seconds = time.perf_counter() - step_start

        # 2. Score each answer (reward model and/or functions); penalise answers that never emitted EOS.
        columns = {k: [r.get(k) for r in rows for _ in range(S)] for k in rows[0] if k != "prompt"}
        scores = score_completions(reward_functions, [p for p in prompts for _ in range(S)], completions,
                                   columns, on_error=config.reward_on_error)
        reward = scores.total.to(device)  # [N], NaN where no function applied
        score = reward.clone()
        if config.missing_eos_penalty is not None:
            score = score - config.missing_eos_penalty * (~rollout.finished).float()
        scored = ~score.isnan()  # unscored answers take no part in the update
        score = torch.nan_to_num(score, nan=0.0)

        prompt_ids, prompt_mask, completion_ids, completion_mask = trim_padding(
            rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        mask = completion_mask * scored[:, None].long()  # the tokens that count in the losses
        n = completion_ids.size(0)
        minibatch = n // config.num_minibatches

        # 3. pi_old and V_old of every token (one pass through the policy and critic), and pi_ref.
        with torch.no_grad(), autocast_context(device, amp_dtype):
            old_logp, old_values = _forward_in_chunks(actor_critic, batch, config.sampling.temperature, minibatch)
            ref_logp = (_forward_in_chunks(reference, batch, config.sampling.temperature, minibatch)[0]
                        if reference is not None else None)

            # 4. Per-token rewards (KL penalty on every token, the score on the last), GAE, whitening.
            rewards, kl, non_score = kl_shaped_rewards(score, old_logp, ref_logp, mask, beta)
            if config.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae_advantages(rewards, old_values, mask, config.gamma, config.lam)
            advantages = whiten(advantages, mask)

        # 5. num_ppo_epochs passes over shuffled minibatches; policy and value losses share one backward.
        actor_critic.train()
        sums = {k: 0.0 for k in ("loss", "policy_loss", "value_loss", "clip", "value_clip", "approx_kl", "entropy",
                                 "tokens", "grad_norm", "updates")}
        for _ in range(config.num_ppo_epochs):
            order = torch.randperm(n, generator=shuffle_generator).to(device)
            for mb_rows in order.split(minibatch):
                mb_tokens = float(mask[mb_rows].sum())
                if mb_tokens == 0:
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                for micro_rows in mb_rows.chunk(config.grad_accum_steps):
                    ids_p, mask_p, ids_c, mask_c = trim_padding(*(t[micro_rows] for t in batch))
                    width = ids_c.size(1)
                    with autocast_context(device, amp_dtype):
                        logp, entropy, values = actor_critic(ids_p, mask_p, ids_c, mask_c,
                                                             config.sampling.temperature, with_entropy=True)
                    loss_mask = mask[micro_rows, :width]
                    old = old_logp[micro_rows, :width]
                    policy_loss, clipped = clipped_surrogate(logp, old, advantages[micro_rows, :width],
                                                             config.cliprange, config.cliprange)
                    value_loss, value_clipped = clipped_value_loss(values, old_values[micro_rows, :width],
                                                                   returns[micro_rows, :width], config.cliprange_value)
                    loss = aggregate_loss(policy_loss + config.vf_coef * value_loss, loss_mask, "token_mean",
                                          num_tokens=mb_tokens)
                    loss.backward()
                    loss_value += float(loss.detach())
                    valid = loss_mask.bool()
                    sums["policy_loss"] += float(policy_loss.detach()[valid].sum())
                    sums["value_loss"] += float(value_loss.detach()[valid].sum())
                    sums["clip"] += float(clipped[valid].sum())
                    sums["value_clip"] += float(value_clipped[valid].sum())
                    sums["approx_kl"] += float((0.5 * (logp.detach() - old) ** 2)[valid].sum())
                    sums["entropy"] += float(entropy[valid].sum())
                    sums["tokens"] += float(valid.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(actor_critic.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                sums["loss"] += loss_value
                sums["grad_norm"] += float(grad_norm)
                sums["updates"] += 1

        # 6. Adapt beta towards the target KL (sum over an answer's tokens, mean over answers).
        kl_per_answer = float(kl.sum(dim=1)[scored].mean()) if scored.any() else 0.0
        beta_used = beta
        if config.adaptive_kl:
            beta = adaptive_kl_coef(beta, kl_per_answer, config.kl_target, config.kl_horizon, n)

        # --- Metrics, evaluation. ---
        seconds = time.perf_counter() - step_start
        lengths = rollout.lengths.float()
        tokens = max(sums["tokens"], 1.0)
        updates = max(sums["updates"], 1)
        non_score_per_answer = float(non_score.sum(dim=1)[scored].mean()) if scored.any() else 0.0
        score_mean = float(score[scored].mean()) if scored.any() else math.nan
        metrics = {
            "reward/mean": float(reward.nanmean()),
            "score": score_mean,
            "non_score_reward": non_score_per_answer,
            "rlhf_reward": score_mean + non_score_per_answer,
            "kl": kl_per_answer,
            "kl_coef": beta_used,
            "loss": sums["loss"] / updates,
            "policy_loss": sums["policy_loss"] / tokens,
            "value_loss": sums["value_loss"] / tokens,
            "clip_fraction": sums["clip"] / tokens,
            "value_clip_fraction": sums["value_clip"] / tokens,
            "approx_kl": sums["approx_kl"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "explained_variance": explained_variance(old_values, returns, mask),
            "value/mean": float(masked_mean(old_values, mask)),
            "return/mean": float(masked_mean(returns, mask)),
            "completion_length": float(lengths.mean()),
            "frac_finished": float(rollout.finished.float().mean()),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": sums["grad_norm"] / updates,
            "seconds_per_step": seconds,
            "generation_seconds": generation_seconds,
            "tokens_per_second": float(rollout.prompt_mask.sum() + lengths.sum()) / seconds,
            "prompts_truncated": num_truncated,
            "reward_failures": scores.num_failed,
        }
        for j, name in enumerate(reward_names):
            metrics[f"reward/{name}/mean"] = float(scores.per_function[:, j].nanmean())
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics.update(run_eval())
            history.append((step, headline(metrics)))
        logger.log(step, metrics)
        progress.set_postfix(score=f"{score_mean:.3f}", kl=f"{kl_per_answer:.3f}", acc=f"{history[-1][1]:.3f}")

    after = run_eval()
    logger.log(config.steps, after)
    history.append((config.steps, headline(after)))
    logger.close()
    save_pretrained_atomic(policy, tokenizer, out / "final")
    actor_critic.save_value(out / "final")
    plot_run(out / "metrics.jsonl", out / "curves.png", title="PPO")
    summary = {
        "recipe": "ppo",
        "steps": config.steps,
        "value_model": actor_critic.layout,
        "accuracy_before": headline(before),
        "accuracy_after": headline(after),
        "eval_before": before,
        "eval_after": after,
        "eval_history": history,
        "final_kl_coef": beta,
        "seconds": time.perf_counter() - start_time,
        "model_dir": str(out / "final"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _separate_value_model(config: PPOConfig, policy, tokenizer, device):
    """The critic as its own transformer: a copy of the policy, or ``value_model_path`` (e.g. the reward model).

    Its head starts at ``value_head_init`` (``keep``: a loaded checkpoint's trained head). It reads the
    policy's token ids, so it must share the policy's vocabulary.
    """
    head_init = "zero" if config.value_head_init == "keep" else config.value_head_init
    if config.value_model_path is None:
        return scalar_model_from_causal_lm(policy, head_init)
    value_model = load_scalar_model(config.value_model_path, resolve_dtype(config.model.dtype, device), device,
                                    head_init=head_init, pad_token_id=tokenizer.pad_token_id,
                                    reset_head=config.value_head_init != "keep")
    if value_model.config.vocab_size < len(tokenizer):
        raise ModelLoadError(f"value model {config.value_model_path}: its vocabulary ({value_model.config.vocab_size}) "
                             f"is smaller than the policy's ({len(tokenizer)}); a separate value model reads the "
                             "policy's tokens, so it needs the policy's tokenizer")
    return value_model


def _forward_in_chunks(model, batch, temperature: float, chunk: int):
    """(log-probs [N, T], values [N, T] or None) of every completion token, ``chunk`` rows at a time (no grad).

    ``model`` is the policy-and-value module, or a plain causal LM (the reference: no values).
    """
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    logp_out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    values_out = torch.zeros_like(logp_out) if isinstance(model, PolicyAndValue) else None
    for start in range(0, completion_ids.size(0), chunk):
        rows = slice(start, start + chunk)
        args = (prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows], temperature)
        if values_out is None:
            logp, _ = completion_logprobs(model, *args)
        else:
            logp, _, values = model(*args)
            values_out[rows] = values
        logp_out[rows] = logp
    return logp_out, values_out
