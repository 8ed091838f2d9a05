"""Checkpoints in Hugging Face format, written atomically (temporary directory, then rename)."""

from __future__ import annotations

import shutil
from pathlib import Path


def save_pretrained_atomic(model, tokenizer, directory: str | Path) -> Path:
    """Save model and tokenizer with ``save_pretrained``; a crash mid-write never leaves a half directory."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory
