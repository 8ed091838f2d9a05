"""Every bad input gets one clear line naming the file, line, key, sample or function; no traceback,
and nothing already written is lost."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

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

    def fails_once_step_2_is_saved(prompts, completions, **kw):
        import os
        if os.path.isdir(os.path.join(os.path.dirname(__file__), "out", "checkpoints", "step-000002")):
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
    code, err = _grpo(capsys, files, "steps=6", "save_every=1", reward="fails_once_step_2_is_saved")
    assert code == 2 and "judge service unavailable" in err
    steps = [r["step"] for r in read_metrics(files / "out" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]
    assert list_checkpoints(files / "out" / "checkpoints")[-1].name == "step-000002"


# ------------------------------------------------------------------ files that are not text, roles no template knows


@pytest.mark.parametrize("name, content, expected", [
    ("binary.jsonl", bytes(range(256)) * 4, r"binary.jsonl:1: holds NUL bytes; is it a binary file\?"),
    ("high.jsonl", bytes(range(128, 256)), r"high.jsonl:1: not UTF-8 text \(byte 0x80 at column 1\); is it a "
                                           r"binary file\?"),
    ("latin1.jsonl", '{"prompt": "1+1="}\n{"prompt": "caf\u00e9 1+1="}\n'.encode("latin-1"),
     r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"),
    ("latin1.json", '[{"prompt": "1+1="},\n {"prompt": "caf\u00e9"}]'.encode("latin-1"),
     r"latin1.json:2: not UTF-8 text \(byte 0xe9 at column 17\)"),
    ("nul.jsonl", b'{"prompt": "1+1="}\n\x00\x00\x00\x00\n', r"nul.jsonl:2: holds NUL bytes; is it a binary file\?"),
    ("gzipped.jsonl", b"\x1f\x8b\x08\x00" + bytes(64), r"gzipped.jsonl:1: not UTF-8 text \(byte 0x8b at column 2\)"),
])
def test_undecodable_dataset_files(capsys, files, name, content, expected):
    (files / name).write_bytes(content)
    code, err = _grpo(capsys, files, f"data.path={files / name}")
    assert code == 2 and re.search(expected, err), err
    assert len(err.strip().splitlines()) == 1 or "error:" in err.strip().splitlines()[-1]


def test_a_byte_order_mark_is_not_an_error(capsys, files):
    rows = "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(30))
    (files / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    code, err = _grpo(capsys, files, f"data.path={files / 'bom.jsonl'}", "steps=1")
    assert code == 0, err


@pytest.mark.parametrize("name, rows, expected", [
    ("wizard.jsonl", [{"prompt": "1+1="}, {"prompt": [{"role": "system", "content": "be brief"},
                                                      {"role": "wizard", "content": "1+1="}]}],
     "wizard.jsonl:2: 'prompt' message 1 has role 'wizard'; chat messages take one of system, user, assistant, tool"),
    ("norole.jsonl", [{"prompt": [{"content": "1+1="}]}], "norole.jsonl:1: 'prompt' message 0 is not a chat message"),
])
def test_unknown_chat_roles_are_refused(capsys, files, name, rows, expected):
    data = _with_data(files, name, "".join(json.dumps(r) + "\n" for r in rows))
    code, err = _grpo(capsys, files, data)
    assert code == 2 and expected in err, err


def _reward_command(capsys, tmp_path, path):
    code = main(["reward", "--output-dir", str(tmp_path / "rm_out"), f"data.path={path}", *TINY[:4]])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_preference_files(capsys, files):
    path = files / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps({"prompt": "2+2=", "chosen": [{"role": "wizard", "content": "4"}],
                                  "rejected": "5"}) + "\n")
    code, err = _reward_command(capsys, files, path)
    assert code == 2 and "prefs.jsonl: row 2: 'chosen' message 0 has role 'wizard'" in err, err
    path.write_bytes(b'{"prompt": "1+1=", "chosen": "2", "rejected": "\xff"}\n')
    code, err = _reward_command(capsys, files, path)
    assert code == 2 and "prefs.jsonl:1: not UTF-8 text (byte 0xff at column 48)" in err, err
    assert not (files / "rm_out").exists()  # refused before anything was written


@pytest.mark.parametrize("key", ["group_sise", "groupsize", "group-size", "num_generations", "gruop_size"])
def test_keys_near_group_size_suggest_group_size(capsys, files, key):
    code, err = _grpo(capsys, files, f"{key}=4")
    assert code == 2 and f"unknown config key {key} (did you mean group_size?)" in err, err


# ------------------------------------------------------------------ output directories


def test_an_output_dir_that_is_a_file(capsys, files):
    (files / "taken").write_text("my notes")
    for out, expected in ((files / "taken", f"output_dir {files / 'taken'} is a file, not a directory"),
                          (files / "taken" / "run", f"{files / 'taken'} is a file, so no directory can be made")):
        code = main(["grpo", "--output-dir", str(out), f"data.path={files / 'good.jsonl'}", "steps=1", *TINY])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err
    assert (files / "taken").read_text() == "my notes"


@pytest.mark.slow  # a cold interpreter as nobody (no writable bytecode cache): ~20-50 s
@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root (to become nobody) and setpriv")
def test_an_output_dir_this_user_cannot_write(tmp_path):
    """As user nobody, into a directory only root may write: one line, not a PermissionError traceback."""
    top = Path(tempfile.mkdtemp(prefix="policyopt-unwritable-"))
    try:
        top.chmod(0o755)  # readable, not writable, by nobody
        data = top / "good.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(30)))
        data.chmod(0o644)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "policyopt.cli", "grpo", "--output-dir", str(top / "out"), f"data.path={data}",
                               "steps=1", *TINY], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(top)}, cwd=top)
        assert proc.returncode == 2, proc.stderr
        assert f"output_dir {top / 'out'}: {top} is not writable by this user" in proc.stderr
        assert "Traceback" not in proc.stderr and not (top / "out").exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------------ an earlier run's files are never overwritten


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished GRPO run with checkpoints, and the files around it that bad commands are given."""
    root = tmp_path_factory.mktemp("earlier")
    (root / "rewards.py").write_text(REWARDS)
    (root / "good.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                             for i in range(30)))
    (root / "broken.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2=",\n')
    (root / "binary.jsonl").write_bytes(bytes(range(128, 256)))
    (root / "wizard.jsonl").write_text(json.dumps({"prompt": [{"role": "wizard", "content": "1+1="}]}) + "\n")
    (root / "prefs.jsonl").write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    out = root / "run"
    code = main(["grpo", "--output-dir", str(out), f"data.path={root / 'good.jsonl'}",
                 f"rewards=[{{function: '{root / 'rewards.py'}:ok'}}]", "steps=2", "save_every=1", *TINY])
    assert code == 0
    return root, out


def _bad_commands(root: Path) -> list[tuple[str, list[str], str]]:
    """(what, arguments after `policyopt`, the message expected) for each bad command tried on an earlier run."""
    good = [f"data.path={root / 'good.jsonl'}", f"rewards=[{{function: '{root / 'rewards.py'}:ok'}}]", *TINY]
    refused_stages = "already holds checkpoints of an earlier {}: continue it with resume=auto (--resume)"
    commands = [
        ("grpo again, fresh (no --resume)", ["grpo", *good], "already holds checkpoints of an earlier run"),
        ("ppo, fresh", ["ppo", *good], "already holds checkpoints of an earlier run"),
        ("sft instead of grpo", ["sft", *TINY[:4], "steps=1"], "already holds checkpoints of an earlier run"),
        ("reward model into it", ["reward", f"data.path={root / 'prefs.jsonl'}", *TINY[:4]],
         "already holds checkpoints of an earlier run"),
        ("pipeline into it", ["pipeline"], refused_stages.format("pipeline")),
        ("demo into it", ["demo"], refused_stages.format("demo")),
        ("--resume, a typo in a key", ["grpo", "--resume", *good, "group_sise=4"],
         "unknown config key group_sise (did you mean group_size?)"),
        ("--resume, a bad value", ["grpo", "--resume", *good, "group_size=1"], "group_size must be >= 2"),
        ("--resume, a broken dataset", ["grpo", "--resume", *good, f"data.path={root / 'broken.jsonl'}"],
         "broken.jsonl:2: invalid JSON"),
        ("--resume, a binary dataset", ["grpo", "--resume", *good, f"data.path={root / 'binary.jsonl'}"],
         "binary.jsonl:1: not UTF-8 text"),
        ("--resume, an unknown chat role", ["grpo", "--resume", *good, f"data.path={root / 'wizard.jsonl'}"],
         "wizard.jsonl:1: 'prompt' message 0 has role 'wizard'"),
        ("--resume, a missing reward function",
         ["grpo", "--resume", *good, f"rewards=[{{function: '{root / 'rewards.py'}:absent'}}]"],
         "has no function 'absent'"),
        ("--resume, a missing reward file", ["grpo", "--resume", *good, f"rewards=[{{function: '{root}/nope.py:f'}}]"],
         "nope.py: no such file"),
        ("--resume, a model path that does not exist", ["grpo", "--resume", *good, "model.name_or_path=./no/model"],
         "model path './no/model' does not exist"),
        ("--resume from a checkpoint that does not exist", ["grpo", *good, f"resume={root}/run/checkpoints/step-9"],
         "no trainer_state.pt there"),
    ]
    return [(what, [args[0], "--output-dir", str(root / "run"), *args[1:]], expected) for what, args, expected in commands]


def test_bad_commands_leave_an_earlier_runs_files_unchanged(capsys, earlier_run):
    root, out = earlier_run
    before = _tree_hashes(out)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors"} <= set(before)
    for what, argv, expected in _bad_commands(root):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (what, err)
        assert expected in err and "Traceback" not in err, (what, err)
        assert _tree_hashes(out) == before, f"{what}: changed the earlier run's files"


# ------------------------------------------------------------------ the reward harness, through the command line

HARNESS_REWARDS = textwrap.dedent("""
    import ctypes, time

    def hangs(prompts, completions, **kw):
        time.sleep(60)

    def segfaults_on_some(prompts, completions, **kw):
        if len(completions) == 16 and completions[0] != completions[1]:
            ctypes.string_at(0)
        return [1.0 for c in completions]

    def nothing(prompts, completions, **kw):
        return [None for c in completions]
""")


def test_a_hanging_reward_stops_the_run_at_its_deadline(capsys, files):
    (files / "harness.py").write_text(HARNESS_REWARDS)
    start = time.monotonic()
    code = main(["grpo", "--output-dir", str(files / "out"), f"data.path={files / 'good.jsonl'}",
                 f"rewards=[{{function: '{files / 'harness.py'}:hangs'}}]", "steps=2", "reward_timeout=0.5", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "reward function 'hangs' timed out after 0.5s (reward_timeout) on sample 0 of" in err, err
    assert time.monotonic() - start < 60


def test_a_segfaulting_reward_in_a_worker_cannot_take_the_run_down(capsys, caplog, files):
    (files / "harness.py").write_text(HARNESS_REWARDS)
    code = main(["grpo", "--output-dir", str(files / "out"), f"data.path={files / 'good.jsonl'}",
                 f"rewards=[{{function: '{files / 'harness.py'}:segfaults_on_some'}}, {{function: accuracy}}]",
                 "steps=2", "reward_workers=1", "reward_on_error=skip", *TINY])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "'segfaults_on_some' crashed (the worker was killed by SIGSEGV) on a batch of 16 samples" in caplog.text
    records = [r for r in read_metrics(files / "out" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]


def test_a_reward_that_never_scores_stops_the_run(capsys, caplog, files):
    (files / "harness.py").write_text(HARNESS_REWARDS)
    code = main(["grpo", "--output-dir", str(files / "out"), f"data.path={files / 'good.jsonl'}",
                 f"rewards=[{{function: '{files / 'harness.py'}:nothing'}}]", "steps=5", *TINY])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "reward function 'nothing' could not score any of the 16 samples of this training batch" in caplog.text
    assert ("reward function 'nothing' returned None (could not score) for every sample of 3 training batches in a "
            "row") in err
    steps = [r["step"] for r in read_metrics(files / "out" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]
