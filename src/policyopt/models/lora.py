"""LoRA and QLoRA adapters through peft: wrap a model, give its frozen base as the reference, save, merge.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes every weight W of the base model and trains, for each
targeted linear layer, two small matrices A [r, d_in] and B [d_out, r], so the layer computes

    h = W x + (alpha / r) * B A x            (B starts at 0, so the adapted model starts as the base)

Only A and B (and any ``modules_to_save``, e.g. a reward model's scalar head, trained in full) take
gradients and optimizer state. QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen W in
4-bit NF4 (or 8-bit) through bitsandbytes, on a CUDA GPU.

What the recipes get from here:

- ``apply_lora``: the model wrapped by ``peft.get_peft_model`` (a ``PeftModel``), its adapter seeded;
- ``AdapterDisabled``: the reference policy pi_ref as the same model with its adapter switched off
  (``PeftModel.disable_adapter``): the frozen base, bit for bit, with no second copy of the weights;
- ``merged_state_dict`` / ``save_merged``: the plain model with W + (alpha / r) B A in place of W,
  computed from the adapter tensors (peft's ``get_delta_weight``) into new tensors, so the trained model
  is never touched (peft's merge-then-unmerge would leave ~2e-7 of rounding residue in its base weights);
- ``load_adapter_weights``: a saved adapter (peft's format) copied into the model bit for bit (resume).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

QUANTIZE = ("none", "4bit", "8bit")
# a key of a peft-wrapped model's state dict that belongs to an adapter, not to the base model
_ADAPTER_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


@dataclass
class LoraConfig:
    """LoRA adapters through peft (r = 0: off, every weight trains)."""

    r: int = 0  # LoRA rank; 0 trains every weight (no adapter); e.g. 8 or 16
    alpha: float = 16.0  # the adapter's update is scaled by alpha / r
    # dropout on the adapter's input in training passes; in RL, > 0 makes the trained log-probs differ from
    # the sampler's (eval mode), so pi/pi_old != 1 even on-policy
    dropout: float = 0.0
    # layers that get an adapter: all-linear (every linear layer but the output head), a list of module
    # names (e.g. [q_proj, v_proj]) or a regular expression that peft matches against full module names
    target_modules: str | list[str] = "all-linear"
    # modules trained in full beside the adapter and saved with it (a reward model's score head is always added)
    modules_to_save: list[str] | None = None
    # QLoRA: the frozen base in 4-bit NF4 or 8-bit through bitsandbytes (CUDA only; pip install policyopt[qlora])
    quantize: Literal[QUANTIZE] = "none"
    save_merged: bool = True  # also write final_merged/: the base with the adapter merged in, a plain HF model

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self, prefix: str = "model.lora.") -> None:
        if self.r < 0:
            raise ValueError(f"{prefix}r must be >= 0 (0: no adapter), got {self.r}")
        if not self.enabled:
            if self.quantize != "none":
                raise ValueError(f"{prefix}quantize={self.quantize} needs {prefix}r > 0: a quantized base "
                                 "can only be trained through an adapter")
            return
        if not self.alpha > 0:
            raise ValueError(f"{prefix}alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{prefix}dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError(f"{prefix}target_modules must be all-linear, a list of module names or a regex")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"{prefix}quantize must be one of {', '.join(QUANTIZE)}; got {self.quantize!r}")


def check_quantization(config: LoraConfig, device: torch.device) -> None:
    """QLoRA needs a CUDA device and bitsandbytes; say which is missing, before any model loads."""
    if config.quantize == "none":
        return
    if device.type != "cuda":
        raise ValueError(f"model.lora.quantize={config.quantize} needs a CUDA GPU (bitsandbytes' 4- and 8-bit "
                         f"kernels), but the model's device is {device}; use model.lora.quantize=none on a CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"model.lora.quantize={config.quantize} needs bitsandbytes, which is not installed: "
                         "pip install 'policyopt[qlora]'") from exc


# ------------------------------------------------------------------ wrapping


def is_adapter_model(model) -> bool:
    """True for a model wrapped by peft (a LoRA run's policy, reward model...)."""
    if not type(model).__module__.startswith("peft"):
        return False  # told without importing peft (a second or so) in runs that never use it
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap(model):
    """The transformers model under a peft wrapper (its adapter layers in place and active), else ``model``."""
    return model.get_base_model() if is_adapter_model(model) else model


def apply_lora(model, config: LoraConfig, *, task: Literal["causal_lm", "reward"] = "causal_lm",
               base_source: str | os.PathLike | None = None, seed: int = 0):
    """``model`` wrapped by ``peft.get_peft_model``: every base weight frozen, fresh adapters on
    ``config.target_modules`` (A from peft's Kaiming init under ``seed``, B = 0, so the wrapped model
    computes exactly what ``model`` did). A reward model (``task="reward"``) also trains its ``score``
    head in full (``modules_to_save``). ``base_source`` (a hub id or local directory the base reloads
    from) is written into the adapter's config, so ``AutoPeftModel*.from_pretrained(adapter_dir)``
    finds the base."""
    import peft

    modules_to_save = list(config.modules_to_save or [])
    if task == "reward" and "score" not in modules_to_save:
        modules_to_save.append("score")
    if is_quantized(model):
        # norms and embeddings to fp32 and input gradients on, as QLoRA training needs
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        modules_to_save=modules_to_save or None, task_type="SEQ_CLS" if task == "reward" else "CAUSAL_LM",
    )
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the adapter's init depends on the seed alone, not on earlier draws
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.get_peft_model(model, lora_config)
    if base_source is not None:
        source = str(base_source)
        if os.path.isdir(os.path.expanduser(source)):
            source = str(Path(source).expanduser().resolve())  # a local base: found from any working directory
        for adapter_config in wrapped.peft_config.values():
            adapter_config.base_model_name_or_path = source
    trainable, total = count_trainable(wrapped)
    log.info("LoRA r=%d alpha=%g on %s: %s of %s parameters train (%.2f%%)%s", config.r, config.alpha,
             config.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
             f", base quantized to {config.quantize}" if config.quantize != "none" else "")
    return wrapped


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that take gradients, all parameters), each tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def load_quantized_causal_lm(name_or_path: str, quantize: str, dtype: torch.dtype, device: torch.device):
    """A causal LM whose linear weights bitsandbytes stores in 4-bit NF4 (double-quantised, computing in
    ``dtype``) or 8-bit, on ``device``: QLoRA's frozen base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), quantization_config=quantization,
                                                dtype=dtype, device_map={"": device})


# ------------------------------------------------------------------ the reference policy


class AdapterDisabled:
    """The reference policy pi_ref of a LoRA run: the trained model with its adapter switched off.

    Calling it runs the ``PeftModel`` under ``disable_adapter()`` and in eval mode (as a frozen copy
    would be), so it computes the base model's logits bit for bit from the very tensors the policy
    uses: no second copy of the weights is held. It is not an ``nn.Module`` of its own (no
    ``.parameters()`` of its own to count twice); the attributes the forward passes read (``config``,
    ``parameters()``, ``get_base_model()``) come from the wrapped model.
    """

    returns_values = False  # models.forward.forward_rows: a causal LM, not PPO's policy-and-value module

    def __init__(self, model):
        if not is_adapter_model(model):
            raise TypeError(f"AdapterDisabled needs a peft-wrapped model, got {type(model).__name__}")
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter(), _eval_mode(self.model):
            return self.model(*args, **kwargs)

    forward = __call__

    @property
    def training(self) -> bool:
        return False

    def eval(self):
        return self  # it always runs in eval mode

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("the reference policy (the base with the adapter disabled) is frozen; train the policy")
        return self

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise RuntimeError("the reference policy (the base with the adapter disabled) takes no gradients")
        return self

    def __getattr__(self, name):
        if name == "model":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"AdapterDisabled({type(unwrap(self.model)).__name__})"


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Every submodule in eval mode (dropout off) inside, each restored to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def reference_policy(model):
    """pi_ref for a LoRA policy: ``AdapterDisabled(model)``, which shares every tensor with ``model``."""
    reference = AdapterDisabled(model)
    log.info("reference policy: the policy's base with its LoRA adapter disabled (no second copy of the model)")
    return reference


# ------------------------------------------------------------------ merged weights, without mutation


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of the plain base model class with every adapter merged in, W' = W + (alpha / r) B A.

    Computed into new tensors from peft's ``get_delta_weight`` (so ``model`` is not modified at all, not
    even transiently); a quantized base weight is dequantized first. ``modules_to_save`` give their
    trained copies. The other entries are the model's own tensors (shared, not copied): save the result
    or read it, never train it. Keys are those of the base class (``model.layers.0.self_attn.q_proj.weight``).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.integrations import dequantize_module_weight

    base = unwrap(model)
    adapter = model.active_adapter if is_adapter_model(model) else None
    state = {}
    for key, tensor in base.state_dict().items():
        if _ADAPTER_KEY.search(key) or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            head, _, rest = key.partition(".modules_to_save.")
            name, _, rest = rest.partition(".")
            if name == adapter:
                state[f"{head}.{rest}"] = tensor
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    for name, module in base.named_modules():
        if not name or isinstance(module, ModulesToSaveWrapper) or ".base_layer" in name or ".original_module" in name:
            continue  # a LoRA layer's base_layer is handled with the LoRA layer (under the LoRA layer's name)
        layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
        quantized = type(getattr(layer, "weight", None)).__name__ in ("Params4bit", "Int8Params")
        adapted = isinstance(module, LoraLayer) and adapter in module.lora_A and not module.merged
        if not (quantized or adapted):
            continue
        with torch.no_grad():
            weight = dequantize_module_weight(layer).detach()  # the weight itself unless quantized
            out_dtype = _loaded_dtype(base, weight) if quantized else weight.dtype
            if adapted:
                weight = weight.float() + module.get_delta_weight(adapter).float()
            merged = weight.to(out_dtype)
        if quantized:  # bitsandbytes' quantisation state (absmax, quant_map, SCB...): gone once dequantized
            for key in [k for k in state if k.startswith(f"{name}.") and k != f"{name}.bias"]:
                del state[key]
        state[f"{name}.weight"] = merged
    return state


def _loaded_dtype(base, fallback: torch.Tensor) -> torch.dtype:
    """The dtype a quantized model was loaded in (``dtype=`` of ``from_pretrained``): its merged weights'."""
    dtype = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else fallback.dtype


