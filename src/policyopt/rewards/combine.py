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
import torch

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

    per_function: torch.Tensor
    total: torch.Tensor
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
    if isinstance(output, (torch.Tensor, np.ndarray)):
        return output.tolist() if output.ndim == 1 else None
    return None


def score_completions(
    functions: list[tuple[str, Callable, float]],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    on_error: str = "raise",
) -> RewardScores:
    """Call each f(prompts=..., completions=..., **columns); None means "does not apply".

    The total is the weighted sum over functions that returned a value, NaN where none did.
    With on_error="skip", a function that raises or returns bad values scores the affected
    samples as missing and they are counted in num_failed instead of raising RewardError.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not functions:
        raise ValueError("score_completions needs at least one reward function")
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"got {n} prompts but {len(completions)} completions")
    for key, values in columns.items():
        if key in ("prompts", "completions"):
            raise ValueError(f"column {key!r} clashes with a reward-function argument")
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values, expected {n}")

    per_function = torch.full((n, len(functions)), float("nan"))
    num_failed = 0

    def fail(message: str, count: int, cause: BaseException | None = None) -> None:
        nonlocal num_failed
        if on_error == "raise":
            raise RewardError(message) from cause
        logger.warning("%s; scoring as missing", message)
        num_failed += count

    for j, (name, function, _) in enumerate(functions):
        try:
            output = function(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            fail(f"reward function {name!r} raised {type(e).__name__}: {e}", n, e)
            continue
        values = _as_list(output)
        if values is None or len(values) != n:
            got = f"{len(values)} values" if values is not None else type(output).__name__
            fail(f"reward function {name!r} must return a list of {n} values, got {got}", n)
            continue
        for i, value in enumerate(values):
            try:
                score = _to_float(value)
            except ValueError:
                fail(
                    f"reward function {name!r} returned {_short(value)} for sample {i} "
                    f"(prompt {_short(prompts[i])}); rewards must be finite numbers or None",
                    1,
                )
                continue
            if score is not None:
                per_function[i, j] = score

    weights = torch.tensor([float(w) for _, _, w in functions])
    total = torch.nansum(per_function * weights, dim=1)
    total[per_function.isnan().all(dim=1)] = float("nan")
    return RewardScores(per_function, total, [name for name, _, _ in functions], num_failed)
