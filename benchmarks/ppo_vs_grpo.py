"""PPO against GRPO at equal compute: `policyopt pipeline` over several seeds, held-out accuracy against
training time.

    python benchmarks/ppo_vs_grpo.py --seeds 0 1 2 --output-dir runs/ppo_vs_grpo [extra dotted overrides]

Each seed runs the real command (`policyopt pipeline`, its preset) in a fresh process into its own folder
(``<output-dir>/seed<S>``), with OMP_NUM_THREADS=1 so that every stage times one thread even when other
jobs share the machine. A seed whose folder holds a finished pipeline of the same seed and overrides is
read back, not rerun; an interrupted one is continued (``resume=auto``).

Training time is the pipeline's own (``accuracy_by_training_time`` in summary.json): the sum of a stage's
seconds per step, evaluations excluded. The figure (default ``benchmarks/results/ppo_vs_grpo.png``) draws
each run's accuracy as a step function of it (the last evaluation at or before t) in thin lines and the
mean over seeds in bold, up to the shortest of that algorithm's runs, so every seed is in every mean
point. The equal-time budget B is the smallest of the algorithms' mean training times; a run's accuracy
at B is its last evaluation at or before B (a run that finished before B keeps its final accuracy), and,
as a check on that rule, the linear interpolation between the evaluations around B.
Prints markdown tables (spread: min-max over seeds) and writes ``results.json`` next to the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from policyopt.recipes.pipeline import STAGE_COLORS, STAGE_LABELS, accuracy_at

ALGORITHMS = list(STAGE_LABELS)  # ppo, ppo_separate_critic, grpo
ARGS_FILE = "benchmark_args.json"  # what a finished seed was run with, so a reused run is the one asked for


def run_seed(root: Path, seed: int, overrides: list[str]) -> dict:
    """The pipeline's summary for ``seed``: read back when finished with the same overrides, else run."""
    out = root / f"seed{seed}"
    wanted = {"seed": seed, "overrides": overrides}
    if (out / "summary.json").exists():
        saved = json.loads((out / ARGS_FILE).read_text()) if (out / ARGS_FILE).exists() else None
        if saved != wanted:
            raise SystemExit(f"{out} holds a pipeline run with {saved or 'unknown arguments'}, not {wanted}: "
                             "delete it or choose another --output-dir")
        print(f"seed {seed}: reusing {out}", flush=True)
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "policyopt.cli", "pipeline", "--output-dir", str(out), f"seed={seed}", *overrides]
    if out.exists():
        cmd.append("resume=auto")  # an interrupted run: finished stages are kept, the stopped one continues
    print(f"seed {seed}: {' '.join(cmd[1:])} (log: {out}.log)", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    (out / ARGS_FILE).write_text(json.dumps(wanted))
    return json.loads((out / "summary.json").read_text())


def spread(values: list[float], digits: int) -> str:
    """``mean (min-max)`` of ``values``."""
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def interpolated(points: list[list[float]], seconds: float) -> float:
    """Accuracy at ``seconds`` linearly interpolated between the evaluations around it (the final one after
    the end): the check on how much the step rule's choice of an earlier evaluation moves a number."""
    import numpy as np

    return float(np.interp(seconds, [t for t, _ in points], [v for _, v in points]))


def analyse(summaries: dict[int, dict]) -> dict:
    """Per algorithm: each seed's final accuracy, accuracy at the budget, training seconds, seconds per step."""
    names = [n for n in ALGORITHMS if all(n in s for s in summaries.values())]
    budget_name = min(names, key=lambda n: statistics.mean(s[n]["training_seconds"] for s in summaries.values()))
    budget = statistics.mean(s[budget_name]["training_seconds"] for s in summaries.values())
    report = {"budget_seconds": budget, "budget_algorithm": budget_name, "seeds": list(summaries), "algorithms": {}}
    for name in names:
        runs = [s[name] for s in summaries.values()]
        report["algorithms"][name] = {
            "accuracy_start": [r["accuracy_before"] for r in runs],
            "accuracy_final": [r["accuracy_after"] for r in runs],
            "accuracy_at_budget": [accuracy_at(r["accuracy_by_training_time"], budget)[1] for r in runs],
            "accuracy_at_budget_interpolated": [interpolated(r["accuracy_by_training_time"], budget) for r in runs],
            "training_seconds": [r["training_seconds"] for r in runs],
            "seconds_per_step_median": [r["seconds_per_step_median"] for r in runs],
            "points": [r["accuracy_by_training_time"] for r in runs],
        }
    return report


def table(report: dict) -> str:
    """The markdown tables: per algorithm over seeds, then per seed."""
    budget, algorithms = report["budget_seconds"], report["algorithms"]
    lines = [f"| algorithm | final accuracy | accuracy at {budget:.1f} s of training | same, linearly interpolated "
             "| training seconds | seconds per step (median) |", "|---|---:|---:|---:|---:|---:|"]
    for name, a in algorithms.items():
        lines.append(f"| {STAGE_LABELS[name]} | {spread(a['accuracy_final'], 3)} "
                     f"| {spread(a['accuracy_at_budget'], 3)} | {spread(a['accuracy_at_budget_interpolated'], 3)} "
                     f"| {spread(a['training_seconds'], 0)} "
                     f"| {spread(a['seconds_per_step_median'], 3)} |")
    lines += ["", "| seed | SFT start | " + " | ".join(f"{STAGE_LABELS[n]}: final / at {budget:.1f} s"
                                                   for n in algorithms) + " |",
              "|---|---:|" + "---:|" * len(algorithms)]
    first = next(iter(algorithms.values()))
    for i, seed in enumerate(report["seeds"]):
        cells = [f"{a['accuracy_final'][i]:.3f} / {a['accuracy_at_budget'][i]:.3f}" for a in algorithms.values()]
        lines.append(f"| {seed} | {first['accuracy_start'][i]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Accuracy against training seconds: thin step lines per seed, the bold mean over seeds, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, a in report["algorithms"].items():
        color = STAGE_COLORS[name]
        for points in a["points"]:
            ax.plot([t for t, _ in points], [v for _, v in points], drawstyle="steps-post", color=color,
                    linewidth=0.8, alpha=0.45)
        grid = np.linspace(0.0, min(a["training_seconds"]), 600)  # every seed has run this long
        mean = [statistics.mean(accuracy_at(points, t)[1] for points in a["points"]) for t in grid]
        ax.plot(grid, mean, color=color, linewidth=2.5,
                label=f"{STAGE_LABELS[name]}: mean over {len(a['points'])} seed(s)")
    ax.axvline(report["budget_seconds"], linestyle=":", color="black",
               label=f"equal-time budget {report['budget_seconds']:.1f} s")
    ax.set_xlabel("training seconds (sum of seconds per step; evaluations excluded)")
    ax.set_ylabel("held-out exact-answer accuracy (greedy)")
    ax.set_title(f"policyopt pipeline, seeds {', '.join(map(str, report['seeds']))}: thin = one seed "
                 "(last evaluation at or before t), bold = mean", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="runs/ppo_vs_grpo")
    parser.add_argument("--figure", default="benchmarks/results/ppo_vs_grpo.png")
    parser.add_argument("overrides", nargs="*", help="dotted pipeline overrides, e.g. ppo.steps=50 grpo.steps=50")
    args = parser.parse_args()
    root = Path(args.output_dir)
    summaries = {seed: run_seed(root, seed, args.overrides) for seed in args.seeds}
    report = analyse(summaries)
    plot(report, Path(args.figure))
    (root / "results.json").write_text(json.dumps({**report, "overrides": args.overrides}, indent=2))
    print(table(report))
    print(f"\nfigure: {args.figure}; numbers: {root / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
