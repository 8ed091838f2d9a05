"""Where a recipe's prompts come from: the built-in arithmetic task or a user's dataset file.

Both give a fixed held-out evaluation set and a stream of training batches whose position is a
small state dict, so a run can be resumed exactly.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Literal

from .arithmetic import ArithmeticTask, make_demonstrations, make_rows
from .loading import DataError, load_rows

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003  # the held-out set depends on the run seed but never meets training prompts
DEMO_SEED_OFFSET = 2_000_003


@dataclass
class DataConfig:
    path: str | None = None  # JSONL / JSON / parquet / saved HF dataset; null: the built-in arithmetic task
    eval_path: str | None = None  # held-out rows; null: hold out eval_size rows of `path`
    prompt_column: str = "prompt"  # the dataset column holding each prompt
    completion_column: str = "completion"  # SFT only
    task: ArithmeticTask = field(default_factory=ArithmeticTask)
    eval_size: int = 200  # held-out rows (of `path`, at most a fifth of it, or of the built-in task)
    max_prompt_tokens: int = 256  # longest prompt in tokens; see long_prompts for longer ones
    # prompts over max_prompt_tokens: truncate (keep the end), skip, or error
    long_prompts: Literal["truncate", "skip", "error"] = "truncate"
    num_demonstrations: int = 300  # SFT on the built-in task: how many worked examples (a file: data.max_rows)
    max_rows: int = 0  # use only the first N rows of `path` (0: all), before held-out rows are split off

    def validate(self) -> None:
        self.task.validate()
        if self.eval_size < 0:
            raise ValueError(f"data.eval_size must be >= 0, got {self.eval_size}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.num_demonstrations < 1:
            raise ValueError(f"data.num_demonstrations must be >= 1, got {self.num_demonstrations}")
        if self.max_rows < 0:
            raise ValueError(f"data.max_rows must be >= 0 (0: every row), got {self.max_rows}")


class ShuffledOrder:
    """Endless passes over ``n`` items, each pass in a fresh order, all drawn from one ``Random(seed)``.

    Batches run across pass boundaries. The position and the generator's state are a small state
    dict, so a resumed run draws exactly the batches the uninterrupted one would have.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("nothing to draw from: the data set is empty")
        self.n = n
        self._rng = random.Random(seed)
        self._pending: list[int] = []  # the rest of the current pass

    def take(self, k: int) -> list[int]:
        while len(self._pending) < k:
            order = list(range(self.n))
            self._rng.shuffle(order)
            self._pending += order
        out, self._pending = self._pending[:k], self._pending[k:]
        return out

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "pending": list(self._pending)}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(state["rng"])
        self._pending = list(state["pending"])


