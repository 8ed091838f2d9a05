"""Turn prompt and completion text into padded token tensors.

Prompts are left-padded (so every row's next token lands in the same column during generation);
completions are right-padded. A row is [prompt | completion] with masks for each half.
"""

from __future__ import annotations

import torch

from .loading import format_prompt


def pad_rows(rows: list[list[int]], pad_id: int, side: str, device: torch.device | str = "cpu"):
    """Stack token lists into (ids [B, W], mask [B, W]), padding on the ``side`` ("left" or "right")."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols] = torch.tensor(r)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    text = format_prompt(tokenizer, prompt)
    # chat templates already carry their special tokens; plain text gets the tokenizer's own
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


def prompt_length(tokenizer, prompt) -> int:
    return len(_prompt_ids(tokenizer, prompt))


def encode_prompts(tokenizer, prompts: list, max_prompt_tokens: int, device: torch.device | str = "cpu"):
    """Tokenize prompts (text or chat messages). Over-long prompts keep their last ``max_prompt_tokens``
    tokens, the part nearest the answer. Returns (ids [B, P], mask [B, P], number truncated)."""
    rows, truncated = [], 0
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt)
        if len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
            truncated += 1
        rows.append(ids)
    ids, mask = pad_rows(rows, tokenizer.pad_token_id, side="left", device=device)
    return ids, mask, truncated


def encode_completions(tokenizer, completions: list[str], max_tokens: int | None = None,
                       device: torch.device | str = "cpu"):
    """Tokenize demonstration completions and append EOS. Returns (ids [B, T], mask [B, T])."""
    rows = []
    for text in completions:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        rows.append(ids)
    return pad_rows(rows, tokenizer.pad_token_id, side="right", device=device)


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """Completion text without padding or special tokens (EOS included)."""
    out = []
    for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
        out.append(tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True))
    return out
