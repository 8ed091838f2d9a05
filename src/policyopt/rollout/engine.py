"""Rollout engines: what samples a step's answers, behind one small interface.

``LocalEngine`` is policyopt's own decode loop (``sample_completions``) running on the trainer's
model; it is the default and needs nothing beyond torch. ``VLLMEngine`` (rollout/vllm_engine.py,
the optional ``policyopt[vllm]`` extra) runs a colocated vLLM engine, which holds its own copy of
the weights: they are synced from the trainer before every rollout, and its log-probabilities
differ slightly from the trainer's (other kernels, other precision). That mismatch makes the
samples slightly off-policy; ``mismatch_metrics`` measures it and ``importance_weights`` corrects
the loss for it (truncated importance sampling, as TRL and verl do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from .sampling import Rollout, SamplingConfig, sample_completions


@dataclass
class VLLMOptions:
    """How the colocated vLLM engine is built (rollout.engine=vllm only)."""

    # the engine's weights and compute dtype; auto: the trainer's weight dtype (bf16 on GPUs, fp32 on CPUs)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_memory_utilization: float = 0.3  # share of the GPU's memory vLLM may take (weights + KV cache); GPUs only
    enforce_eager: bool = False  # true: no CUDA graphs (starts faster, decodes slower); always eager on CPUs
    # free the engine's GPU memory (KV cache; weights offloaded to host memory) while the trainer updates; GPUs only
    sleep_mode: bool = True
    max_model_len: int = 0  # longest prompt + answer the engine serves; 0: data.max_prompt_tokens + sampling.max_new_tokens
    kv_cache_gib: int = 1  # CPUs only: GiB of memory for the KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)
    # after each weight sync, check on a fixed sequence that the engine's log probabilities moved to the trainer's
    # (error if they did not; catches weights, a tied head or an adapter that never reached the engine)
    probe: bool = True

    def validate(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 0 or self.kv_cache_gib < 1:
            raise ValueError(f"rollout.vllm.max_model_len must be >= 0 (0: derived) and kv_cache_gib >= 1, got "
                             f"{self.max_model_len} and {self.kv_cache_gib}")


@dataclass
class RolloutConfig:
    """Which engine samples the answers, and how the loss is corrected for its log-prob mismatch."""

    engine: Literal["local", "vllm"] = "local"  # local: policyopt's own decode loop; vllm: a colocated vLLM engine
    # truncated importance sampling against the engine's log probabilities (when the engine returns them):
    # token: w_t = min(pi_old/pi_engine, cap) per token; sequence: one w per answer (product over its tokens); off
    is_correction: Literal["token", "sequence", "off"] = "token"
    is_cap: float = 2.0  # the weights' upper bound (verl's and TRL's TIS default)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)  # how the vLLM engine is built (rollout.engine=vllm)

    def validate(self) -> None:
        if self.is_cap < 1:
            raise ValueError(f"rollout.is_cap must be >= 1 (weights are truncated above it), got {self.is_cap}")
        self.vllm.validate()


class RolloutEngine(Protocol):
    """What the recipes call: sample answers, and take the trainer's new weights."""

    returns_logprobs: bool  # generate() fills Rollout.logprobs (the engine's own log-probs of its samples)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                 sampling: SamplingConfig, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> Rollout:
        """``group_size`` answers to each left-padded prompt, rows group-contiguous (see rollout.sampling);
        random numbers from ``noise`` (``sampling.answer_noise``: one stream per answer) or ``generator``."""

    def sync_weights(self, model: torch.nn.Module) -> dict:
        """Make the engine sample from ``model``'s current weights; returns metrics (may be empty)."""


