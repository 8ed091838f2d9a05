"""Every command killed with SIGKILL and resumed with resume=auto reproduces the uninterrupted run.

Same ``metrics.jsonl`` record for record (wall-time keys aside) and bit-identical final weights, for
``sft``, ``reward``, ``ppo``, ``grpo`` and ``pipeline``.

The kill points need no hook in production code: each command runs in a fresh interpreter whose
PYTHONPATH starts with a directory holding the ``sitecustomize.py`` below. When
``POLICYOPT_TEST_KILL`` is set it patches, as each module finishes importing (so before
``runtime/run.py`` does ``from .checkpoint import save_training_checkpoint``):

* ``log:K[#N][:STAGE]`` -- ``MetricsLogger.log``: SIGKILL right after the N-th record (default the
  first) for step K is written and flushed, so ``metrics.jsonl`` holds a record newer than the newest
  checkpoint, which resume must drop;
* ``save:K[:STAGE]`` -- ``save_training_checkpoint``: at step K, SIGKILL once ``.tmp-step-K`` is
  fully written and before it is renamed to ``step-K``.

``STAGE`` limits the kill to the run whose output directory has that name (a pipeline stage). Kill
points count calls, never wall time. The kill takes the whole process group, so a pipeline dies
with its stage processes; each command therefore starts in a session of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from policyopt.runtime.checkpoint import list_checkpoints
from policyopt.runtime.metrics import read_metrics

pytestmark = pytest.mark.slow

KILL_ENV = "POLICYOPT_TEST_KILL"

SITECUSTOMIZE = textwrap.dedent('''
    """Test-only kill points for tests/test_resume.py; inert unless POLICYOPT_TEST_KILL is set."""
    import os

    _SPEC = os.environ.get("POLICYOPT_TEST_KILL")

    if _SPEC:
        import importlib.abc
        import signal
        import sys
        from pathlib import Path

        _where, _at, *_rest = _SPEC.split(":")
        _stage = _rest[0] if _rest else None
        _step, _, _nth = _at.partition("#")
        _step, _nth = int(_step), int(_nth or 1)
        _seen = [0]

        def _die():
            sys.stderr.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)

        def _in_stage(output_dir):
            return _stage is None or Path(output_dir).name == _stage

        def _patch_metrics(module):
            log = module.MetricsLogger.log

            def logged_then_killed(self, step, metrics):
                log(self, step, metrics)  # written and flushed
                if _where == "log" and step == _step and _in_stage(self.path.parent):
                    _seen[0] += 1
                    if _seen[0] == _nth:
                        _die()

            module.MetricsLogger.log = logged_then_killed

        def _patch_checkpoint(module):
            save = module.save_training_checkpoint

            def saved_up_to_the_rename(checkpoint_root, step, *args, **kwargs):
                if _where != "save" or step != _step or not _in_stage(Path(checkpoint_root).parent):
                    return save(checkpoint_root, step, *args, **kwargs)
                replace = module._replace

                def killed_before_rename(tmp, final):
                    if Path(tmp).name.startswith(".tmp-step-"):  # the training checkpoint, fully written
                        _die()
                    replace(tmp, final)

                module._replace = killed_before_rename
                try:
                    return save(checkpoint_root, step, *args, **kwargs)
                finally:
                    module._replace = replace

            module.save_training_checkpoint = saved_up_to_the_rename

        class _PatchOnImport(importlib.abc.MetaPathFinder):
            """Finds the module with the other finders, then patches it as soon as its body has run."""

            patches = {"policyopt.runtime.metrics": _patch_metrics,
                       "policyopt.runtime.checkpoint": _patch_checkpoint}

            def find_spec(self, name, path, target=None):
                patch = self.patches.get(name)
                if patch is None:
                    return None
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        break
                else:
                    return None
                exec_module = spec.loader.exec_module

                def exec_and_patch(module):
                    exec_module(module)
                    patch(module)

                spec.loader.exec_module = exec_and_patch  # this module's own loader instance
                return spec

        sys.meta_path.insert(0, _PatchOnImport())
''')

# wall time, not results: they differ between any two runs (checked against the records each recipe writes)
TIMING_KEYS = {"seconds_per_step", "generation_seconds", "tokens_per_second"}

STEPS = 6  # evaluations at step 0, at step 3 (eval_every=3) and the final one at 6
TINY = ["model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_layers=1"]
RUN = ["save_every=1", "keep_last=2", "eval_every=3", "tensorboard=false"]
RL = [f"steps={STEPS}", "data.eval_size=8", "sampling.max_new_tokens=6", "update_epochs=2", "num_minibatches=2",
      "optim.lr=1e-2", "optim.warmup_steps=2"]
COMMANDS = {
    "sft": [f"steps={STEPS}", "batch_size=8", "data.num_demonstrations=40", "data.eval_size=8",
            "max_new_tokens=6", "optim.lr=1e-2", "optim.warmup_steps=2"],
    # two passes over 12 prompts in batches of 4: 6 steps, the second pass (its own order) from step 4
    "reward": ["data.builtin.num_prompts=12", "data.builtin.eval_prompts=4", "epochs=2", "batch_size=4",
               "data.heldout_rl_size=8", "optim.lr=1e-2", "optim.warmup_steps=2"],
    # adaptive_kl: beta moves every step, so it must come back from the checkpoint
    "ppo": [*RL, "prompts_per_step=8", "adaptive_kl=true", "kl_target=0.1"],
    "grpo": [*RL, "prompts_per_step=2", "group_size=4", "beta=0.04"],
}
# the files in final/ compared tensor for tensor
WEIGHTS = {"sft": ["model.safetensors"], "reward": ["model.safetensors"], "grpo": ["model.safetensors"],
           "ppo": ["model.safetensors", "value_head.safetensors"]}

# killed, resumed and killed again, then resumed to the end. (b) on an evaluation step: step 3's
# record (with its evaluation) is in metrics.jsonl, .tmp-step-000003 is left behind, and the run
# resumes from step 2 mid-training. (a) after the final evaluation's record, once the last checkpoint
# is complete: that record is dropped and the resumed run has no step left to train, only the end.
# (A kill (a) mid-training leaves what (b) leaves, less the .tmp directory: no third interpreter start.)
KILLS = ["save:3", f"log:{STEPS}#2"]


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("kill_hooks")
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


def run_cli(hooks: Path, command: str, out: Path, args: list[str], kill: str | None = None,
            resume: bool = False) -> subprocess.CompletedProcess:
    """One ``policyopt`` command in a session of its own; ``kill``: a POLICYOPT_TEST_KILL spec."""
    cmd = [sys.executable, "-m", "policyopt.cli", command, "--output-dir", str(out), *args]
    if resume:
        cmd.append("resume=auto")
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])
    # one intra-op thread, as the pipeline's stages use: runs this small are many times faster with one
    # than with two threads on a busy machine, and every run of a comparison uses the same number
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True, timeout=900)


def comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(path)]


def assert_same_metrics(out: Path, reference: Path) -> None:
    got, want = comparable(out / "metrics.jsonl"), comparable(reference / "metrics.jsonl")
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{out}: metrics record {i} (step {w.get('step')}) differs from the uninterrupted run: " + str(
            {k: (g.get(k), w.get(k)) for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k)})
    assert len(got) == len(want), f"{out}: {len(got)} metrics records, the uninterrupted run has {len(want)}"


def assert_same_weights(out: Path, reference: Path, files: list[str]) -> None:
    for name in files:
        got, want = load_file(str(out / "final" / name)), load_file(str(reference / "final" / name))
        assert got.keys() == want.keys(), f"{out}/final/{name}: tensor names differ"
        for key in want:
            assert torch.equal(got[key], want[key]), (
                f"{out}/final/{name}: {key} differs from the uninterrupted run, max |diff| "
                f"{(got[key].double() - want[key].double()).abs().max().item():.3g}")


def parse_kill(spec: str) -> tuple[str, int, int, str | None]:
    where, at, *stage = spec.split(":")
    step, _, nth = at.partition("#")
    return where, int(step), int(nth or 1), stage[0] if stage else None


def assert_killed_where_asked(result: subprocess.CompletedProcess, out: Path, spec: str) -> None:
    """Killed by the signal, at the point asked for, with the traces a crash there leaves."""
    assert result.returncode == -signal.SIGKILL, (
        f"kill {spec}: exit status {result.returncode}, not -9\n{result.stderr[-3000:]}")
    where, step, _, _ = parse_kill(spec)
    root = out / "checkpoints"
    checkpoints = list_checkpoints(root)
    assert checkpoints, f"kill {spec}: no complete checkpoint to resume from"
    assert len(checkpoints) <= 2, f"kill {spec}: keep_last=2 but {len(checkpoints)} checkpoints"
    assert not (out / "summary.json").exists()
    if where == "save":
        assert (root / f".tmp-step-{step:06d}").is_dir(), f"kill {spec}: no .tmp-step-{step:06d} left behind"
        assert not (root / f"step-{step:06d}").exists()
        assert checkpoints[-1].name == f"step-{step - 1:06d}"
    else:  # metrics.jsonl holds a record that the newest checkpoint does not
        records = read_metrics(out / "metrics.jsonl")
        assert records[-1]["step"] == step
        assert len(records) > len(read_metrics(checkpoints[-1] / "metrics.jsonl"))


# ------------------------------------------------------------------ the single commands


@pytest.fixture(scope="module")
def references(hooks, tmp_path_factory):
    """Uninterrupted runs, one per command, made when a test first asks for it."""
    made: dict[str, Path] = {}

    def reference(command: str) -> Path:
        if command not in made:
            out = tmp_path_factory.mktemp("reference") / command
            result = run_cli(hooks, command, out, [*TINY, *RUN, *COMMANDS[command]])
            assert result.returncode == 0, result.stderr[-3000:]
            assert read_metrics(out / "metrics.jsonl")[-1]["step"] == STEPS  # the kill points exist
            made[command] = out
        return made[command]

    return reference


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_then_resume_matches_uninterrupted_run(hooks, references, command, tmp_path):
    reference = references(command)
    out = tmp_path / command
    args = [*TINY, *RUN, *COMMANDS[command]]
    for i, spec in enumerate(KILLS):
        killed = run_cli(hooks, command, out, args, kill=spec, resume=i > 0)
        assert_killed_where_asked(killed, out, spec)
    resumed = run_cli(hooks, command, out, args, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_metrics(out, reference)
    assert_same_weights(out, reference, WEIGHTS[command])


@pytest.mark.parametrize("command", [*COMMANDS, "pipeline"])
def test_fresh_run_refuses_to_mix_with_old_checkpoints(command, tmp_path, capsys):
    """In this process (the check comes before any model loads): saves five interpreter starts."""
    from policyopt.cli import main

    out = tmp_path / "run"
    checkpoint = out / ("sft" if command == "pipeline" else "") / "checkpoints" / "step-000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    args = PIPELINE if command == "pipeline" else [*TINY, *RUN, *COMMANDS[command]]
    code = main([command, "--output-dir", str(out), *args])
    stderr = capsys.readouterr().err
    assert code == 2 and "resume=auto" in stderr, stderr[-3000:]


# ------------------------------------------------------------------ the pipeline

# PPO and GRPO see the same 8 answers per step for the same 4 steps; every stage checkpoints each step
PIPELINE = [
    # stages in the pipeline's own process: the same resume path (stage_result.json, resume=auto per
    # stage) at a fraction of the interpreter starts; test_pipeline.py runs isolated stages
    "isolate_stages=false",
    "tiny.hidden_size=32", "tiny.num_heads=2", "tiny.num_layers=1", "run_ppo_separate_critic=false",
    "eval_size=16", "num_demonstrations=32",
    "sft.steps=4", "reward.data.builtin.num_prompts=40", "reward.data.builtin.eval_prompts=8",  # reward: 5 steps
    "ppo.steps=4", "grpo.steps=4", "ppo.prompts_per_step=8", "grpo.prompts_per_step=1", "grpo.group_size=8",
    *[f"{stage}.{key}" for stage in ("sft", "reward", "ppo", "grpo")
      for key in ("save_every=1", "eval_every=2", "tensorboard=false")],
]
PIPELINE_STAGES = {"sft": WEIGHTS["sft"], "reward": WEIGHTS["reward"], "ppo": WEIGHTS["ppo"], "grpo": WEIGHTS["grpo"]}
# (b) inside the reward stage (sft is complete), then (a) inside GRPO on an evaluation step (sft, reward
# and ppo are complete)
PIPELINE_KILLS = ["save:3:reward", "log:2:grpo"]


@pytest.fixture(scope="module")
def pipeline_reference(hooks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "pipeline"
    result = run_cli(hooks, "pipeline", out, PIPELINE)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_pipeline_killed_in_two_stages_resumes_in_the_stage_it_stopped_in(hooks, pipeline_reference, tmp_path):
    out = tmp_path / "pipeline"
    for i, spec in enumerate(PIPELINE_KILLS):
        stage = parse_kill(spec)[3]
        finished = {name: (out / name / "final" / "model.safetensors").stat().st_mtime_ns
                    for name in PIPELINE_STAGES if (out / name / "summary.json").exists()}
        killed = run_cli(hooks, "pipeline", out, PIPELINE, kill=spec, resume=i > 0)
        assert_killed_where_asked(killed, out / stage, spec)
        assert not (out / "summary.json").exists()
        if i > 0:  # the stage the previous run was killed in continued from its checkpoint
            assert f"resumed from {out / parse_kill(PIPELINE_KILLS[i - 1])[3]}" in killed.stderr
        for name, mtime in finished.items():  # complete stages are read back, not run again
            assert (out / name / "final" / "model.safetensors").stat().st_mtime_ns == mtime, f"{name} ran again"
    finished = {name: (out / name / "final" / "model.safetensors").stat().st_mtime_ns
                for name in PIPELINE_STAGES if (out / name / "summary.json").exists()}
    assert set(finished) == {"sft", "reward", "ppo"}
    resumed = run_cli(hooks, "pipeline", out, PIPELINE, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'grpo'}" in resumed.stderr
    for name, mtime in finished.items():
        assert (out / name / "final" / "model.safetensors").stat().st_mtime_ns == mtime, f"{name} ran again"
    assert (out / "summary.json").exists() and (out / "report.md").exists()
    for name, files in PIPELINE_STAGES.items():
        assert_same_metrics(out / name, pipeline_reference / name)
        assert_same_weights(out / name, pipeline_reference / name, files)
