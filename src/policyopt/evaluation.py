"""Held-out evaluation: greedy answers to fixed prompts, scored by the run's reward functions."""

from __future__ import annotations

import torch

from .data.batching import decode_completions, encode_prompts
from .rewards.combine import score_completions
from .rollout.sampling import SamplingConfig, sample_completions


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], reward_functions, max_new_tokens: int,
             max_prompt_tokens: int, device, batch_size: int = 256, on_error: str = "raise",
             autocast: torch.dtype | None = None) -> dict:
    """Mean reward of greedy completions, per function and in total: ``eval/<name>`` and ``eval/reward``.

    With the built-in accuracy reward, ``eval/accuracy`` is the fraction of exactly right answers.
    Forward passes run under ``autocast`` (None: the weights' dtype).
    """
    if not rows:
        return {}
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    per_function, totals, lengths = [], [], []
    names: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        prompts = [r["prompt"] for r in chunk]
        ids, mask, _ = encode_prompts(tokenizer, prompts, max_prompt_tokens, device)
        rollout = sample_completions(model, ids, mask, 1, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     autocast=autocast)
        texts = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
        columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k != "prompt"}
        scores = score_completions(reward_functions, prompts, texts, columns, on_error=on_error)
        names = scores.names
        per_function.append(scores.per_function)
        totals.append(scores.total)
        lengths.append(rollout.lengths.float())
    per_function_t = torch.cat(per_function)
    result = {"eval/reward": float(torch.cat(totals).nanmean())}
    for j, name in enumerate(names):
        result[f"eval/{name}"] = float(per_function_t[:, j].nanmean())
    result["eval/completion_length"] = float(torch.cat(lengths).mean())
    return result

