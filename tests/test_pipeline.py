"""`policyopt pipeline`: a miniature SFT -> reward model -> PPO and GRPO run writes a report whose every
number is in its summary.json, measures memory per step, and keeps the pipeline's own defaults when
a stage is overridden."""

import json
import re
import threading
import time

import pytest

from policyopt.cli import main
from policyopt.recipes.pipeline import (StepMemoryProbe, accuracy_at, accuracy_by_training_time, pipeline_config,
                                        run_pipeline)
from policyopt.runtime.config import ConfigError
from policyopt.runtime.metrics import read_metrics

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def _mini(tmp_path, **extra):
    overrides = {
        "output_dir": str(tmp_path / "pipe"), "tiny": TINY, "num_demonstrations": 40, "eval_size": 16,
        "task": {"steps": 1}, "isolate_stages": False,
        "sft": {"steps": 10, "batch_size": 16},
        "reward": {"epochs": 1, "batch_size": 16, "eval_every": 0, "tensorboard": False,
                   "data": {"builtin": {"num_prompts": 24, "eval_prompts": 8, "answers_per_prompt": 3}}},
        "ppo": {"steps": 3, "prompts_per_step": 16, "num_minibatches": 2, "eval_every": 2, "tensorboard": False},
        "grpo": {"steps": 3, "prompts_per_step": 4, "group_size": 4, "num_minibatches": 2, "eval_every": 2,
                 "tensorboard": False},
    }
    overrides.update(extra)
    return pipeline_config(overrides)  # the preset, with these laid over it section by section


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def test_pipeline_report_numbers_all_come_from_the_run(tmp_path):
    summary = run_pipeline(_mini(tmp_path))
    out = tmp_path / "pipe"
    for name in ("summary.json", "report.md", "curves.png", "config.yaml", "sft/final/config.json",
                 "reward/final/reward_stats.json", "ppo/final/config.json", "grpo/final/config.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for stage in ("ppo", "ppo_separate_critic", "grpo"):
        s = saved[stage]
        assert s["steps"] == 3 and s["seconds_per_step_median"] > 0 and s["peak_rss_mb_per_step_median"] > 0
        assert s["rss_growth_mb_per_step_median"] >= 0
        # the headline accuracy is the exact-answer accuracy (weight 0), not the reward model's score
        assert 0.0 <= s["accuracy_before"] <= 1.0 and 0.0 <= s["accuracy_after"] <= 1.0
        records = read_metrics(out / stage / "metrics.jsonl")
        assert any("reward/rm/mean" in r for r in records) and any("eval/accuracy" in r for r in records)
        # trained on the reward model alone: the total reward is its score
        for r in records:
            if "reward/rm/mean" in r:
                assert r["reward/mean"] == pytest.approx(r["reward/rm/mean"])
    assert saved["ppo"]["accuracy_before"] == saved["grpo"]["accuracy_before"]  # one SFT start
    assert saved["answers_per_step"] == 16 and saved["ppo_separate_critic"]["value_model"] == "separate"
    for name in ("ppo", "ppo_separate_critic"):
        assert saved[f"{name}_vs_grpo"]["seconds_per_step_median_ratio"] == pytest.approx(
            saved[name]["seconds_per_step_median"] / saved["grpo"]["seconds_per_step_median"])

    # equal compute: training time is the steps' own seconds; the budget is the shortest stage's
    stages = ("ppo", "ppo_separate_critic", "grpo")
    for stage in stages:
        s, records = saved[stage], read_metrics(out / stage / "metrics.jsonl")
        assert s["training_seconds"] == sum(r["seconds_per_step"] for r in records if "seconds_per_step" in r)
        # evaluations before training and at steps 2 and 3 (the end): the SFT start at t = 0, the final at the end
        assert [a for _, a in s["accuracy_by_training_time"]] == [v for _, v in s["eval_history"]]
        assert s["accuracy_by_training_time"][0] == [0.0, s["accuracy_before"]]
        assert s["accuracy_by_training_time"][-1] == [s["training_seconds"], s["accuracy_after"]]
    equal = saved["equal_time"]
    assert equal["budget_seconds"] == min(saved[n]["training_seconds"] for n in stages)
    fastest = saved[equal["budget_stage"]]
    assert fastest["accuracy_at_equal_time"] == fastest["accuracy_after"]
    for stage in stages:
        assert saved[stage]["accuracy_at_equal_time_measured_at_seconds"] <= equal["budget_seconds"]

    # every number printed in the report is a number of summary.json (at the printed precision)
    known = list(_numbers(saved))
    report = (out / "report.md").read_text()
    body = report.split("\n", 2)[2].replace(json.dumps(saved["task"]), "")
    body = re.sub(r"Task: \{[^}]*\}", "", body)
    for token in re.findall(r"-?\d+\.\d+|-?\d+", body):
        decimals = len(token.split(".")[1]) if "." in token else 0
        value = float(token)
        assert any(abs(k - value) <= 0.5 * 10 ** -decimals + 1e-9 for k in known), token


def test_accuracy_by_training_time_counts_training_steps_only():
    records = [
        {"step": 0, "eval/accuracy": 0.25},  # before training: the SFT start
        {"step": 1, "seconds_per_step": 1.5},
        {"step": 2, "seconds_per_step": 2.0, "eval/accuracy": 0.5},  # evaluated after its training
        {"step": 3, "seconds_per_step": 0.5, "eval/reward": 0.1},  # no accuracy: not a point
        {"step": 4, "seconds_per_step": 1.0},
        {"step": 4, "eval/accuracy": 0.75},  # the final evaluation, a record of its own
    ]
    points = accuracy_by_training_time(records)
    assert points == [(0.0, 0.25), (3.5, 0.5), (5.0, 0.75)]  # halves: exact in binary floating point
    assert accuracy_at(points, 0.0) == (0.0, 0.25)
    assert accuracy_at(points, 3.49) == (0.0, 0.25)  # the last evaluation at or before, never interpolated
    assert accuracy_at(points, 3.5) == (3.5, 0.5)
    assert accuracy_at(points, 99.0) == (5.0, 0.75)
    assert accuracy_at(points, -1.0) is None


def test_pipeline_keeps_its_defaults_under_overrides():
    config = pipeline_config(["ppo.steps=7", "grpo.steps=7", "task.steps=2", "reward.data.builtin.num_prompts=50",
                              "grpo.optim.warmup_steps=0"])
    default = pipeline_config()
    assert config.ppo.steps == 7 and config.ppo.prompts_per_step == default.ppo.prompts_per_step
    assert config.ppo.optim == default.ppo.optim and config.ppo.sampling == default.ppo.sampling
    assert config.grpo.optim.warmup_steps == 0 and config.grpo.optim.lr == default.grpo.optim.lr == 1e-3
    assert config.ppo.missing_eos_penalty == default.ppo.missing_eos_penalty == 1.0
    assert config.task.steps == 2 and config.task.operators == default.task.operators
    assert config.reward.data.builtin.num_prompts == 50
    assert config.reward.data.builtin.eval_prompts == default.reward.data.builtin.eval_prompts
    with pytest.raises(ConfigError, match="same answers per step"):
        pipeline_config(["ppo.prompts_per_step=64"])
    with pytest.raises(ConfigError, match=r"unknown config key ppo\.stepz \(did you mean ppo\.steps\?\)"):
        pipeline_config(["ppo.stepz=1"])


def test_memory_probe_cuts_samples_at_each_metrics_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 7, "seconds_per_step": 1.0}) + "\n")  # an earlier run's line
    probe = StepMemoryProbe(path, interval=0.002, cuda=False)
    probe.start()
    kept = []

    def write(record):
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    time.sleep(0.02)
    path.unlink()  # the recipe starts a fresh file, as GRPO and PPO do

    write({"step": 0, "eval/accuracy": 0.1})
    time.sleep(0.05)
    kept.append(bytearray(64 * 2**20))  # 64 MB held through step 1
    for i in range(0, len(kept[0]), 4096):
        kept[0][i] = 1
    time.sleep(0.05)
    write({"step": 1, "seconds_per_step": 0.1})
    time.sleep(0.05)
    kept.clear()
    time.sleep(0.02)
    write({"step": 2, "seconds_per_step": 0.1})
    time.sleep(0.05)
    windows = probe.stop()
    assert [w["step"] for w in windows] == [0, 1, 2]
    assert [w["train_step"] for w in windows] == [False, True, True]
    assert windows[1]["peak_rss_mb"] - windows[1]["start_rss_mb"] > 50
    assert all(w["peak_rss_mb"] >= w["start_rss_mb"] for w in windows)
    assert threading.active_count() >= 1