def merged_model(model):
    """A plain transformers model (the base class, no peft, no quantization) holding ``merged_state_dict``.

    Built on the meta device and given the merged tensors (``assign``), so no other copy of the weights
    is made; its unadapted tensors are the trained model's own. For saving and reading only.
    """
    base = unwrap(model)
    config = copy.deepcopy(base.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):
        plain = type(base)(config)
    state = merged_state_dict(model)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merged weights do not fit {type(base).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    _share_unsaved_tensors(plain, base)
    if getattr(base, "generation_config", None) is not None:  # causal LMs (a reward model has none)
        plain.generation_config = copy.deepcopy(base.generation_config)
    return plain


def plain_weights(model):
    """``model`` itself, or for a LoRA model its ``merged_model``: what a new model copies its weights from
    (e.g. PPO's separate critic, which then trains in full, as TRL's PPO does beside a LoRA policy)."""
    if not is_adapter_model(model):
        return model
    log.info("copying the LoRA model's merged weights into a new model, which trains in full (no adapter)")
    return merged_model(model)


def _share_unsaved_tensors(plain: torch.nn.Module, base: torch.nn.Module) -> None:
    """Give ``plain`` (built on the meta device) the tensors no state dict holds, from the same modules of
    ``base``: non-persistent buffers and tensor attributes (e.g. RoPE's ``inv_freq``), so it can run."""
    base_modules = {name.replace(".base_layer", ""): module for name, module in base.named_modules()}
    for name, module in plain.named_modules():
        source = base_modules.get(name)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[key] = source._buffers[key]
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, key, getattr(source, key))
    left = [name for name, tensor in plain.state_dict(keep_vars=True).items() if tensor.is_meta]
    left += [name for name, tensor in plain.named_buffers() if tensor.is_meta]
    if left:
        raise RuntimeError(f"merged model: no weights for {left[:5]}")


