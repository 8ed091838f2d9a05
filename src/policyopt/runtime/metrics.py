"""Metrics: one JSON line per step in ``metrics.jsonl`` plus TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads as null
    return value


class MetricsLogger:
    """Append-only metrics log. Each record is flushed at once, so a crash loses nothing written."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, filename: str = "metrics.jsonl",
                 purge_step: int | None = None):
        self.path = Path(output_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run wrote after the checkpoint it resumes from
                self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard is a dependency, but never let logging kill a run
                self._writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_by_training_time(records: list[dict]) -> list[tuple[float, float]]:
    """(training seconds, held-out accuracy) at each evaluation in a recipe's metrics records, in order.

    t_k = sum of ``seconds_per_step`` over the records up to and including the k-th evaluation's: a step's
    evaluation runs after its training and is not timed in it, so evaluation cost never counts. The
    evaluation before training (step 0, the SFT start) sits at t = 0.
    """
    seconds, points = 0.0, []
    for record in records:
        seconds += record.get("seconds_per_step", 0.0)
        if record.get("eval/accuracy") is not None:
            points.append((seconds, record["eval/accuracy"]))
    return points
