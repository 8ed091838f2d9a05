"""PNG plots of a run: training reward and held-out accuracy against the step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_metrics  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(metrics_path: str | Path, png_path: str | Path, title: str = "",
             train_key: str = "reward/mean", eval_key: str = "eval/accuracy",
             reference_lines: dict[str, float] | None = None) -> Path:
    """Two panels: ``train_key`` per step, and ``eval_key`` at each evaluation, with optional
    horizontal reference lines (e.g. a control run's final accuracy)."""
    records = read_metrics(metrics_path)
    if not any(r.get(eval_key) is not None for r in records):
        eval_key = "eval/reward"  # runs without the accuracy reward: plot their mean held-out reward
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, values = _series(records, train_key)
    ax_train.plot(steps, values, color="tab:blue")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel(train_key)
    ax_train.set_title("training reward (sampled answers)")
    ax_train.grid(alpha=0.3)
    steps, values = _series(records, eval_key)
    ax_eval.plot(steps, values, marker="o", color="tab:green")
    for (label, value), style in zip((reference_lines or {}).items(), ("--", ":", "-.")):
        if value is not None:
            ax_eval.axhline(value, linestyle=style, color="gray", label=f"{label}: {value:.3f}")
    if reference_lines:
        ax_eval.legend(loc="lower right", fontsize=8)
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel(eval_key)
    ax_eval.set_title(f"held-out {eval_key.split('/')[-1]} (greedy)")
    ax_eval.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
