"""The policy forward pass used by every trainer: log-probabilities of completion tokens."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..algorithms.losses import selective_log_softmax, selective_log_softmax_and_entropy
from .loading import cache_keyword


def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drop prompt columns that are padding in every row and completion columns past the longest answer."""
    return (*_trim_left(prompt_ids, prompt_mask), *_trim_right(completion_ids, completion_mask))


def token_logprobs(logits, tokens, temperature: float, with_entropy: bool):
    """(log-probabilities of ``tokens`` under logits / temperature, per-token entropy or None)."""
    logits = logits.float()
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    if not with_entropy:
        return selective_log_softmax(logits, tokens), None
    return selective_log_softmax_and_entropy(logits, tokens)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature: float = 1.0, with_entropy: bool = False):
    """log pi(o_t | q, o_<t) for every completion token: [N, T]; optionally the per-token entropy [N, T].

    Logits are divided by the sampling temperature, so these are the same log-probabilities the
    sampler recorded. Only the completion positions' logits are computed (``logits_to_keep``), and
    log-probabilities are gathered without building the full log-softmax.
    """
    completion_len = completion_ids.size(1)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_len + 1,
    ).logits[:, :-1]  # position t predicts completion token t
    return token_logprobs(logits, completion_ids, temperature, with_entropy)


def _trim_left(ids, mask):
    keep_from = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else mask.size(1)
    return ids[:, keep_from:], mask[:, keep_from:]


def _trim_right(ids, mask):
    width = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
    return ids[:, :width], mask[:, :width]


def shared_prompt_logprobs(model, prompt_ids, prompt_mask, row_prompt, completion_ids, completion_mask,
                           temperature: float = 1.0, with_entropy: bool = False):
    """Same result as ``completion_logprobs`` on [prompt[row_prompt] | completion], computing each prompt once.

    The G answers to one prompt share its prefix, so the prompt is run once ([B, P]), its KV cache is
    gathered per answer (``row_prompt`` [M] maps answer rows to prompts) and the completions attend to
    it. Gathering is differentiable, so gradients reach the prompt's keys and values exactly as in the
    padded [M, P + T] forward, at a cost of B*P + M*T tokens instead of M*(P + T).
    """
    cache_kw = cache_keyword(model)
    cache = DynamicCache()
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{cache_kw: cache})
    logits = out.logits[:, -1][row_prompt][:, None]  # [M, 1, V]: the prompt's last position predicts token 0
    completion_len = completion_ids.size(1)
    if completion_len > 1:
        cache.batch_select_indices(row_prompt)
        inputs = completion_ids[:, :-1]
        attention_mask = torch.cat([prompt_mask[row_prompt], completion_mask[:, :-1]], dim=1)
        position_ids = positions[row_prompt, -1:] + 1 + torch.arange(completion_len - 1, device=inputs.device)
        rest = model(input_ids=inputs, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **{cache_kw: cache}).logits
        logits = torch.cat([logits, rest], dim=1)  # [M, T, V]
    return token_logprobs(logits, completion_ids, temperature, with_entropy)


def grouped_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rows, group_size: int,
                     temperature: float = 1.0, with_entropy: bool = False, share_prompt: bool = True):
    """Log-probs (and entropy) of completion ``rows`` of a rollout whose prompts are given once per group.

    prompt_ids/mask: [B, P] one row per prompt; completion_ids/mask: [B * G, T], group-contiguous.
    Returns tensors [len(rows), T'] where T' is the longest of the selected completions.
    """
    rows = rows.to(completion_ids.device)
    groups = torch.div(rows, group_size, rounding_mode="floor")
    completion_ids, completion_mask = _trim_right(completion_ids[rows], completion_mask[rows])
    if share_prompt:
        unique, row_prompt = torch.unique(groups, return_inverse=True)
        p_ids, p_mask = _trim_left(prompt_ids[unique], prompt_mask[unique])
        return shared_prompt_logprobs(model, p_ids, p_mask, row_prompt, completion_ids, completion_mask,
                                      temperature, with_entropy)
    p_ids, p_mask = _trim_left(prompt_ids[groups], prompt_mask[groups])
    return completion_logprobs(model, p_ids, p_mask, completion_ids, completion_mask, temperature, with_entropy)
