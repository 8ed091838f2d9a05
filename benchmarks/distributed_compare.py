"""One seed, 1 process against N processes (torchrun, gloo on a CPU): the demo's GRPO stage from one SFT start.

    python benchmarks/distributed_compare.py --steps 30 --ranks 2 --out /tmp/dist_compare

Runs the demo's SFT stage once, then the demo's GRPO stage (64 prompts x 8 answers, temperature 0.7)
for --steps steps from that checkpoint, once in one process and once under torchrun with --ranks
processes, and prints the first step's loss, reward and grad norm for both, their relative gaps, the
held-out accuracy at the end, and seconds per step. The per-answer noise streams make both runs sample
the same answers while their weights agree to float rounding; a token flipped by rounding can later
make them drift apart, as two seeds would, but never systematically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["data.task.steps=3", "data.task.min_digits=1", "data.task.max_digits=1", "data.eval_size=200"]


def run(args: list[str], ranks: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(ranks)]
    started = time.perf_counter()
    subprocess.run([*launcher, "-m", "policyopt", *args], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def steps_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dist_compare"))
    args = parser.parse_args()
    sft = args.out / "sft"
    if not (sft / "final").exists():
        run(["sft", f"output_dir={sft}", f"seed={args.seed}", "steps=200", "batch_size=32", "eval_every=0",
             "optim.lr=2e-3", "optim.warmup_steps=10", "data.num_demonstrations=300", *DEMO], ranks=1)
    results = {}
    for ranks in (1, args.ranks):
        out = args.out / f"grpo_{ranks}"
        grpo = ["grpo", f"output_dir={out}", f"seed={args.seed}", f"steps={args.steps}", "prompts_per_step=64",
                "group_size=8", f"eval_every={args.steps}", "optim.lr=1e-3", "optim.warmup_steps=10",
                "sampling.temperature=0.7", "sampling.max_new_tokens=12", f"model.name_or_path={sft / 'final'}",
                "tensorboard=false", f"distributed.world_size={ranks}", *DEMO]
        wall = run(grpo, ranks)
        summary = json.loads((out / "summary.json").read_text())
        records = steps_of(out)
        results[ranks] = {"first": {k: records[0][k] for k in ("loss", "reward/mean", "grad_norm")},
                          "last5_reward": sum(r["reward/mean"] for r in records[-5:]) / 5,
                          "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
                          "seconds_per_step": sorted(r["seconds_per_step"] for r in records)[len(records) // 2],
                          "wall_seconds": wall}
    one, many = results[1], results[args.ranks]
    gaps = {k: abs(one["first"][k] - many["first"][k]) / max(abs(one["first"][k]), 1e-3) for k in one["first"]}
    print(json.dumps({"results": results, "first_step_relative_gap": gaps}, indent=2))


if __name__ == "__main__":
    main()
