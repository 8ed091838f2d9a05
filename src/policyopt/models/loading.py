"""Load any causal LM and tokenizer through transformers, and pick device and dtype defaults."""

from __future__ import annotations

import inspect
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be loaded; the message says which and why."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on a CPU (bf16 matmuls there are many times slower), bf16 on GPUs that support it."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _check_path(name_or_path: str, what: str) -> None:
    # Something shaped like a filesystem path that does not exist is almost always a typo; say so
    # instead of letting the hub client report a confusing repository-id error. Hub ids are "org/name".
    if os.path.exists(os.path.expanduser(name_or_path)):
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or name_or_path.endswith("/"):
        raise ModelLoadError(f"{what} path {name_or_path!r} does not exist")


def load_tokenizer(name_or_path: str):
    """Load a tokenizer; prompts are left-padded for generation. A missing pad token falls back to EOS."""
    _check_path(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer {name_or_path!r} has neither a pad nor an EOS token; add one with "
                "tokenizer.add_special_tokens({'pad_token': ...}) and save it again"
            )
        log.warning("tokenizer %s has no pad token; using its EOS token %r for padding",
                    name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    _check_path(name_or_path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), dtype=dtype)
    except TypeError:  # transformers < 4.56 names the argument torch_dtype
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {name_or_path!r}: {exc}") from exc
    return model.to(device)


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy that takes no gradients and stays in eval mode (the GRPO/PPO reference model)."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
