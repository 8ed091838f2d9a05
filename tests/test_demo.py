"""The README's main job, exactly as a user runs it: `policyopt demo` with its preset."""

import json
from pathlib import Path

import pytest

from policyopt.cli import main
from policyopt.recipes import demo
from policyopt.recipes.demo import demo_config, run_demo

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def _mini(tmp_path, *overrides):
    """The demo preset, shrunk to a few seconds (the overrides keep the preset's other values)."""
    return demo_config([f"output_dir={tmp_path}", "num_demonstrations=40", "eval_size=8", "task.steps=1",
                        "sft.steps=3", "sft.eval_every=1", "sft_patience=1", "sft.batch_size=8",
                        "grpo.steps=1", "grpo.prompts_per_step=4", "grpo.group_size=2",
                        "grpo.sampling.max_new_tokens=6", "grpo.save_every=1", "grpo.eval_every=0",
                        "grpo.tensorboard=false", "sft.tensorboard=false", "sft_control=false",
                        *[f"tiny.{k}={v}" for k, v in TINY.items()], *overrides])


def test_demo_resume_keeps_finished_stages_and_finishes_the_interrupted_one(tmp_path):
    config = _mini(tmp_path)
    assert config.grpo.sampling.temperature == 0.7 and config.sft.optim.lr == 2e-3  # the preset's
    first = run_demo(config)
    sft_summary = (tmp_path / "sft" / "summary.json").read_text()
    # as if killed after GRPO's last checkpoint but before its summary: resume finishes GRPO only
    (tmp_path / "grpo" / "summary.json").unlink()
    again = run_demo(_mini(tmp_path, "resume=auto"))
    assert (tmp_path / "sft" / "summary.json").read_text() == sft_summary  # SFT was not run again
    assert json.loads((tmp_path / "grpo" / "summary.json").read_text())["steps"] == 1
    for key in ("accuracy_sft_start", "accuracy_before", "accuracy_after", "model_parameters"):
        assert again[key] == first[key], key


@pytest.mark.slow
def test_demo_defaults_sft_plateaus_then_grpo_raises_heldout_accuracy(tmp_path, capsys):
    # the preset as a user runs it, less the SFT control (it runs at least as long as GRPO did, doubling
    # the test's time; test_demo_sft_control_continues_sft_for_grpos_time_... covers it)
    assert main(["demo", "--output-dir", str(tmp_path), "sft_control=false"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy_after"] == summary["accuracy_after"]
    # SFT stopped at its plateau (before the cap), and GRPO started from its best round
    assert summary["sft_steps"] < 1000 and summary["sft_best_step"] <= summary["sft_steps"]
    # GRPO's first evaluation re-scores that model on the same rows, greedy: the same answers (1e-6: the
    # float32 mean of 200 scores, however it is summed)
    assert summary["accuracy_before"] == pytest.approx(max(r["accuracy"] for r in summary["sft_rounds"]), abs=1e-6)
    # the claims the README makes: GRPO ends at least 30 points above the demo's first model, and
    # above the plateaued SFT checkpoint it started from
    assert summary["accuracy_after"] - summary["accuracy_sft_start"] >= 0.30, summary
    assert summary["accuracy_after"] > summary["accuracy_before"], summary
    assert summary["hard_accuracy_after"] is not None and summary["hard_task"]["steps"] == 4
    for name in ("curves.png", "config.yaml", "grpo/metrics.jsonl", "grpo/final/model.safetensors",
                 "sft/best/tokenizer.json", "sft/plateau.json"):
        assert (tmp_path / name).exists(), name


def test_demo_sft_control_continues_sft_for_grpos_time_and_both_branches_meet_the_harder_set(tmp_path):
    summary = run_demo(_mini(tmp_path, "sft_control=true"))
    control = json.loads((tmp_path / "sft_control" / "summary.json").read_text())
    assert summary["sft_control_steps"] == control["steps"] > 0
    assert summary["accuracy_sft_control"] == control["accuracy_after"] is not None
    # max(GRPO's steps, GRPO's training time at the SFT stage's own pace), a step count
    last_round = summary["sft_rounds"][-1]
    pace = last_round["train_seconds"] / last_round["step"]
    assert control["steps"] == max(summary["grpo_steps"], round(summary["grpo_train_seconds"] / pace))
    assert summary["hard_task"]["steps"] == 2  # one more operation than the mini task's task.steps=1
    for key in ("hard_accuracy_before", "hard_accuracy_after", "hard_accuracy_sft_control"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert (tmp_path / "curves.png").stat().st_size > 0


def _scripted_sft(accuracies, calls):
    """A stand-in for run_sft: round k ends at its config's steps with accuracies[k] and a model dir
    named after the round, so the test can tell which round's model became best/."""
    def run(config):
        calls.append((config.steps, config.resume, config.eval_every, config.save_every))
        final = Path(config.output_dir) / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "round.txt").write_text(str(len(calls)))
        return {"steps": config.steps, "accuracy_before": 0.0, "accuracy_after": accuracies[len(calls) - 1],
                "eval_nll_after": 1.0, "train_seconds": float(config.steps), "model_dir": str(final)}
    return run


def test_sft_stops_at_its_plateau_and_keeps_the_earliest_best_round(tmp_path, monkeypatch):
    calls = []
    # best 0.3 at round 2; rounds 3-5 bring no new best (a tie is not one), so patience 3 stops after round 5
    monkeypatch.setattr(demo, "run_sft", _scripted_sft([0.1, 0.3, 0.2, 0.3, 0.25, 0.9], calls))
    sft = demo_config([f"output_dir={tmp_path}"]).sft
    sft.output_dir, sft.steps, sft.eval_every = str(tmp_path / "sft"), 1000, 25
    record = demo.sft_to_plateau(sft, patience=3, resume=None)
    assert [c[0] for c in calls] == [25, 50, 75, 100, 125]
    assert [c[1] for c in calls] == [None, "auto", "auto", "auto", "auto"]  # each round resumes the last
    assert all(c[2:] == (0, 25) for c in calls)  # one evaluation per round, a checkpoint at its end
    assert record["done"] and record["best_round"] == 1
    assert (tmp_path / "sft" / "best" / "round.txt").read_text() == "2"
    assert json.loads((tmp_path / "sft" / demo.PLATEAU_FILE).read_text()) == record


def test_sft_plateau_stops_at_the_step_cap_and_a_resume_continues_the_rounds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_sft", _scripted_sft([0.1, 0.2, 0.3], calls))
    sft = demo_config([f"output_dir={tmp_path}"]).sft
    sft.output_dir, sft.steps, sft.eval_every = str(tmp_path / "sft"), 60, 25
    record_path = tmp_path / "sft" / demo.PLATEAU_FILE
    record_path.parent.mkdir()
    # as if interrupted after the first round
    record_path.write_text(json.dumps({"rounds": [{"step": 25, "accuracy": 0.05, "nll": 1.0, "train_seconds": 25.0}],
                                       "accuracy_start": 0.0, "done": False, "best_round": 0}))
    calls.append(None)  # the first round ran before the interruption
    record = demo.sft_to_plateau(sft, patience=3, resume="auto")
    assert [c[0] for c in calls[1:]] == [50, 60]  # the last round is cut at sft.steps
    assert record["done"] and record["best_round"] == 2 and len(record["rounds"]) == 3