@pytest.mark.slow
def test_pipeline_cli_with_isolated_stages(tmp_path):
    out = tmp_path / "cli"
    args = ["pipeline", "--output-dir", str(out), "isolate_stages=true", "num_demonstrations=40", "eval_size=16",
            "task.steps=1", "sft.steps=10", "reward.epochs=1", "reward.data.builtin.num_prompts=24",
            "reward.data.builtin.eval_prompts=8", "ppo.steps=2", "grpo.steps=2", "ppo.prompts_per_step=16",
            "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.num_minibatches=2"]
    args += [f"tiny.{k}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    saved = json.loads((out / "summary.json").read_text())
    # each RL stage ran in its own process: its peak RSS is its own, measured by the OS
    assert saved["ppo"]["process_peak_rss_mb"] > 0 and saved["grpo"]["process_peak_rss_mb"] > 0
    assert saved["ppo_vs_grpo"]["process_peak_rss_mb_ratio"] > 0
    assert not list(tmp_path.glob("cli/*.result.json"))


def test_memory_probe_skips_what_a_resumed_recipe_keeps_of_its_metrics(tmp_path):
    # a resumed stage copies its checkpoint's metrics back (a prefix of the killed run's file): those
    # records were measured before; only the steps logged after the resume are new windows
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "seconds_per_step": 1.0}) + "\n" for s in range(4)]
    path.write_text("".join(lines))  # the killed run's records, steps 0-3
    probe = StepMemoryProbe(path, interval=0.002, cuda=False)
    probe.start()
    time.sleep(0.02)
    path.write_text("")  # a copy caught half-way: truncated, not yet written
    time.sleep(0.02)
    path.write_text("".join(lines[:2]))  # cut back to the checkpoint at step 1, in place
    time.sleep(0.05)
    with path.open("a") as f:
        f.write(json.dumps({"step": 2, "seconds_per_step": 0.5}) + "\n")
    time.sleep(0.05)
    assert [w["step"] for w in probe.stop()] == [2]
