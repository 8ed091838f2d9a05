"""Every bad input gets one clear line naming the file, line, key, sample or function; no traceback,
and nothing already written is lost."""

import json
import re
import textwrap

import pytest

from policyopt.cli import main
from policyopt.runtime.checkpoint import list_checkpoints
from policyopt.runtime.metrics import read_metrics

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_layers=1", "tensorboard=false",
        "prompts_per_step=4", "group_size=4", "sampling.max_new_tokens=4", "eval_every=0", "data.eval_size=4"]

REWARDS = textwrap.dedent("""
    import math
    CALLS = {"n": 0}

    def ok(prompts, completions, **kw):
        return [1.0 if c[:1].isdigit() else 0.0 for c in completions]

    def raises(prompts, completions, **kw):
        return [1 / 0 for _ in completions]

    def short(prompts, completions, **kw):
        return [0.0]

    def nan(prompts, completions, **kw):
        return [math.nan for _ in completions]

    def inf(prompts, completions, **kw):
        return [math.inf for _ in completions]

    def word(prompts, completions, **kw):
        return ["high" for _ in completions]

    def fails_on_third_training_batch(prompts, completions, **kw):
        if len(completions) == 16:
            CALLS["n"] += 1
            if CALLS["n"] == 3:
                raise RuntimeError("judge service unavailable")
        return ok(prompts, completions)
""")


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(30)))
    return tmp_path


def _grpo(capsys, tmp_path, *overrides, reward="ok"):
    code = main(["grpo", "--output-dir", str(tmp_path / "out"), f"data.path={tmp_path / 'good.jsonl'}",
                 f"rewards=[{{function: '{tmp_path / 'rewards.py'}:{reward}'}}]", "steps=2", *TINY, *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _with_data(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return f"data.path={path}"


@pytest.mark.parametrize("name, text, expected", [
    ("broken.jsonl", '{"prompt": "1+1="}\n{"prompt": "2+2="}\n{"prompt": "3+3=",\n', r"broken.jsonl:3"),
    ("nocol.jsonl", '{"question": "1+1="}\n', r"nocol.jsonl:1.*prompt.*question"),
    ("emptyprompt.jsonl", '{"prompt": "1+1="}\n{"prompt": ""}\n', r"emptyprompt.jsonl:2.*empty"),
    ("number.jsonl", '{"prompt": 12}\n', r"number.jsonl:1"),
    ("empty.jsonl", "\n\n", r"empty.jsonl.*no rows"),
    ("missing.jsonl", None, r"missing.jsonl.*no such file"),
])
def test_bad_dataset_rows(capsys, files, name, text, expected):
    data = _with_data(files, name, text) if text is not None else f"data.path={files / name}"
    code, err = _grpo(capsys, files, data)
    assert code == 2
    assert re.search(expected, err, re.S), err


def test_over_long_prompts_truncate_skip_or_error(capsys, files):
    rows = [{"prompt": "1+1=" + "9" * 100 if i % 3 == 0 else f"{i}+1=", "answer": "2"} for i in range(30)]
    data = _with_data(files, "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    code, err = _grpo(capsys, files, data, "data.max_prompt_tokens=20", "data.long_prompts=error")
    assert code == 2 and "has a 104-token prompt" in err and "data.max_prompt_tokens=20" in err
    code, _ = _grpo(capsys, files, data, "data.max_prompt_tokens=20", "data.long_prompts=skip")
    summary = json.loads((files / "out" / "summary.json").read_text())
    assert code == 0 and summary["prompts_skipped_too_long"] > 0


@pytest.mark.parametrize("overrides, expected", [
    (["sampling.temprature=0.5"], "unknown config key sampling.temprature (did you mean sampling.temperature?)"),
    (["sampling.temperature=-1"], "sampling.temperature must be >= 0"),
    (["group_size=1"], "group_size must be >= 2"),
    (["optim.lr=fast"], "optim.lr must be a number"),
    (["lr=1e-4"], "did you mean optim.lr"),
    (["model.name_or_path=./no/such/model"], "model path './no/such/model' does not exist"),
])
def test_bad_config_and_model_path(capsys, files, overrides, expected):
    code, err = _grpo(capsys, files, *overrides)
    assert code == 2 and expected in err, err


@pytest.mark.parametrize("reward, expected", [
    ("raises", "reward function 'raises' raised ZeroDivisionError"),
    ("short", "reward function 'short' must return a list of 4 values, got 1 values"),
    ("nan", "reward function 'nan' returned nan for sample 0"),
    ("inf", "reward function 'inf' returned inf for sample 0"),
    ("word", "reward function 'word' returned 'high' for sample 0"),
    ("absent", "absent"),
])
def test_bad_reward_functions(capsys, files, reward, expected):
    code, err = _grpo(capsys, files, reward=reward)
    assert code == 2 and expected in err, err


def test_failing_reward_can_be_counted_instead(capsys, files):
    code, _ = _grpo(capsys, files, "reward_on_error=skip", reward="raises")
    assert code == 0
    records = [r for r in read_metrics(files / "out" / "metrics.jsonl") if "reward_failures" in r]
    assert records and all(r["reward_failures"] == 16 for r in records)


def test_a_mid_run_failure_keeps_metrics_and_checkpoints(capsys, files):
    code, err = _grpo(capsys, files, "steps=6", "save_every=1", reward="fails_on_third_training_batch")
    assert code == 2 and "judge service unavailable" in err
    steps = [r["step"] for r in read_metrics(files / "out" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]
    assert list_checkpoints(files / "out" / "checkpoints")[-1].name == "step-000002"
