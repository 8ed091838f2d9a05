"""Load reward functions (built-in or user files) and combine their scores into one reward."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from policyopt.rewards.builtin import BUILTIN_REWARDS

logger = logging.getLogger(__name__)
_module_counter = itertools.count()
REWARD_MODEL_PREFIX = "rm:"


class RewardError(RuntimeError):
    """A reward function could not be loaded, raised, or returned unusable values."""


def load_reward_function(spec: str) -> Callable:
    """A built-in name ("accuracy", "format"), "path/to/file.py:function_name", or "rm:path/to/reward_model".

    "rm:DIR" loads a reward model trained by ``policyopt reward`` as a function of the same shape: it
    re-tokenises prompt + completion text with its own tokenizer and returns scores normalised with
    the mean and std stored beside it (``reward_stats.json``).
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec.startswith(REWARD_MODEL_PREFIX):
        from policyopt.models.loading import ModelLoadError
        from policyopt.models.reward_model import RewardModelScorer

        path = spec[len(REWARD_MODEL_PREFIX):]
        if not os.path.isdir(path):
            raise RewardError(f"reward model {path}: no such directory (expected rm:path/to/reward_model)")
        try:
            return RewardModelScorer(path)
        except ModelLoadError as e:
            raise RewardError(f"reward model {path}: {e}") from e
    if ":" not in spec:
        raise RewardError(
            f"unknown reward {spec!r}: use a built-in name ({', '.join(BUILTIN_REWARDS)}) "
            "or path/to/file.py:function_name"
        )
    # rpartition so Windows drive letters ("C:\\r.py:f") stay in the path.
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise RewardError(f"reward {spec!r} must look like path/to/file.py:function_name")
    if not os.path.isfile(path):
        raise RewardError(f"reward file {path}: no such file")

    module_name = f"policyopt_user_reward_{next(_module_counter)}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward file {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered so that pickling and dataclasses inside the file can find the module.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[module_name]
        if not isinstance(e, Exception):
            raise
        raise RewardError(f"reward file {path} failed to import: {type(e).__name__}: {e}") from e

    if not hasattr(module, name):
        defined = sorted(
            n
            for n, obj in vars(module).items()
            if callable(obj) and getattr(obj, "__module__", None) == module_name
        )
        raise RewardError(
            f"reward file {path} has no function {name!r}; "
            f"callables defined there: {', '.join(defined) or '(none)'}"
        )
    function = getattr(module, name)
    if not callable(function):
        raise RewardError(f"{path}:{name} is a {type(function).__name__}, not a function")
    return function


@dataclass
class RewardSpec:
    """One reward in a config: which function, its weight, and the name it is logged under."""

    function: str
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = "rm" if self.function.startswith(REWARD_MODEL_PREFIX) else self.function.rpartition(":")[2]

    def load(self) -> tuple[str, Callable, float]:
        """The (name, function, weight) triple that score_completions takes."""
        return self.name, load_reward_function(self.function), float(self.weight)


@dataclass
class RewardScores:
    """Per-function rewards [N, F] (NaN = missing), weighted total [N], and how many values failed."""

    per_function: "torch.Tensor"  # noqa: F821 (a string: this module does not import torch)
    total: "torch.Tensor"  # noqa: F821
    names: list[str]
    num_failed: int = 0


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_float(value: Any) -> float | None:
    """The value as a float, None for None; raises ValueError for non-numbers and NaN/inf."""
    if value is None:
        return None
    if not isinstance(value, (numbers.Real, np.bool_)):
        raise ValueError("not a real number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError("not finite")
    return result


def _as_list(output: Any) -> list | None:
    if isinstance(output, (list, tuple)):
        return list(output)
    if hasattr(output, "ndim") and hasattr(output, "tolist"):  # a tensor or an array (torch not imported here)
        return output.tolist() if output.ndim == 1 else None
    return None


def check_batch(prompts: list, completions: list, columns: dict[str, list]) -> None:
    """Raise ValueError unless prompts, completions and every column are lists of one length."""
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"got {n} prompts but {len(completions)} completions")
    for key, values in columns.items():
        if key in ("prompts", "completions"):
            raise ValueError(f"column {key!r} clashes with a reward-function argument")
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values, expected {n}")


def score_completions(
    functions,
    prompts: list,
    completions: list,
    columns: dict[str, list],
    on_error: str = "raise",
    timeout: float = 0.0,
) -> RewardScores:
    """Call each f(prompts=..., completions=..., **columns); None means "does not apply".

    ``functions``: (name, function, weight) triples, called in this process with a ``timeout`` per call
    (seconds, 0: none; main thread only), or a ``RewardHarness``, which applies its own settings.
    The total is the weighted sum over functions that returned a value, NaN where none did.
    With on_error="skip", a function that raises, times out or returns bad values scores the affected
    samples as missing and they are counted in num_failed instead of raising RewardError; see
    ``policyopt.rewards.harness``. These batches never count toward stopping a run that scores nothing.
    """
    from .harness import RewardHarness  # the harness builds on this module

    if isinstance(functions, RewardHarness):
        return functions.score(prompts, completions, columns, training=False)
    if not functions:
        raise ValueError("score_completions needs at least one reward function")
    with RewardHarness(functions, timeout=timeout, on_error=on_error, max_unscored_batches=0) as harness:
        return harness.score(prompts, completions, columns, training=False)
