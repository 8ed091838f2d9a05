"""Reward models: a transformer backbone with a scalar head, read at the last non-pad token.

The model is transformers' sequence-classification class with one label
(``AutoModelForSequenceClassification``, e.g. ``LlamaForSequenceClassification``), so a trained reward
model reloads anywhere. Scores are computed here rather than by the class's own pooling, which finds
the last token by comparing ids with ``pad_token_id`` and so reads the wrong position when pad == EOS:
we take the last position whose attention mask is 1, which is right for any padding side and any
pad token. The reward's mean and std over its training answers are stored beside the weights in
``reward_stats.json``, so users of the model can normalise its scores.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from ..algorithms import last_token_index
from ..data.batching import pad_rows
from ..data.loading import completion_text, format_prompt
from .loading import (
    ModelLoadError,
    _check_path,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from .lora import unwrap

log = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"


def reward_head(model: PreTrainedModel) -> torch.nn.Linear:
    """The scalar head of a sequence-classification model (``score`` in Llama, Qwen, Mistral, GPT-2...).

    Under LoRA the head is peft's ``modules_to_save`` wrapper around the Linear: calling it runs the
    trained copy (the original while the adapter is disabled)."""
    head = getattr(unwrap(model), "score", None)
    linear = getattr(head, "original_module", head)  # peft's wrapper keeps the Linear it copied
    if not isinstance(linear, torch.nn.Linear) or linear.out_features != 1:
        raise ModelLoadError(f"{type(model).__name__} has no one-output `score` head; reward and value models "
                             "need a sequence-classification class such as LlamaForSequenceClassification")
    return head


def init_head(head: torch.nn.Linear, mode: str) -> None:
    """``zero``: weights 0 (value heads start predicting 0); ``normal``: N(0, 1/sqrt(d + 1)) (reward heads,
    "The N Implementation Details of RLHF with PPO"); ``keep``: leave the loaded weights."""
    if mode == "keep":
        return
    with torch.no_grad():
        if mode == "zero":
            head.weight.zero_()
        elif mode == "normal":
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        else:
            raise ValueError(f"head init must be zero, normal or keep; got {mode!r}")
        if head.bias is not None:
            head.bias.zero_()


def scalar_model_from_causal_lm(causal_lm: PreTrainedModel, head_init: str = "normal") -> PreTrainedModel:
    """A sequence-classification model (one label) whose backbone is a copy of ``causal_lm``'s."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.architectures = 1, None
    model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(causal_lm.base_model.state_dict())
    model.to(device=next(causal_lm.parameters()).device, dtype=next(causal_lm.parameters()).dtype)
    init_head(reward_head(model), head_init)
    return model


def load_scalar_model(name_or_path: str, dtype: torch.dtype, device: torch.device, head_init: str = "normal",
                      pad_token_id: int | None = None, reset_head: bool = False) -> PreTrainedModel:
    """Load a one-label sequence-classification model from a reward model or a causal LM checkpoint.

    A checkpoint that already has a one-output ``score`` head keeps it (unless ``reset_head``); one
    that has none (a causal LM) gets a fresh head initialised by ``head_init``.
    """
    _check_path(name_or_path, "reward model")
    path = os.path.expanduser(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a model config from {name_or_path!r}: {exc}") from exc
    if getattr(config, "num_labels", 1) != 1 and config.architectures and any(
            a.endswith("ForSequenceClassification") for a in config.architectures):
        raise ModelLoadError(f"{name_or_path!r} is a classifier with {config.num_labels} labels; a reward "
                             "model has exactly one output")
    config.num_labels = 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a reward model from {name_or_path!r}: {exc}") from exc
    if reset_head or any(key.startswith("score.") for key in info.get("missing_keys", ())):
        init_head(reward_head(model), head_init)
    else:
        reward_head(model)
    return model.to(device)


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at the last real token (attention mask = 1) of each row: [B] float32."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = unwrap(model).base_model(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids).last_hidden_state
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    last = last_token_index(attention_mask)
    return reward_head(model)(hidden[rows, last]).squeeze(-1).float()


def encode_for_scoring(tokenizer, prompts: list, completions: list, max_length: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of [prompt | completion | EOS] per row, in the scoring model's tokens.

    The prompt is tokenised as the policy sees it (chat messages through the chat template) and the
    completion separately, then EOS is appended, exactly as in reward-model training. Rows longer than
    ``max_length`` lose tokens from the front of the prompt, so the answer is always scored.
    """
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
        ids = ids + tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"]
        ids = (ids + [tokenizer.eos_token_id])[-max_length:]
        rows.append(ids)
    return pad_rows(rows, tokenizer.pad_token_id, side="right", device=device)


def max_length_of(model: PreTrainedModel, limit: int = 1024) -> int:
    return min(limit, getattr(model.config, "max_position_embeddings", limit) or limit)


def save_reward_stats(directory: str | Path, stats: dict) -> None:
    (Path(directory) / STATS_FILE).write_text(json.dumps(stats, indent=2))


def load_reward_stats(directory: str | Path) -> dict | None:
    path = Path(directory) / STATS_FILE
    return json.loads(path.read_text()) if path.exists() else None


class RewardModelScorer:
    """A trained reward model as a TRL-shaped reward function: ``f(prompts, completions, **columns)``.

    Completions arrive as text (the policy's tokens decoded), so they are re-tokenised with the
    reward model's own tokenizer: the policy and the reward model need not share a vocabulary.
    Scores are normalised, (r - mean) / std, with the statistics stored beside the model.
    """

    def __init__(self, path: str, device: str = "auto", normalize: bool = True, batch_size: int = 64):
        self.path = path
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(path)
        self.model = load_scalar_model(path, resolve_dtype("auto", self.device), self.device, head_init="keep",
                                       pad_token_id=self.tokenizer.pad_token_id)
        self.model.eval()
        self.model.requires_grad_(False)
        stats = load_reward_stats(path) if normalize else None
        if normalize and stats is None:
            log.warning("%s has no %s: its scores are used unnormalised", path, STATS_FILE)
        self.mean = float(stats["mean"]) if stats else 0.0
        self.std = float(stats["std"]) if stats and stats["std"] > 0 else 1.0
        self.batch_size = batch_size
        self.max_length = max_length_of(self.model)
        self.__name__ = "rm"

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = encode_for_scoring(self.tokenizer, prompts[start:start + self.batch_size],
                                           completions[start:start + self.batch_size], self.max_length, self.device)
            scores.append(sequence_scores(self.model, ids, mask))
        raw = torch.cat(scores) if scores else torch.zeros(0)
        return ((raw - self.mean) / self.std).tolist()
