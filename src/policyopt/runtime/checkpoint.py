"""Checkpoints in Hugging Face format, written atomically, that resume a run exactly.

A training checkpoint is a directory ``checkpoints/step-000123`` holding the model and tokenizer
(``save_pretrained``), ``trainer_state.pt`` (optimizer, scheduler, step, every RNG state, the data
position and whatever else the recipe needs) and a copy of ``metrics.jsonl`` up to that step. It is
written under a temporary name and renamed into place, so a crash mid-write never leaves a broken
"latest" checkpoint: a directory named ``step-*`` is always complete.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_pretrained_atomic(model, tokenizer, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Save model and tokenizer with ``save_pretrained``; a crash mid-write never leaves a half directory.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's gathered ones)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _replace(tmp, directory)
    return directory


def _replace(tmp: Path, directory: Path) -> None:
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG a run draws from: Python, NumPy, torch (CPU and CUDA) and named torch generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


def save_training_checkpoint(checkpoint_root: str | Path, step: int, model, tokenizer, state: dict,
                             metrics_path: str | Path | None = None, keep_last: int = 2,
                             model_state: dict | None = None) -> Path:
    """Write ``checkpoint_root/step-{step}`` atomically, then delete all but the newest ``keep_last``."""
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    if metrics_path is not None and Path(metrics_path).exists():
        shutil.copyfile(metrics_path, tmp / "metrics.jsonl")
    _replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories from a crash are ignored)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def load_training_state(checkpoint: str | Path) -> dict:
    # our own file, holding RNG states and optimizer tensors: weights_only=False is required
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def resolve_resume(resume: str | None, checkpoint_root: str | Path) -> Path | None:
    """``None``: start fresh. ``"auto"``: newest complete checkpoint if any. Otherwise a checkpoint path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        from .config import ConfigError

        raise ConfigError(f"resume={resume!r}: no {STATE_FILE} there; "
                          "use resume=auto or a checkpoints/step-* directory")
    return path
