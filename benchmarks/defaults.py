"""Which sampling and optimisation defaults make GRPO learn: SFT warm start, then GRPO, on several tasks.

Every run is the real command line, as a new user runs it from the README's "your own data" section:

    policyopt sft  --output-dir D/sft  data.path=demos.jsonl data.eval_path=eval.jsonl rewards=my_rewards.py:correct
    policyopt grpo --output-dir D/grpo model.name_or_path=D/sft/final data.path=prompts.jsonl \
        data.eval_path=eval.jsonl rewards=my_rewards.py:correct [the variant's overrides]

Tasks: the built-in arithmetic at two difficulties (its own data and rewards, no files), and small verifiable
tasks from reasoning-gym (``pip install -e .[bench]``), which generates its problems procedurally and ships
its scorers and word lists, so nothing is downloaded. For those, this script writes what a user would: JSONL
files of prompts, completions and answers, and a reward file whose ``correct`` is 1 when reasoning-gym's own
scorer gives full marks, else 0.

Each task has one SFT warm start (deliberately short: a partial start) shared by all its GRPO variants, so
the variants differ only in their GRPO settings. Held-out accuracy is greedy, on the eval file (or the
built-in task's held-out problems), before and after GRPO.

    python benchmarks/defaults.py --output-dir runs/defaults                        # every task, the 2x2 of T and lr
    python benchmarks/defaults.py --tasks count_bits --variants t07_s200 defaults    # a subset

Results, and which defaults they changed: benchmarks/README.md, "Sampling and optimisation defaults".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (what it is, the GRPO overrides). "old" spells out the defaults before this benchmark (temperature
# 1.0; now 0.7, lr unchanged); "defaults" adds nothing, so it runs whatever the code's defaults are now.
VARIANTS = {
    "old": ("T=1.0, lr=5e-4, G=8 (the defaults before)", ["sampling.temperature=1.0", "optim.lr=5e-4", "group_size=8"]),
    "t07": ("T=0.7, lr=5e-4, G=8", ["sampling.temperature=0.7", "optim.lr=5e-4", "group_size=8"]),
    "t07_lr1e3": ("T=0.7, lr=1e-3, G=8", ["sampling.temperature=0.7", "optim.lr=1e-3", "group_size=8"]),
    "t07_lr2e4": ("T=0.7, lr=2e-4, G=8", ["sampling.temperature=0.7", "optim.lr=2e-4", "group_size=8"]),
    "t07_g16": ("T=0.7, lr=5e-4, G=16", ["sampling.temperature=0.7", "optim.lr=5e-4", "group_size=16"]),
    "t10_lr1e3": ("T=1.0, lr=1e-3, G=8", ["sampling.temperature=1.0", "optim.lr=1e-3", "group_size=8"]),
    "t07_s200": ("T=0.7, lr=5e-4, G=8, 200 steps", ["sampling.temperature=0.7", "optim.lr=5e-4", "group_size=8",
                                                    "steps=200"]),
    "t10_s200": ("T=1.0, lr=5e-4, G=8, 200 steps", ["sampling.temperature=1.0", "optim.lr=5e-4", "group_size=8",
                                                    "steps=200"]),
    "defaults": ("the code's current defaults, nothing set", []),
    "s200": ("the current defaults, 200 steps", ["steps=200"]),
    "s200_lr1e3": ("the current defaults, 200 steps, lr=1e-3", ["steps=200", "optim.lr=1e-3"]),
    "b004": ("the current defaults, beta=0.04 (K3 KL to the SFT start)", ["beta=0.04"]),
    "b0": ("the current defaults, beta=0 (the default before the third round)", ["beta=0"]),
}

# Built-in arithmetic: (what, data.task.* for both stages, SFT steps, SFT-only overrides). The SFT warm start
# is kept short on purpose: a partial start. (arith_hard with SFT's defaults, 300 steps on 300
# demonstrations, started at 2.0% held-out: below the ~5% where GRPO has almost no successes to learn from.)
BUILTIN_TASKS = {
    "arith_easy": ("sums of four 1-digit numbers (the demo's task)",
                   ["data.task.max_digits=1", "data.task.operators=+", "data.task.steps=3"], 300, []),
    "arith_hard": ("2-digit a+b or a-b",
                   ["data.task.min_digits=2", "data.task.max_digits=2", "data.task.operators=+-", "data.task.steps=1"],
                   1000, ["data.num_demonstrations=2000"]),
}
# reasoning-gym: (what, dataset name, its config, SFT steps)
# (spell_backward with 3-5 letter words was tried: 300 SFT steps left this tiny model at 0.5% held-out, and
# letter_counting in 1-3 words started at 77.5%; neither is a partial start. count_bits below 1000 has only 999
# distinct problems, too few for disjoint demonstrations, prompts and held-out rows.)
GYM_TASKS = {
    "letter_counting": ("count a letter in 3-6 words", "letter_counting", {"min_words": 3, "max_words": 6}, 300),
    "count_bits": ("count the 1 bits of a number below 10000", "count_bits", {"min_n": 1, "max_n": 9999}, 300),
    "word_reversal": ("reverse a list of 3-4 words", "word_sequence_reversal", {"min_words": 3, "max_words": 4}, 300),
    "chain_sum": ("2-3 terms of 1-2 digits, + and -", "chain_sum",
                  {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, 300),
    "leg_counting": ("the legs of 2 kinds of animal, 1-3 of each", "leg_counting",
                     {"min_animals": 2, "max_animals": 2, "max_instances": 3}, 300),
}
# The model SFT builds on the data when none is given (model.tiny.*): "default" is the code's default shape
MODELS = {
    "default": [],
    "h128": ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=512"],
    "h128l4": ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=512", "model.tiny.num_layers=4"],
}
NUM_DEMOS, NUM_PROMPTS, NUM_EVAL = 1000, 2000, 200
# The built-in arithmetic as a user's files (plain-answer completions, an exact-match reward file): the README's
# "your own data" commands on the demo's task. (what, ArithmeticTask fields, SFT steps, demonstrations)
FILE_ARITH_TASKS = {
    "arith_easy_files": ("arith_easy as JSONL files and a file.py:fn reward", {"max_digits": 1, "operators": "+",
                                                                              "steps": 3}, 300, 300),
}

# Digit-string tasks of our own, the kind a user brings (none of their text is in the built-in task), e.g.
# "Sort the digits of 50391 from smallest to largest." -> "01359". (what, kind, digits per string, SFT steps)
# (digit_sort with 300 SFT steps, SFT's default, already gives 98% on 6 digits: not a partial start.)
# digit_reverse and digit_sum were added after the defaults were chosen, as tasks they were not tuned on.
DIGIT_TASKS = {"digit_sort": ("sort the digits of a 6-digit string", "sort", 6, 300),
               "digit_sort_short_sft": ("sort the digits of a 6-digit string, SFT 120 steps", "sort", 6, 120),
               "digit_reverse": ("reverse a 5-digit string, SFT 300 steps", "reverse", 5, 300),
               "digit_reverse_short_sft": ("reverse a 5-digit string, SFT 260 steps", "reverse", 5, 260),
               "digit_sum": ("the sum of a 5-digit string's digits, SFT 300 steps", "sum", 5, 300)}
DIGIT_KINDS = {  # kind -> (prompt, answer) of a digit string
    "sort": lambda d: (f"Sort the digits of {d} from smallest to largest.", "".join(sorted(d))),
    "reverse": lambda d: (f"Write {d} backwards.", d[::-1]),
    "sum": lambda d: (f"What is the sum of the digits of {d}?", str(sum(int(c) for c in d))),
}

ARITH_REWARD_FILE = '''"""A user's reward: 1 when the answer is exactly the reference, else 0."""


