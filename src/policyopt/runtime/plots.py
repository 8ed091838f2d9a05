"""PNG plots of a run: training reward, held-out accuracy (and pass@k) and, when logged, the update's
entropy and clipping, against the step."""

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
    """Two panels: ``train_key`` per step, and ``eval_key`` at each evaluation (with ``eval/pass@*`` beside
    it when logged), with optional horizontal reference lines (e.g. a control run's final accuracy); a
    third panel shows the entropy and the clip fractions when the run logs them, so variants compare."""
    records = read_metrics(metrics_path)
    if not any(r.get(eval_key) is not None for r in records):
        eval_key = "eval/reward"  # runs without the accuracy reward: plot their mean held-out reward
    diagnostics = [k for k in ("entropy", "clip_fraction_low", "clip_fraction_high")
                   if any(r.get(k) is not None for r in records)]
    fig, (ax_train, ax_eval, *ax_update) = plt.subplots(1, 3 if diagnostics else 2,
                                                        figsize=(15 if diagnostics else 10, 3.8))
    steps, values = _series(records, train_key)
    ax_train.plot(steps, values, color="tab:blue")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel(train_key)
    ax_train.set_title("training reward (sampled answers)")
    ax_train.grid(alpha=0.3)
    steps, values = _series(records, eval_key)
    ax_eval.plot(steps, values, marker="o", color="tab:green", label=eval_key)
    pass_keys = sorted({k for r in records for k in r if k.startswith("eval/pass@")})
    for key, color in zip(pass_keys, ("tab:purple", "tab:olive", "tab:brown")):
        ax_eval.plot(*_series(records, key), marker=".", color=color, label=key)
    for (label, value), style in zip((reference_lines or {}).items(), ("--", ":", "-.")):
        if value is not None:
            ax_eval.axhline(value, linestyle=style, color="gray", label=f"{label}: {value:.3f}")
    if reference_lines or pass_keys:
        ax_eval.legend(loc="lower right", fontsize=8)
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel(eval_key)
    ax_eval.set_title(f"held-out {eval_key.split('/')[-1]} (greedy" + ("; pass@k sampled)" if pass_keys else ")"))
    ax_eval.grid(alpha=0.3)
    if diagnostics:
        _plot_diagnostics(ax_update[0], records, diagnostics)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _plot_diagnostics(ax, records: list[dict], keys: list[str]) -> None:
    """Entropy on the left axis, the clip fractions (below 1 - eps_low, above 1 + eps_high) on the right."""
    ax.set_xlabel("step")
    ax.set_title("update: entropy and clipping")
    ax.grid(alpha=0.3)
    if "entropy" in keys:
        ax.plot(*_series(records, "entropy"), color="tab:red", label="entropy")
        ax.set_ylabel("entropy (nats per token)")
    clip_keys = [k for k in keys if k != "entropy"]
    if clip_keys:
        right = ax.twinx()
        for key, style in zip(clip_keys, ("--", ":")):
            right.plot(*_series(records, key), linestyle=style, color="tab:gray", label=key)
        right.set_ylabel("clip fraction")
        right.legend(loc="upper right", fontsize=8)
    if "entropy" in keys:
        ax.legend(loc="upper left", fontsize=8)


def plot_timeline(curves: dict[str, tuple[list[float], list[float]]], png_path: str | Path,
                  dashed: dict[str, tuple[list[float], list[float]]] | None = None, branch_at: float | None = None,
                  title: str = "", xlabel: str = "training seconds", ylabel: str = "held-out accuracy") -> Path:
    """Several runs' held-out accuracy on one time axis (the demo: SFT, then GRPO and the control from
    its checkpoint); ``dashed``: sparser series (e.g. a harder set scored at the start and the end);
    ``branch_at``: a vertical line where the branches start."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = iter(("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"))
    by_label = {}
    for label, (xs, ys) in curves.items():
        by_label[label] = next(colors)
        ax.plot(xs, ys, marker="o", markersize=3, color=by_label[label], label=label)
    for label, (xs, ys) in (dashed or {}).items():
        color = next((c for name, c in by_label.items() if label.startswith(name)), "tab:gray")
        ax.plot(xs, ys, linestyle="--", marker="s", markersize=4, color=color, label=label)
    if branch_at is not None:
        ax.axvline(branch_at, color="gray", linestyle=":", label="branch: best SFT round")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