class LocalEngine:
    """policyopt's own sampler on the trainer's model: nothing to sync, pi_engine = pi_old exactly.

    It records no log-probs: the trainer's recomputed pi_old is the sampling distribution itself, so
    the importance weight pi_old / pi_engine is exactly 1 and the correction is skipped.
    """

    returns_logprobs = False

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int,
                 autocast: torch.dtype | None = None):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.autocast = autocast

    def generate(self, prompt_ids, prompt_mask, group_size, sampling, generator=None, **sampler_options) -> Rollout:
        """``sample_completions`` on the trainer's model; ``sampler_options`` (e.g. ``noise``) go to it as they are."""
        return sample_completions(self.model, prompt_ids, prompt_mask, group_size, sampling, self.eos_token_id,
                                  self.pad_token_id, generator, autocast=self.autocast, **sampler_options)

    def sync_weights(self, model: torch.nn.Module) -> dict:
        self.model = model  # the same module the trainer updates in place
        return {}


def build_engine(config: RolloutConfig, model: torch.nn.Module, tokenizer, device: torch.device,
                 autocast: torch.dtype | None, max_model_len: int, seed: int) -> RolloutEngine:
    """The engine ``rollout.engine`` names, built around the trainer's ``model``."""
    if config.engine == "local":
        return LocalEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, autocast)
    from .vllm_engine import VLLMEngine  # optional dependency: imported only when asked for

    return VLLMEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, device, config.vllm,
                      config.vllm.max_model_len or max_model_len, seed)


# ------------------------------------------------------------------ the off-policy correction


def importance_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                       level: str, cap: float) -> torch.Tensor | None:
    """Truncated importance weights [N, T] (detached; 0 off the mask), or None when ``level`` is off.

    The answers were sampled from the engine's pi_engine, the loss assumes pi_old (the trainer's
    recomputation of the same weights); with delta_t = log pi_old(o_t) - log pi_engine(o_t):

        token:     w_t = min(exp(delta_t), cap)
        sequence:  w_t = min(exp(sum_s delta_s), cap)     the same for every token of an answer

    (truncated IS, Ionides 2008; "Your efficient RL framework secretly brings you off-policy RL
    training", Yao et al. 2025). The exponent is capped at log(cap) before exp, so no overflow.
    """
    if level == "off":
        return None
    mask = mask.to(old_logp.dtype)
    delta = (old_logp - engine_logp) * mask
    if level == "token":
        log_w = delta
    elif level == "sequence":
        log_w = delta.sum(dim=1, keepdim=True).expand_as(delta)
    else:
        raise ValueError(f"rollout.is_correction must be token, sequence or off, got {level!r}")
    return torch.exp(log_w.clamp(max=math.log(cap))).detach() * mask


def mismatch_metrics(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor | None, cap: float) -> dict:
    """How far the engine's sampling distribution is from the trainer's, on the sampled tokens.

    With delta_t = log pi_old(o_t) - log pi_engine(o_t) and the tokens o_t ~ pi_engine:
      mismatch/abs_logp_diff  mean_t |delta_t|
      mismatch/kl             mean_t k3_t, k3 = exp(delta) - 1 - delta >= 0, an unbiased estimate of
                              KL(pi_engine || pi_old) per token (Schulman 2020)
      mismatch/ess            effective sample size of the untruncated token weights r_t = exp(delta_t),
                              normalised: (sum r)^2 / (n * sum r^2), 1 when the engine matches exactly
      mismatch/max_abs_diff   the largest |delta_t|
    and, when a correction is applied, its weights' mean and the fraction of tokens truncated at the cap.
    """
    valid = mask.bool()
    delta = (old_logp - engine_logp)[valid].double()
    if delta.numel() == 0:
        return {}
    ratio = delta.clamp(max=20.0).exp()  # e^20: far past any cap, keeps r^2 finite
    metrics = {
        "mismatch/abs_logp_diff": float(delta.abs().mean()),
        "mismatch/max_abs_diff": float(delta.abs().max()),
        "mismatch/kl": float((ratio - 1 - delta.clamp(max=20.0)).mean()),
        "mismatch/ess": float(ratio.sum() ** 2 / (ratio.numel() * (ratio * ratio).sum())),
    }
    if weights is not None:
        applied = weights[valid].double()
        metrics["mismatch/is_weight_mean"] = float(applied.mean())
        metrics["mismatch/is_truncated_fraction"] = float((applied >= cap * (1 - 1e-6)).double().mean())
    return metrics
