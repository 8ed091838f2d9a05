"""The policy forward pass used by every trainer: log-probabilities of completion tokens."""

from __future__ import annotations

import torch

from ..algorithms.losses import selective_log_softmax, token_entropy


def trim_padding(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Drop prompt columns that are padding in every row and completion columns past the longest answer."""
    keep_from = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else prompt_mask.size(1)
    width = int(completion_mask.sum(1).max()) if completion_mask.numel() else 0
    width = max(width, 1)
    return (prompt_ids[:, keep_from:], prompt_mask[:, keep_from:],
            completion_ids[:, :width], completion_mask[:, :width])


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
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logp = selective_log_softmax(logits, completion_ids)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = token_entropy(logits)
    return logp, entropy