class PromptSource:
    """Held-out rows plus an endless, seeded stream of training rows."""

    def __init__(self, config: DataConfig, seed: int, require_column: str | None = None):
        self.config = config
        self.seed = seed
        self.builtin = config.path is None
        if self.builtin:
            self.eval_rows = make_rows(config.eval_size, config.task, seed=seed + EVAL_SEED_OFFSET)
            self.train_rows: list[dict] = []
            self.eval_origin = f"{len(self.eval_rows)} built-in problems (data.eval_size), never trained on"
        else:
            rows = load_rows(config.path, config.prompt_column)
            if config.max_rows:
                rows = rows[:config.max_rows]
            if require_column is not None:
                _require(rows, require_column, config.path)
            if config.eval_path is not None:
                self.eval_rows = load_rows(config.eval_path, config.prompt_column)
                self.train_rows = rows
                self.eval_origin = f"the {len(self.eval_rows)} rows of data.eval_path={config.eval_path}"
            else:
                order = list(range(len(rows)))
                random.Random(seed + EVAL_SEED_OFFSET).shuffle(order)
                held = min(config.eval_size, len(rows) // 5)
                self.eval_rows = [rows[i] for i in order[:held]]
                self.train_rows = [rows[i] for i in order[held:]]
                self.eval_origin = (f"{held} rows held out of data.path={config.path} (min(data.eval_size="
                                    f"{config.eval_size}, a fifth of its {len(rows)} rows); data.eval_path=FILE "
                                    "evaluates on a file instead")
        log.info("held-out rows: %s%s", self.eval_origin, "" if self.eval_rows else "; none, so nothing is evaluated")
        self._eval_prompts = {str(r["prompt"]) for r in self.eval_rows}
        self.batches_drawn = 0  # built-in: each batch's problems come from a seed of (seed, batch)
        self.prompts_drawn = 0  # position of the next prompt in the run's stream (keys its sampling noise)
        self._order: ShuffledOrder | None = None  # files: passes over the training rows

    def next_batch(self, n: int) -> list[dict]:
        self.prompts_drawn += n
        if self.builtin:
            # fresh problems each step, from a seed that depends only on (seed, step): resumable
            rows = make_rows(n, self.config.task, seed=self.seed * 1_000_033 + self.batches_drawn,
                             exclude=self._eval_prompts)
            self.batches_drawn += 1
            return rows
        if self._order is None:
            self._order = ShuffledOrder(len(self.train_rows), self.seed)
        return [self.train_rows[i] for i in self._order.take(n)]

    def drop_long_prompts(self, tokenizer) -> int:
        """Apply ``data.long_prompts`` to the training rows; return how many were skipped."""
        self.train_rows, skipped = filter_long_prompts(self.train_rows, tokenizer, self.config)
        if not self.builtin and not self.train_rows:
            raise DataError(f"{self.config.path}: every training row is longer than data.max_prompt_tokens="
                            f"{self.config.max_prompt_tokens}")
        return skipped

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn, "prompts_drawn": self.prompts_drawn,
                "order": self._order.state_dict() if self._order is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn, self._order = state["batches_drawn"], None
        self.prompts_drawn = state.get("prompts_drawn", 0)
        if state["order"] is not None:
            self._order = ShuffledOrder(len(self.train_rows), self.seed)
            self._order.load_state_dict(state["order"])


def demonstration_rows(config: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(training demonstrations, held-out rows) for SFT: the built-in task or a file with completions."""
    if config.path is None:
        eval_rows = make_rows(config.eval_size, config.task, seed=seed + EVAL_SEED_OFFSET)
        demos = make_demonstrations(config.num_demonstrations, config.task, seed=seed + DEMO_SEED_OFFSET,
                                    exclude={r["prompt"] for r in eval_rows})
        return demos, eval_rows
    source = PromptSource(config, seed, require_column=config.completion_column)
    return source.train_rows, source.eval_rows


def _require(rows: list[dict], column: str, path: str) -> None:
    for i, row in enumerate(rows):
        value = row.get(column)
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = value[-1].get("content")
        if not isinstance(value, str) or not value:
            raise DataError(f"{path}: row {i + 1} has no usable {column!r} column (got {row.get(column)!r})")


def filter_long_prompts(rows: list[dict], tokenizer, config: DataConfig) -> tuple[list[dict], int]:
    """Keep rows whose prompt fits ``max_prompt_tokens`` (skip), or name the first that does not (error).
    With ``truncate`` every row is kept and the prompt is cut when it is encoded."""
    if config.long_prompts == "truncate" or not rows:
        return rows, 0
    from .batching import prompt_length  # tokenizer-dependent; imported here to keep this module light

    kept = []
    for i, row in enumerate(rows):
        length = prompt_length(tokenizer, row["prompt"])
        if length <= config.max_prompt_tokens:
            kept.append(row)
        elif config.long_prompts == "error":
            where = config.path or "built-in task"
            raise DataError(f"{where}: row {row.get('_row', i + 1)} has a {length}-token prompt, over "
                            f"data.max_prompt_tokens={config.max_prompt_tokens} (set data.long_prompts=truncate "
                            "or skip)")
    return kept, len(rows) - len(kept)
