"""Built-in reward functions for <answer>...</answer> completions (TRL reward-function shape)."""

from __future__ import annotations

import math
import re

from policyopt.data.loading import completion_text

from .language import language_reward, make_language_reward

OPEN, CLOSE = "<answer>", "</answer>"
_WHOLE_ANSWER = re.compile(r"<answer>(.*)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """Stripped content of the last <answer>...</answer> in text, or None if there is none."""
    end = text.rfind(CLOSE)
    if end == -1:
        return None
    start = text.rfind(OPEN, 0, end)
    if start == -1:
        return None
    return text[start + len(OPEN) : end].strip()


def _as_number(text: str) -> int | float | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(predicted: str, truth: str) -> bool:
    """Numeric equality when both parse as numbers ("19" == "19.0"), else stripped string equality."""
    a, b = _as_number(predicted), _as_number(truth)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == truth.strip()


def accuracy_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 if the last <answer> matches the row's answer, 0.0 if not, None if the row has no answer."""
    rewards: list[float | None] = []
    for completion, truth in zip(completions, answer, strict=True):
        if truth is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        rewards.append(1.0 if predicted is not None and answers_match(predicted, str(truth)) else 0.0)
    return rewards


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the completion is exactly one non-empty <answer>...</answer> and nothing else."""
    rewards = []
    for completion in completions:
        match = _WHOLE_ANSWER.fullmatch(completion_text(completion).strip())
        ok = (
            match is not None
            and match.group(1).strip() != ""
            and OPEN not in match.group(1)
            and CLOSE not in match.group(1)
        )
        rewards.append(1.0 if ok else 0.0)
    return rewards


def _code_reward(prompts, completions, tests, **kwargs):
    """Built-in ``code``: the fraction of the row's ``tests`` that the completion's Python passes, run in
    the sandbox (``policyopt.rewards.sandbox``; see ``parse_tests`` for the format)."""
    from .sandbox import code_reward  # imported on use: most runs never execute code

    return code_reward(prompts, completions, tests, **kwargs)


def _code_all_reward(prompts, completions, tests, **kwargs):
    """Built-in ``code_all``: 1.0 when the completion passes every one of the row's tests, else 0.0."""
    from .sandbox import code_reward

    return code_reward(prompts, completions, tests, all_pass=True, **kwargs)


class _BuiltinRewards(dict):
    """Built-in rewards by name, and the parametrised ones as ``name:argument`` (``language:fr``).

    A parametrised built-in is made on lookup by its factory, e.g. ``make_language_reward("fr")``.
    """

    factories = {"language": make_language_reward}

    def _split(self, spec) -> tuple | None:
        name, colon, argument = str(spec).partition(":")
        return (name, argument) if colon and argument and name in self.factories else None

    def __contains__(self, spec) -> bool:
        return dict.__contains__(self, spec) or self._split(spec) is not None

    def __missing__(self, spec):
        split = self._split(spec)
        if split is None:
            raise KeyError(spec)
        name, argument = split
        return self.factories[name](argument)


BUILTIN_REWARDS = _BuiltinRewards({"accuracy": accuracy_reward, "format": format_reward, "code": _code_reward,
                                   "code_all": _code_all_reward, "language": language_reward})
