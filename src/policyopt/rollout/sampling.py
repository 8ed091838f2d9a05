"""Batched sampling of G completions per prompt with a KV cache.

Shapes: B prompts, G answers each, N = B * G rows laid out group-contiguous (rows g*G .. g*G+G-1
answer prompt g), P prompt tokens (left-padded), T completion tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..models.loading import autocast_context, cache_keyword


@dataclass
class SamplingConfig:
    # 0.7, not 1.0: SFT warm start then 60 GRPO steps (benchmarks/defaults.py, benchmarks/README.md): sums of
    # four digits 42.5% -> 57.5% held-out at 0.7 but -> 32.5% at 1.0; no task did better at 1.0
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass (1: all)
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 16  # answers are cut at this many tokens

    def validate(self, prefix: str = "sampling") -> None:
        if self.temperature < 0:
            raise ValueError(f"{prefix}.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"{prefix}.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{prefix}.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded with the pad id
    completion_mask: torch.Tensor  # [N, T] 1 on generated tokens up to and including EOS
    finished: torch.Tensor  # [N] bool: the completion ended with EOS (not cut at max_new_tokens)
    # [N, T] float32: the engine's own log pi(o_t) of each sampled token (0 off the mask), from engines
    # that report them (vLLM); None from policyopt's sampler, whose pi is the trainer's pi_old exactly
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the most likely token always stays)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass *before* it already reaches top_p
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def answer_noise(seed: int, prompt_keys: list[int], group_size: int, length: int) -> torch.Tensor:
    """U[0, 1) numbers [len(prompt_keys) * group_size, length] for the sampler: one stream per answer.

    Answer j to the prompt with key k (its position in the run's stream of prompts) reads its own
    stream, seeded from (seed, k, j) alone. Its tokens therefore do not depend on which other prompts
    share its batch, on the batch's order, or on how many processes split the step's prompts: one seed
    gives the same answers on 1 or N ranks (up to float rounding in the logits), and resuming needs no
    generator state.
    """
    out = torch.empty(len(prompt_keys) * group_size, length)
    stream = torch.Generator()
    for i, key in enumerate(prompt_keys):
        for j in range(group_size):
            stream.manual_seed(_mix(seed, key, j))
            out[i * group_size + j] = torch.rand(length, generator=stream)
    return out


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby keys give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (state ^ (state >> 29)) & 0x7FFFFFFFFFFFFFFF


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None,
                       uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from the categorical distribution ``probs`` [R, V] (rows need not sum to 1).

    Inverse-CDF sampling: with c_i = sum_{j<=i} p_j and u ~ U[0, 1) * c_V, return the first i with
    c_i > u, so P(i) = p_i / c_V and zero-probability tokens are never drawn. It needs one uniform
    number per row; ``torch.multinomial`` draws an exponential number per vocabulary entry, which on
    a CPU cost 50x more (4.9 ms against 0.1 ms for 32 rows x 8192 tokens) and was a quarter of the
    decode loop's time. ``uniforms`` [R]: the rows' U[0, 1) numbers (see ``answer_noise``), else drawn
    from ``generator``.
    """
    cdf = probs.cumsum(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(probs.size(0), generator=generator, device=probs.device, dtype=cdf.dtype)
    u = uniforms.to(device=probs.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


def _next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None,
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row [R] from logits [R, V]: the argmax when greedy, else a draw from

        p = softmax( filter_logits(logits / temperature, top_k, top_p) )

    The trainers recompute the sampled tokens' log-probabilities (logits / temperature, full vocabulary).
    """
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature if sampling.temperature != 1 else logits
    probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(dim=-1)
    return sample_categorical(probs, generator, uniforms)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P]
    group_size: int,
    sampling: SamplingConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    autocast: torch.dtype | None = None,
    noise: torch.Tensor | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt, forward passes under ``autocast`` (None: off).

    Random numbers come from ``noise`` [B * G, >= max_new_tokens] when given (``answer_noise``: one
    stream per answer), else from ``generator``.

    Work saved without changing the samples' distribution:
    - each prompt is prefilled once and its KV cache repeated G times;
    - rows that have emitted EOS are dropped from the batch (cache included) once a quarter of the
      active rows have finished, so finished answers stop costing compute.
    """
    with autocast_context(prompt_ids.device, autocast):  # one context: weight casts are cached across steps
        return _decode(model, prompt_ids, prompt_mask, group_size, sampling, eos_token_id, pad_token_id, generator,
                       noise)


def _decode(model, prompt_ids, prompt_mask, group_size: int, sampling: SamplingConfig, eos_token_id: int,
            pad_token_id: int, generator: torch.Generator | None, noise: torch.Tensor | None) -> Rollout:
    was_training = model.training
    model.eval()
    device = prompt_ids.device
    cache_kw = cache_keyword(model)
    batch, prompt_len = prompt_ids.shape
    n = batch * group_size

    cache = DynamicCache()
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [N, V]
    cache.batch_repeat_interleave(group_size)
    attn = prompt_mask.repeat_interleave(group_size, dim=0)  # [N, P + t] for the active rows
    next_pos = positions[:, -1].repeat_interleave(group_size, dim=0) + 1  # [N]

    tokens_out = torch.full((n, sampling.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    active = torch.arange(n, device=device)  # original row of each row still in the batch

    for step in range(sampling.max_new_tokens):
        tokens = _next_tokens(logits, sampling, generator, None if noise is None else noise[active, step])
        was_done = finished[active]  # rows that ended earlier but are not compacted away yet
        tokens = tokens.masked_fill(was_done, pad_token_id)
        tokens_out[active, step] = tokens
        lengths[active] += (~was_done).long()
        finished[active] = was_done | (tokens == eos_token_id)
        if step == sampling.max_new_tokens - 1 or bool(finished.all()):
            break
        done_in_batch = finished[active]
        if done_in_batch.float().mean() >= 0.25:
            keep = (~done_in_batch).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, tokens, attn, next_pos = active[keep], tokens[keep], attn[keep], next_pos[keep]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kw: cache},
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1

    width = int(lengths.max().item()) if n else 0
    steps = torch.arange(width, device=device)
    completion_mask = (steps[None, :] < lengths[:, None]).long()
    completion_ids = tokens_out[:, :width].masked_fill(completion_mask == 0, pad_token_id)
    if was_training:
        model.train()
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        finished=finished,
    )
