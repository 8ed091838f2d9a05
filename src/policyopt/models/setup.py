"""Get the policy and tokenizer a recipe trains: load them from a path, or build a tiny local pair."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch

from .loading import load_causal_lm, load_tokenizer, resolve_autocast, resolve_device, resolve_dtype
from .lora import LoraConfig, apply_lora, check_quantization, count_trainable, load_quantized_causal_lm
from .tiny import TinyModelConfig, build_tiny_model, build_tokenizer, count_parameters

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    # a local directory or hub id; null builds a tiny Llama-style model and a byte-level BPE
    # tokenizer trained on the dataset's own text
    name_or_path: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    # the weights' dtype; auto: float32 on CPU, bfloat16 on GPUs that support it
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # forward passes under autocast: auto = bf16 on CPUs with fast bf16 units (AMX) for models with hidden
    # size >= 256 when dtype is auto (weights and optimizer stay fp32); off; bfloat16; float16
    autocast: Literal["auto", "off", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu; or any torch device name
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # train LoRA adapters instead of every weight (r > 0)

    def validate(self) -> None:
        self.tiny.validate()
        self.lora.validate()
        check_quantization(self.lora, resolve_device(self.device))


def load_or_build(config: ModelConfig, texts: list[str], seed: int, save_dir: str | Path | None = None,
                  with_lora: bool = True):
    """Return (model, tokenizer, device). A built tiny pair is saved to ``save_dir`` when given.

    With ``model.lora.r > 0`` (and ``with_lora``) the model comes wrapped in peft's LoRA adapters
    (``models.lora.apply_lora``), its base loaded from ``name_or_path`` or ``save_dir`` (a built one),
    quantized first with ``model.lora.quantize``. ``with_lora=False``: the plain model, for a caller
    that builds another model from it first (the reward model's scalar head) and adds the adapter then.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.name_or_path is None:
        tokenizer = build_tokenizer(texts, vocab_size=config.tiny.vocab_size)
        model = build_tiny_model(tokenizer, config.tiny, seed=seed).to(device=device, dtype=dtype)
        log.info("built a tiny model: %d parameters, vocabulary %d", count_parameters(model), len(tokenizer))
        if save_dir is not None:
            model.save_pretrained(save_dir)
            tokenizer.save_pretrained(save_dir)
    else:
        model = load_causal_lm(config.name_or_path, dtype, device) if config.lora.quantize == "none" else None
        tokenizer = load_tokenizer(config.tokenizer or config.name_or_path)
    lora = config.lora if with_lora else LoraConfig()
    base_source = config.name_or_path or save_dir
    if lora.quantize != "none":  # QLoRA: the base (a built one from where it was just saved) loads quantized
        if base_source is None:
            raise ValueError("model.lora.quantize needs model.name_or_path, or a save_dir for the built tiny model")
        model = load_quantized_causal_lm(str(base_source), lora.quantize, dtype, device)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora.enabled:
        model = apply_lora(model, lora, base_source=base_source, seed=seed)
    return model, tokenizer, device


def describe(model: torch.nn.Module) -> str:
    trainable, total = count_trainable(model)
    if trainable == total:
        return f"{type(model).__name__} with {count_parameters(model):,} parameters"
    return f"{type(model).__name__} with {total:,} parameters, {trainable:,} of them trained"


def forward_autocast(config: ModelConfig, model: torch.nn.Module, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the recipe's forward passes use (see ``resolve_autocast``), logged once."""
    dtype = resolve_autocast(config.autocast, config.dtype, model, device)
    if dtype is not None:
        log.info("forward passes under %s autocast (model.autocast=%s; weights and optimizer stay %s)",
                 str(dtype).removeprefix("torch."), config.autocast,
                 str(next(model.parameters()).dtype).removeprefix("torch."))
    return dtype
