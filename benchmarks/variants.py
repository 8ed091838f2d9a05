"""The GRPO family side by side on the demo's task, from the same SFT start, for the same number of steps.

    python benchmarks/variants.py --seeds 0 1 2 --steps 60 --eval-every 20 --output-dir runs/variants

(``--variants grpo dapo ...`` runs a subset.)

For each seed: the demo's SFT stage (its preset, `policyopt/configs/demo.yaml`: rounds of SFT until the
held-out plateau, ``recipes.demo.sft_to_plateau``), then every variant's GRPO run from the best SFT
round with the demo's GRPO settings, except ``--steps`` steps and num_minibatches=4 (four optimizer
steps per rollout, so that the policy moves between minibatches and the losses' clipping differs;
on-policy, every variant's ratio is 1). beta = 0 for every variant (the demo's), so REINFORCE++'s
KL-in-the-reward term is absent and it differs from GRPO only in its advantage. DAPO is all four
parts: clip-higher (0.2/0.28), dynamic sampling (3 rounds at most), token-mean loss, and overlong
handling (filtering, and the soft punishment with L_cache set so that no gold answer pays:
``overlong_cache``). Budgets are step counts; the table also gives each variant's accuracy at the
last evaluation that fits in the smallest variant's training time of that seed (the sum of its seconds
per step, evaluations left out), though on a shared machine wall time also measures the neighbours.
Held-out evaluation every ``--eval-every`` steps: greedy accuracy and pass@k (``--pass-k`` of
``--samples`` answers at the sampling temperature). Prints a Markdown table (mean and min-max over
seeds) and writes ``results.json`` in the output directory; a finished SFT stage in the output
directory is reused, and so is a finished variant run (its summary.json written). ``--set key=value``
changes a GRPO setting for every variant run (after the variant's own), and ``--tag`` names those runs
apart (``seedS/<variant>.<tag>``, ``results.<tag>.json``), e.g.

    python benchmarks/variants.py --seeds 0 --steps 30 --variants cispo --set num_minibatches=1 --tag nmb1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from policyopt.data.arithmetic import completion_for, make_rows
from policyopt.data.sources import EVAL_SEED_OFFSET
from policyopt.recipes.demo import PLATEAU_FILE, demo_config, sft_to_plateau, stage_configs
from policyopt.recipes.grpo import run_grpo

# each variant: the GRPO settings it changes (the demo's are the rest)
VARIANTS = {
    "grpo": {},
    "dr_grpo": {"scale_rewards": False, "loss_aggregation": "seq_sum_constant"},
    "dapo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_aggregation": "token_mean",
             "dynamic_sampling": True, "max_generation_rounds": 3, "overlong_filter": True,
             "overlong_penalty_cache": "auto"},  # auto: see overlong_cache
    "gspo": {"policy_loss": "gspo", "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},
    "cispo": {"policy_loss": "cispo", "clip_ratio_low": 1.0, "clip_ratio_high": 0.28,
              "loss_aggregation": "token_mean"},
    # CISPO has no trust region (a token past 1 + eps_high keeps its gradient), so at the others' lr with
    # four updates per rollout it collapses here; a third of that lr learns (benchmarks/README.md)
    "cispo_lr3e-4": {"policy_loss": "cispo", "clip_ratio_low": 1.0, "clip_ratio_high": 0.28,
                     "loss_aggregation": "token_mean", "optim.lr": 3e-4},
    "rloo": {"advantage_estimator": "rloo"},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
    "reinforce_pp_baseline": {"advantage_estimator": "reinforce_pp_baseline"},
}


def sft_start(seed: int, out: Path) -> str:
    """The demo's SFT stage for ``seed`` (``recipes.demo``: rounds until the held-out plateau), in ``out``;
    returns the best round's model dir. A finished stage found there is reused."""
    demo = demo_config([f"seed={seed}", f"output_dir={out.parent}"])
    sft, _ = stage_configs(demo, out.parent)
    sft.output_dir = str(out)
    finished = (out / PLATEAU_FILE).exists()
    return sft_to_plateau(sft, demo.sft_patience, "auto" if finished else None)["model_dir"]