def save_merged(model, tokenizer, directory: str | Path) -> Path:
    """Write the merged model (``merged_model``) and ``tokenizer`` to ``directory`` with ``save_pretrained``:
    a plain Hugging Face model directory that ``AutoModelFor*.from_pretrained`` loads without peft.
    Written under a temporary name and renamed into place, so a crash never leaves half a directory."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    merged_model(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


# ------------------------------------------------------------------ adapters on disk


def load_adapter_weights(model, directory: str | Path) -> None:
    """Copy the adapter saved in ``directory`` (peft's ``adapter_model.safetensors``) into ``model``, bit for bit.

    Every adapter tensor of ``model`` must be in the file and nothing else may be: a partial match
    would silently resume from the fresh adapter.
    """
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    saved = load_peft_weights(str(directory), device=str(next(model.parameters()).device))
    expected = set(get_peft_model_state_dict(model))
    if set(saved) != expected:
        raise RuntimeError(f"{directory}: the saved adapter does not match the model's (missing "
                           f"{sorted(expected - set(saved))[:3]}, unexpected {sorted(set(saved) - expected)[:3]}); "
                           "was it trained with other model.lora settings?")
    result = set_peft_model_state_dict(model, saved)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{directory}: adapter tensors the model does not have: {result.unexpected_keys[:3]}")
