"""A GRPO run killed with SIGKILL and resumed reproduces the uninterrupted run, step for step."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from policyopt.runtime.checkpoint import list_checkpoints
from policyopt.runtime.metrics import read_metrics

TIMING_KEYS = {"seconds_per_step", "generation_seconds", "tokens_per_second"}
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "prompts.jsonl"
    with data.open("w") as f:
        for i in range(24):  # 4 held out, 20 for training: an epoch ends every 5 steps of 4 prompts
            f.write(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n")
    reward = root / "dying_reward.py"
    reward.write_text(textwrap.dedent("""
        import os, signal
        from pathlib import Path

        def starts_with_digit(prompts, completions, **columns):
            kill_at = int(os.environ.get("KILL_AT_TRAINING_CALL", "0"))
            if kill_at and len(completions) == 16:  # a training batch (evaluation batches hold 4)
                counter = Path(os.environ["KILL_COUNTER"])
                calls = int(counter.read_text()) + 1 if counter.exists() else 1
                counter.write_text(str(calls))
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # die mid-step, like an OOM kill or preemption
            return [1.0 if c[:1].isdigit() else 0.0 for c in completions]
    """))
    return root, data, reward


def _run(out, data, reward, resume=False, kill_at=0, counter=None):
    cmd = [sys.executable, "-m", "policyopt.cli", "grpo", "--output-dir", str(out), f"data.path={data}",
           "data.eval_size=4", f"rewards=[{{function: '{reward}:starts_with_digit'}}]", f"steps={STEPS}",
           "prompts_per_step=4", "group_size=4", "eval_every=3", "save_every=1", "keep_last=2", "lr=1e-2",
           "warmup_steps=2", "sampling.max_new_tokens=5", "tensorboard=false", "model.tiny.hidden_size=32",
           "model.tiny.num_heads=2", "model.tiny.num_layers=1"]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "KILL_AT_TRAINING_CALL": str(kill_at), "KILL_COUNTER": str(counter or "")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _comparable(path):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(path)]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, data, reward = setup
    result = _run(root / "reference", data, reward)
    assert result.returncode == 0, result.stderr[-2000:]
    return _comparable(root / "reference" / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("die_during_step", [3, 6, 7])  # after checkpoints 2, 5 (epoch boundary), 6 (eval step)
def test_sigkill_then_resume_matches_uninterrupted_run(setup, uninterrupted, die_during_step, tmp_path):
    _, data, reward = setup
    out = tmp_path / "run"
    killed = _run(out, data, reward, kill_at=die_during_step, counter=tmp_path / "calls")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == f"step-{die_during_step - 1:06d}"
    assert len(list_checkpoints(out / "checkpoints")) == 2  # keep_last

    resumed = _run(out, data, reward, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert _comparable(out / "metrics.jsonl") == uninterrupted


def test_fresh_run_refuses_to_mix_with_old_checkpoints(setup, tmp_path):
    _, data, reward = setup
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "trainer_state.pt").write_bytes(b"")
    result = _run(out, data, reward)
    assert result.returncode == 2 and "resume=auto" in result.stderr