def correct(prompts, completions, answer, **columns):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
'''

REWARD_FILE = '''"""A user's reward: 1 when reasoning-gym's own scorer gives the answer full marks, else 0."""
import reasoning_gym


def correct(prompts, completions, answer, task, metadata, **columns):
    score = reasoning_gym.get_score_answer_fn(task[0])
    return [1.0 if score(c.strip(), {"question": p, "answer": a, "metadata": m}) == 1.0 else 0.0
            for p, c, a, m in zip(prompts, completions, answer, metadata)]
'''


def write_gym_task(directory: Path, name: str, config: dict, seed: int) -> None:
    """demos.jsonl (prompt, completion, answer), prompts.jsonl and eval.jsonl (prompt, answer), my_rewards.py."""
    import reasoning_gym

    size = NUM_DEMOS + NUM_PROMPTS + NUM_EVAL
    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    rows, seen = [], set()
    for entry in dataset:
        if entry["question"] in seen:  # held-out prompts must never be trained on
            continue
        seen.add(entry["question"])
        rows.append({"prompt": entry["question"], "answer": entry["answer"], "task": name,
                     "metadata": json.loads(json.dumps(entry["metadata"], default=str))})
    if len(rows) < NUM_EVAL + NUM_DEMOS + NUM_EVAL:  # too few distinct problems left for the GRPO prompts
        raise SystemExit(f"{name} {config}: only {len(rows)} distinct problems in {size} draws; widen its range")
    evaluation, rest = rows[:NUM_EVAL], rows[NUM_EVAL:]
    demos, prompts = rest[:NUM_DEMOS], rest[NUM_DEMOS:]
    directory.mkdir(parents=True, exist_ok=True)
    for file, part, with_completion in (("demos.jsonl", demos, True), ("prompts.jsonl", prompts, False),
                                        ("eval.jsonl", evaluation, False)):
        with open(directory / file, "w") as f:
            for row in part:
                f.write(json.dumps({**row, "completion": row["answer"]} if with_completion else row) + "\n")
    (directory / "my_rewards.py").write_text(REWARD_FILE)


def write_arith_files(directory: Path, task_fields: dict, num_demos: int, seed: int) -> None:
    """The built-in task's problems as demos.jsonl / prompts.jsonl / eval.jsonl (disjoint) and my_rewards.py."""
    from policyopt.data.arithmetic import ArithmeticTask, make_rows

    rows = [{"prompt": row["prompt"], "answer": row["answer"]}
            for row in make_rows(NUM_EVAL + num_demos + NUM_PROMPTS, ArithmeticTask(**task_fields), seed)]
    write_user_files(directory, rows, num_demos)


def write_user_files(directory: Path, rows: list[dict], num_demos: int) -> None:
    """``rows`` ({prompt, answer}) as eval.jsonl (the first NUM_EVAL), demos.jsonl (the next ``num_demos``,
    with the answer as the completion) and prompts.jsonl (the rest), and the exact-match my_rewards.py."""
    parts = {"eval.jsonl": rows[:NUM_EVAL], "demos.jsonl": rows[NUM_EVAL:NUM_EVAL + num_demos],
             "prompts.jsonl": rows[NUM_EVAL + num_demos:]}
    directory.mkdir(parents=True, exist_ok=True)
    for file, part in parts.items():
        with open(directory / file, "w") as f:
            for row in part:
                f.write(json.dumps({**row, "completion": row["answer"]} if file == "demos.jsonl" else row) + "\n")
    (directory / "my_rewards.py").write_text(ARITH_REWARD_FILE)


def write_digit_files(directory: Path, kind: str, length: int, seed: int) -> None:
    """A digit-string task as a user's files: demos.jsonl / prompts.jsonl / eval.jsonl (disjoint strings)
    and my_rewards.py."""
    import random

    rng, strings = random.Random(seed), []
    seen: set = set()
    while len(strings) < NUM_EVAL + NUM_DEMOS + NUM_PROMPTS:
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        if digits not in seen:
            seen.add(digits)
            strings.append(digits)
    rows = [dict(zip(("prompt", "answer"), DIGIT_KINDS[kind](digits))) for digits in strings]
    write_user_files(directory, rows, NUM_DEMOS)


def policyopt(command: str, args: list[str], log_path: Path) -> float:
    """Run ``policyopt COMMAND ARGS`` in a fresh process; returns its wall time. Fails loudly."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # One torch thread unless told otherwise: on a shared 2-core CPU, torch's default threads fighting
        # other processes made steps 25-50x slower (benchmarks/README.md, TRL comparison).
        env = {"OMP_NUM_THREADS": "1", **os.environ, "TQDM_DISABLE": "1"}
        done = subprocess.run([sys.executable, "-m", "policyopt.cli", command, *args], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"policyopt {command} failed (exit {done.returncode}); see {log_path}")
    return time.perf_counter() - started


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_task(task: str, variants: list[str], out: Path, seed: int, model: str = "default") -> list[dict]:
    """SFT once, then each GRPO variant from it, for ``task`` on ``seed`` with the SFT-built model ``model``."""
    directory = out / model / f"seed{seed}" / task
    directory.mkdir(parents=True, exist_ok=True)
    if task in BUILTIN_TASKS:
        _, data_args, sft_steps, sft_only = BUILTIN_TASKS[task]
        sft_data, grpo_data = [*data_args, *sft_only], data_args
        metric = "eval/accuracy"
    else:
        if task in FILE_ARITH_TASKS:
            _, fields, sft_steps, num_demos = FILE_ARITH_TASKS[task]
            write_arith_files(directory, fields, num_demos, seed)
        elif task in DIGIT_TASKS:
            _, kind, length, sft_steps = DIGIT_TASKS[task]
            write_digit_files(directory, kind, length, seed)
        else:
            _, name, config, sft_steps = GYM_TASKS[task]
            write_gym_task(directory, name, config, seed)
        reward = f"rewards={directory / 'my_rewards.py'}:correct"
        evaluation = f"data.eval_path={directory / 'eval.jsonl'}"
        sft_data = [f"data.path={directory / 'demos.jsonl'}", evaluation, reward]
        grpo_data = [f"data.path={directory / 'prompts.jsonl'}", evaluation, reward]
        metric = "eval/correct"
    sft_dir = directory / "sft"
    if not (sft_dir / "summary.json").exists():
        policyopt("sft", ["--output-dir", str(sft_dir), f"seed={seed}", f"steps={sft_steps}", "tensorboard=false",
                          "eval_every=0", *sft_data, *MODELS[model]], directory / "sft.log")
    sft = json.loads((sft_dir / "summary.json").read_text())
    results = []
    for variant in variants:
        grpo_dir = directory / f"grpo_{variant}"
        if not (grpo_dir / "summary.json").exists():
            # eval_every=0: held-out accuracy only before and after (evaluation does not change training)
            seconds = policyopt("grpo", ["--output-dir", str(grpo_dir), f"seed={seed}", "tensorboard=false",
                                         "eval_every=0",
                                         f"model.name_or_path={sft_dir / 'final'}", *grpo_data, *VARIANTS[variant][1]],
                                directory / f"grpo_{variant}.log")
        else:
            seconds = float("nan")
        summary = json.loads((grpo_dir / "summary.json").read_text())
        config = (grpo_dir / "config.yaml").read_text()
        steps = [r for r in read_records(grpo_dir / "metrics.jsonl") if "reward/mean" in r]
        mean = (lambda key: sum(r[key] for r in steps) / len(steps))
        results.append({
            "task": task, "variant": variant, "settings": VARIANTS[variant][0], "seed": seed, "model": model,
            "sft_start_accuracy_sft_eval": sft["eval_after"].get(metric),
            "accuracy_before": summary["eval_before"][metric], "accuracy_after": summary["eval_after"][metric],
            "gain_points": 100 * (summary["eval_after"][metric] - summary["eval_before"][metric]),
            "train_reward_mean": mean("reward/mean"), "frac_zero_std_mean": mean("frac_reward_zero_std"),
            "frac_zero_std_last10": sum(r["frac_reward_zero_std"] for r in steps[-10:]) / len(steps[-10:]),
            "grpo_steps": len(steps), "seconds": seconds, "resolved_config_excerpt": [
                line.strip() for line in config.splitlines() if line.strip().startswith(("temperature:", "lr:"))],
        })
        print(json.dumps(results[-1]), flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | seed | task | GRPO settings | held-out before (SFT start) | after | gain | train reward | "
             "zero-spread groups (mean / last 10 steps) |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['seed']} | {r['task']} | {r['settings']} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | "
                     f"{r['gain_points']:+.1f} | {r['train_reward_mean']:.3f} | {r['frac_zero_std_mean']:.2f} / "
                     f"{r['frac_zero_std_last10']:.2f} |")
    return "\n".join(lines)


def mean_table(results: list[dict]) -> str:
    """Per (model, task, variant): the gain's mean and range over seeds."""
    cells: dict = {}
    for r in results:
        cells.setdefault((r["model"], r["task"], r["variant"]), []).append(r)
    lines = ["| model | task | GRPO settings | seeds | before (mean) | after (mean) | gain mean [min, max] |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (model, task, variant), rows in cells.items():
        gains = [r["gain_points"] for r in rows]
        mean = (lambda key: sum(r[key] for r in rows) / len(rows))
        lines.append(f"| {model} | {task} | {rows[0]['settings']} | {len(rows)} | {mean('accuracy_before'):.3f} | "
                     f"{mean('accuracy_after'):.3f} | {sum(gains) / len(gains):+.1f} [{min(gains):+.1f}, "
                     f"{max(gains):+.1f}] |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/defaults")
    parser.add_argument("--tasks", nargs="*", default=[*BUILTIN_TASKS, *GYM_TASKS, *FILE_ARITH_TASKS, *DIGIT_TASKS])
    parser.add_argument("--variants", nargs="*", default=["old", "t07", "t07_lr1e3", "t10_lr1e3"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--models", nargs="*", default=["default"], choices=sorted(MODELS),
                        help="the shape SFT builds when no model is given (model.tiny.*)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        for seed in args.seeds:
            for task in args.tasks:
                results += run_task(task, args.variants, out, seed, model)
    (out / f"results-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    print(mean_table(results))


if __name__ == "__main__":
    main()
