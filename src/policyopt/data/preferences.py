"""Preference data for reward models: pairs and rankings read from files, grouped per prompt.

The labeller that makes preference data for the built-in arithmetic task (it samples answers from a
policy and ranks them with the accuracy reward) is ``policyopt.rollout.preferences.builtin_preferences``;
its settings, :class:`BuiltinPreferenceConfig`, live here with the data they describe. This module
imports nothing of policyopt outside ``data/``.

Two row shapes are accepted (JSONL, JSON, parquet or a saved HF dataset, via ``load_rows``):

    pair:     {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 0.5}     (margin optional)
    ranking:  {"prompt": ..., "answers": [best, ..., worst]}                       (K >= 2 answers)

Prompts are text or chat messages; answers are text or chat messages (the last message's content).
Rows are gathered per prompt into a :class:`PreferenceGroup`: the prompt's distinct answers plus the
pairs (better, worse, margin) between them. A ranking of K answers gives all K(K-1)/2 pairs. The
reward-model loss is averaged over each group's pairs first, then over groups, so a prompt with
many answers weighs as much as a prompt with one pair.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from .loading import DataError, completion_text, load_rows, role_problem

log = logging.getLogger(__name__)


@dataclass
class PreferenceGroup:
    """One prompt, its distinct answers, and which answer beats which."""

    prompt: str | list[dict]
    answers: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (better, worse, margin) into answers
    kinds: list[str] = field(default_factory=list)  # optional label per pair (built-in data: what it contrasts)

    def answer_index(self, text: str) -> int:
        try:
            return self.answers.index(text)
        except ValueError:
            self.answers.append(text)
            return len(self.answers) - 1

    def add_pair(self, better: str, worse: str, margin: float = 0.0, kind: str = "") -> None:
        self.pairs.append((self.answer_index(better), self.answer_index(worse), float(margin)))
        self.kinds.append(kind)

    def to_row(self) -> dict:
        """One JSONL row per prompt: its answers and the (better, worse, margin) pairs between them."""
        return {"prompt": self.prompt, "answers": self.answers,
                "pairs": [list(p) for p in self.pairs], "kinds": self.kinds}


@dataclass
class PreferenceColumns:
    """Where each part of a preference row lives."""

    prompt: str = "prompt"  # column holding the prompt (text or chat messages)
    chosen: str = "chosen"  # column holding the preferred answer of a pair
    rejected: str = "rejected"  # column holding the other answer of a pair
    margin: str = "margin"  # optional column: how much better chosen is (Llama 2 margin)
    ranking: str = "answers"  # best to worst


def _answer(value, where: str, column: str) -> str:
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for j, message in enumerate(value):
            problem = role_problem(message.get("role")) if isinstance(message.get("role"), str) else "has no role"
            if problem:
                raise DataError(f"{where}: {column!r} message {j} {problem}")
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
        text = completion_text(value)
        if text:
            return text
    raise DataError(f"{where}: {column!r} must be a non-empty string or chat messages, got {value!r:.80}")


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def groups_from_rows(rows: list[dict], columns: PreferenceColumns | None = None, source: str = "rows"
                     ) -> list[PreferenceGroup]:
    """Gather pair and ranking rows into one group per distinct prompt (in first-seen order)."""
    columns = columns or PreferenceColumns()
    groups: dict[str, PreferenceGroup] = {}
    skipped = 0
    for i, row in enumerate(rows):
        where = f"{source}: row {i + 1}"
        # a table holding both shapes (parquet, HF datasets) has every column, null where unused
        row = {k: v for k, v in row.items() if v is not None}
        group = groups.setdefault(_key(row["prompt"]), PreferenceGroup(row["prompt"]))
        if "pairs" in row and "answers" in row and columns.ranking == "answers":
            # the shape this module writes: answers plus explicit (better, worse, margin) pairs
            answers = [_answer(a, where, "answers") for a in row["answers"]]
            kinds = row.get("kinds") or [""] * len(row["pairs"])
            for (better, worse, margin), kind in zip(row["pairs"], kinds):
                group.add_pair(answers[int(better)], answers[int(worse)], float(margin), kind)
        elif columns.chosen in row or columns.rejected in row:
            if columns.chosen not in row or columns.rejected not in row:
                raise DataError(f"{where}: a pair needs both {columns.chosen!r} and {columns.rejected!r}")
            chosen = _answer(row[columns.chosen], where, columns.chosen)
            rejected = _answer(row[columns.rejected], where, columns.rejected)
            margin = row.get(columns.margin)
            if margin is not None and not isinstance(margin, (int, float)):
                raise DataError(f"{where}: {columns.margin!r} must be a number, got {margin!r}")
            if chosen == rejected:
                skipped += 1
                continue
            group.add_pair(chosen, rejected, float(margin or 0.0))
        elif columns.ranking in row:
            ranking = row[columns.ranking]
            if not isinstance(ranking, list) or len(ranking) < 2:
                raise DataError(f"{where}: {columns.ranking!r} must list at least 2 answers, best first")
            answers = [_answer(a, where, columns.ranking) for a in ranking]
            if len(set(answers)) != len(answers):
                raise DataError(f"{where}: {columns.ranking!r} holds the same answer twice")
            for a in range(len(answers)):
                for b in range(a + 1, len(answers)):
                    group.add_pair(answers[a], answers[b])
        else:
            raise DataError(f"{where}: expected {columns.chosen!r}/{columns.rejected!r} (a pair) or "
                            f"{columns.ranking!r} (a ranking, best first); columns are {sorted(row)}")
    if skipped:
        log.warning("%s: skipped %d pairs whose chosen and rejected answers are identical", source, skipped)
    result = [g for g in groups.values() if g.pairs]
    if not result:
        raise DataError(f"{source} holds no usable preference pairs")
    return result


def load_preference_groups(path: str, columns: PreferenceColumns | None = None) -> list[PreferenceGroup]:
    """Read a preference dataset (JSONL / JSON / parquet / saved HF dataset) into groups."""
    columns = columns or PreferenceColumns()
    return groups_from_rows(load_rows(path, columns.prompt), columns, source=str(path))


def split_groups(groups: list[PreferenceGroup], eval_size: int, seed: int
                 ) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(train, held-out): hold out ``eval_size`` prompts (at most a fifth), never splitting a prompt's pairs."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    held = min(eval_size, len(groups) // 5)
    return [groups[i] for i in order[held:]], [groups[i] for i in order[:held]]


def write_groups(groups: list[PreferenceGroup], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # a run's directory is made when it starts; this may come first
    with Path(path).open("w") as f:
        f.writelines(json.dumps(g.to_row(), ensure_ascii=False) + "\n" for g in groups)


def count_pairs(groups: list[PreferenceGroup]) -> int:
    return sum(len(g.pairs) for g in groups)


# ------------------------------------------------------------------ the built-in task's labeller's settings


@dataclass
class BuiltinPreferenceConfig:
    """Preference data for the built-in arithmetic task, labelled by rule (no human, no download).

    For each prompt: K answers sampled from ``policy`` (an SFT checkpoint; null: none), plus the right
    answer, a longer right answer (``<answer> 19 </answer>``: still exactly right, so telling it from a
    wrong one takes the same arithmetic), and ``num_corrupted`` wrong variants of the right answer. The
    labeller prefers a correct answer to a wrong one, and a shorter correct answer to a longer one;
    two wrong answers, or two correct ones of equal length, are not compared. Each training pair is
    flipped with probability ``label_noise``; held-out pairs are never flipped.
    """

    policy: str | None = None  # a causal LM directory to sample answers from
    num_prompts: int = 1500  # training prompts
    eval_prompts: int = 200  # held-out prompts (noise-free)
    answers_per_prompt: int = 8  # K, sampled from the policy
    num_corrupted: int = 2  # wrong variants of the right answer per prompt
    include_long_correct: bool = True  # the right answer with padding inside the tags: correct but longer
    temperature: float = 1.0  # sampling temperature of the policy's answers
    max_new_tokens: int = 16  # the policy's answers are cut at this many tokens
    label_noise: float = 0.0  # probability that a training pair is flipped (held-out pairs never are)

    def validate(self) -> None:
        if self.num_prompts < 1 or self.eval_prompts < 0:
            raise ValueError("preferences.num_prompts must be >= 1 and eval_prompts >= 0")
        if self.answers_per_prompt < 0 or self.num_corrupted < 0:
            raise ValueError("answers_per_prompt and num_corrupted must be >= 0")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError("max_new_tokens must be >= 1 and temperature > 0")
