"""Load any causal LM and tokenizer through transformers, and pick device and dtype defaults."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time

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


# Hidden sizes from which bf16 autocast paid off on a CPU with AMX bf16 tiles (2-core Xeon, one GRPO
# step of 32 answers x 32 tokens, fp32 -> autocast): 128: 0.90x (slower), 192: 1.03x, 256: 1.13x,
# 384: 1.46x. Below it, casting weights costs more than the faster matrix multiplies save.
AUTOCAST_MIN_HIDDEN = 256
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul_units() -> bool:
    """True when this CPU multiplies bf16 matrices at least 1.5x faster than fp32 ones, as measured once.

    CPUs with AMX bf16 tiles (Intel Sapphire Rapids and later) do it 5-12x faster; CPUs without bf16
    units emulate it 2-11x *slower* (measured here with oneDNN capped at AVX2 or AVX-512). A timing
    probe (two 512x512 products, a few milliseconds) tells them apart, and also honours limits such as
    ONEDNN_MAX_CPU_ISA, which a CPUID flag would not.
    """
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)

    def seconds(x, y) -> float:
        x @ y  # warm-up: first-call kernel selection
        start = time.perf_counter()
        for _ in range(3):
            x @ y
        return time.perf_counter() - start

    fp32 = seconds(a, b)
    bf16 = seconds(a.bfloat16(), b.bfloat16())
    return bf16 * 1.5 <= fp32


def resolve_autocast(setting: str, dtype_setting: str, model: torch.nn.Module,
                     device: torch.device) -> torch.dtype | None:
    """The autocast dtype for forward passes (None: no autocast), from ``model.autocast``.

    ``auto`` turns bf16 autocast on only where it is both safe and faster: fp32 weights chosen by
    ``dtype: auto`` on a CPU with fast bf16 matrix units (AMX; measured, see
    ``cpu_has_bf16_matmul_units``), for a model with hidden size >= AUTOCAST_MIN_HIDDEN.
    The weights, gradients and optimizer state stay fp32 (mixed precision); an explicit
    ``dtype: float32`` means fp32 compute and keeps autocast off.
    """
    if setting == "off":
        return None
    if setting in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[setting]
    if setting != "auto":
        raise ValueError(f"autocast must be auto, off, bfloat16 or float16; got {setting!r}")
    if dtype_setting != "auto" or device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        return None
    hidden = getattr(model.config, "hidden_size", 0) or 0
    if hidden < AUTOCAST_MIN_HIDDEN:
        return None
    return torch.bfloat16 if cpu_has_bf16_matmul_units() else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when it is None. Wrap forward passes only;
    backward runs each op in the dtype its forward chose. Inside one context, casts of trainable
    weights are cached, so a decode loop casts them once, not once per token."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this version takes.

    A peft wrapper's forward takes ``**kwargs`` and passes them on, so ask the transformers model under it."""
    get_base_model = getattr(model, "get_base_model", None)
    params = inspect.signature((get_base_model() if callable(get_base_model) else model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy that takes no gradients and stays in eval mode (the GRPO/PPO reference model)."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