def overlong_cache(model_dir: str, demo, max_new_tokens: int) -> int:
    """DAPO's L_cache for this task: the largest that never punishes a gold answer, i.e.
    L_max - L_cache = the longest gold completion (with EOS) in tokens, so only longer answers pay."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_rows(demo.eval_size, demo.task, seed=demo.seed + EVAL_SEED_OFFSET)
    longest = max(len(tokenizer(completion_for(r["answer"]), add_special_tokens=False)["input_ids"]) + 1
                  for r in rows)
    return max(0, max_new_tokens - longest)


def run_variant(name: str, seed: int, model_dir: str, out: Path, args) -> dict:
    demo = demo_config([f"seed={seed}"])
    _, config = stage_configs(demo, out)
    config.output_dir, config.steps = str(out), args.steps
    config.model.name_or_path = model_dir
    config.num_minibatches, config.eval_every = 4, args.eval_every
    config.eval_pass_k, config.eval_samples = args.pass_k, args.samples
    config.eval_temperature = config.sampling.temperature
    for key, value in {**VARIANTS[name], **settings(args.set)}.items():
        if key == "overlong_penalty_cache" and value == "auto":
            value = overlong_cache(model_dir, demo, config.sampling.max_new_tokens)
        *sections, field = key.split(".")  # "optim.lr": lr on config.optim
        owner = config
        for part in sections:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, field):
            raise SystemExit(f"--set {key}: GRPO's config has no such setting")
        setattr(owner, field, value)
    config.validate()
    if (out / "summary.json").exists():  # a finished run (summary.json is written last) is reused
        seconds = json.loads((out / "summary.json").read_text())["seconds"]
    else:
        started = time.perf_counter()
        run_grpo(config)
        seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "seconds_per_step" in r]
    evals = [r for r in records if r.get("eval/accuracy") is not None]
    pass_key = f"eval/pass@{args.pass_k}"
    zero = [r["frac_reward_zero_std"] for r in steps]  # over every group sampled (DAPO: all its rounds)
    train_seconds, elapsed = {0: 0.0}, 0.0  # step -> training seconds up to it (evaluations left out)
    for r in steps:
        elapsed += r["seconds_per_step"]
        train_seconds[r["step"]] = elapsed
    return {"variant": name, "seed": seed, "seconds": seconds, "train_seconds": elapsed,
            "accuracy_start": evals[0]["eval/accuracy"], "accuracy_final": evals[-1]["eval/accuracy"],
            "accuracy_best": max(r["eval/accuracy"] for r in evals),
            "evaluations": [{"step": r["step"], "train_seconds": train_seconds.get(r["step"], elapsed),
                             "accuracy": r["eval/accuracy"]} for r in evals],
            "pass_k_start": evals[0].get(pass_key), "pass_k_final": evals[-1].get(pass_key),
            "pass1_sampled_final": evals[-1].get("eval/pass@1_sampled"),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in steps),
            "zero_spread_share": statistics.mean(zero),
            "rounds_mean": statistics.mean(r.get("dynamic_sampling/rounds", 1) for r in steps),
            "overlong_penalty_cache": config.overlong_penalty_cache, "settings": settings(args.set)}


def settings(pairs: list[str]) -> dict:
    """``--set key=value`` pairs, each value read as YAML (numbers, booleans, strings; 1e-4 a number)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected key=value")
        value = yaml.safe_load(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def at_equal_time(rows: list[dict]) -> None:
    """Adds ``accuracy_equal_time`` and ``step_equal_time`` to each run: its last evaluation whose training
    seconds fit in the smallest total training time among the same seed's variants."""
    for seed in {r["seed"] for r in rows}:
        mine = [r for r in rows if r["seed"] == seed]
        budget = min(r["train_seconds"] for r in mine)
        for r in mine:
            fits = [e for e in r["evaluations"] if e["train_seconds"] <= budget * (1 + 1e-9)]
            r["accuracy_equal_time"], r["step_equal_time"] = fits[-1]["accuracy"], fits[-1]["step"]
            r["budget_seconds"] = budget


def spread(values: list[float], points: bool = False) -> str:
    scale = 100 if points else 1
    values = [scale * v for v in values]
    mean = statistics.mean(values)
    text = f"{mean:.1f}" if points else f"{mean:.3f}"
    if len(values) > 1:
        text += f" ({min(values):.1f}-{max(values):.1f})" if points else f" ({min(values):.3f}-{max(values):.3f})"
    return text


def table(rows: list[dict], pass_k: int) -> str:
    """Mean (min-max) over seeds per variant; s/step is each run's median, then mean (min-max) over seeds."""
    at_equal_time(rows)
    lines = [f"| variant | final acc. | best acc. | acc. at equal time (steps) | pass@{pass_k} final | "
             "pass@1 sampled final | s/step (median) | zero-spread share | rounds/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        col = (lambda key: [r[key] for r in mine])
        steps = "/".join(str(s) for s in col("step_equal_time"))
        lines.append(f"| {name} | {spread(col('accuracy_final'))} | {spread(col('accuracy_best'))} | "
                     f"{spread(col('accuracy_equal_time'))} ({steps}) | "
                     f"{spread(col('pass_k_final'))} | {spread(col('pass1_sampled_final'))} | "
                     f"{spread(col('seconds_per_step'))} | {spread(col('zero_spread_share'))} | "
                     f"{statistics.mean(col('rounds_mean')):.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--pass-k", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output-dir", default="runs/variants")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a GRPO setting for every run, after the variant's (e.g. optim.lr=1e-4); repeatable")
    parser.add_argument("--tag", default="", help="suffix naming these runs' directories and results file")
    args = parser.parse_args()
    settings(args.set)  # a malformed pair fails before any training
    root = Path(args.output_dir)
    suffix = f".{args.tag}" if args.tag else ""  # "." since variant names hold "_"
    rows = []
    for seed in args.seeds:
        model_dir = sft_start(seed, root / f"seed{seed}" / "sft")
        for name in args.variants:
            rows.append(run_variant(name, seed, model_dir, root / f"seed{seed}" / f"{name}{suffix}", args))
            r = rows[-1]
            print(f"seed {seed} {name}: accuracy {r['accuracy_start']:.3f} -> {r['accuracy_final']:.3f} "
                  f"(best {r['accuracy_best']:.3f}), pass@{args.pass_k} {r['pass_k_start']:.3f} -> "
                  f"{r['pass_k_final']:.3f}, {r['seconds_per_step']:.2f} s/step", flush=True)
            (root / f"results{suffix}.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
    print(table(rows, args.pass_k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
