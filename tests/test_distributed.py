"""Several processes (torchrun, gloo on the CPU): the same run as one process, up to float summation order.

Each torchrun test starts two real ranks. The gradients are compared after the ranks summed them, so
a per-rank normaliser (a token mean over one rank's tokens), an estimator that sees one rank's
rewards, or a missing all-reduce shows up as a mismatch far above the tolerance.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from policyopt.data.batching import encode_prompts
from policyopt.rollout.sampling import SamplingConfig, answer_noise, sample_completions
from policyopt.runtime.distributed import DistributedConfig, World, init_world
from policyopt.runtime.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
# float32 sums taken in another order (per rank, then across ranks) differ by a few ulps per term;
# a normaliser that counted one rank's batch instead of the whole one would be off by ~2x
RELATIVE = 1e-5
# GRPO's first loss is -mean(A) = 0 up to rounding: terms of size ~1 cancel, leaving ~1e-8 of noise
# that depends on the summation order, so metrics are compared with this absolute slack as well
ABSOLUTE = 1e-6


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(textwrap.dedent("""
        def digit_count(prompts, completions, **columns):
            # graded, so most groups have reward spread from the first step
            return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    """))
    return f"{path}:digit_count"


def _run(args: list[str], ranks: int, timeout: int = 600) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]


def _compare_cases(one: Path, two: Path) -> None:
    names = sorted(p.stem for p in one.glob("*.pt"))
    assert len(names) == 5 and names == sorted(p.stem for p in two.glob("*.pt"))
    for name in names:
        a, b = torch.load(one / f"{name}.pt"), torch.load(two / f"{name}.pt")
        scale = float(a["grads"].norm())
        assert scale > 0, f"{name}: no gradient at all; the test would prove nothing"
        assert float((a["grads"] - b["grads"]).norm()) <= RELATIVE * scale, name
        for key in ("loss", "reward/mean", "grad_norm"):
            x, y = a["metrics"][0][key], b["metrics"][0][key]
            assert abs(x - y) <= RELATIVE * abs(x) + ABSOLUTE, (name, key, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_process_gradients(tmp_path, reward_file, strategy):
    """Every loss aggregation, gradient accumulation, minibatches with two epochs, the KL term with a
    token budget per forward, and REINFORCE++'s batch-wide normalisation."""
    _run([str(WORKER), str(tmp_path / "one"), "ddp", reward_file, "1"], ranks=1)
    _run([str(WORKER), str(tmp_path / "two"), strategy, reward_file, "1"], ranks=2)
    _compare_cases(tmp_path / "one", tmp_path / "two")


def _cli(out: Path, reward: str, *extra: str) -> list[str]:
    return ["-m", "policyopt", "grpo", f"output_dir={out}", "steps=12", "prompts_per_step=16", "group_size=4",
            "optim.lr=3e-3", "optim.warmup_steps=0", "eval_every=6", "tensorboard=false", "save_every=6",
            "sampling.max_new_tokens=6", "sampling.temperature=0.7", "data.eval_size=32", f"rewards={reward}",
            "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64", *extra]


@pytest.mark.slow
def test_a_run_on_two_ranks_follows_the_one_process_run_and_resumes_exactly(tmp_path, reward_file):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_cli(one, reward_file), ranks=1)
    _run(_cli(two, reward_file, "distributed.world_size=2"), ranks=2)
    steps_one = [r for r in read_metrics(one / "metrics.jsonl") if "reward/mean" in r]
    steps_two = [r for r in read_metrics(two / "metrics.jsonl") if "reward/mean" in r]
    assert len(steps_one) == len(steps_two) == 12
    # Same answers on both (the per-answer noise streams): rewards agree to float rounding while the
    # weights still agree; a token flipped by rounding may later make the runs drift, never by much.
    for key in ("reward/mean", "loss", "grad_norm"):
        x, y = steps_one[0][key], steps_two[0][key]
        assert abs(x - y) <= RELATIVE * abs(x) + ABSOLUTE, (key, x, y)
    last_one = sum(r["reward/mean"] for r in steps_one[-4:]) / 4
    last_two = sum(r["reward/mean"] for r in steps_two[-4:]) / 4
    assert abs(last_one - last_two) < 0.05, (last_one, last_two)
    assert not list(two.glob("**/rank*"))  # only rank 0 wrote: one metrics file, one set of checkpoints

    # Resume with two ranks from the step-6 checkpoint: steps 7..12 again, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "final")
    checkpoint = resumed / "checkpoints" / "step-000006"
    shutil.rmtree(resumed / "checkpoints" / "step-000012")
    _run(_cli(resumed, reward_file, f"resume={checkpoint}"), ranks=2)
    from safetensors.torch import load_file

    a = load_file(two / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = (lambda records: [{k: v for k, v in r.items() if "second" not in k} for r in records])
    assert timeless(read_metrics(two / "metrics.jsonl")) == timeless(read_metrics(resumed / "metrics.jsonl"))


def test_a_launcher_that_started_the_wrong_number_of_processes_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match=r"world_size=2.*one of 1.*torchrun --nproc_per_node 2"):
        init_world(DistributedConfig(world_size=2))


def test_ranks_share_each_minibatch_and_find_their_rows():
    items = list(range(16))
    shares = [World(rank, 2).share(items, pieces=2) for rank in range(2)]
    # minibatch m of the one-process run (items 8m..8m+7) is split between the ranks, half each
    assert shares == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    for rank in range(2):
        world = World(rank, 2)
        places = world.places(8, pieces=2)
        assert places.tolist() == shares[rank]
        minibatch = torch.tensor([15, 0, 4, 9])
        local = world.local_rows(minibatch, places)
        assert [shares[rank][i] for i in local.tolist()] == [i for i in minibatch.tolist() if i in shares[rank]]
    with pytest.raises(ValueError, match="do not split"):
        World(0, 3).share(items, pieces=2)


def test_an_answer_does_not_depend_on_the_prompts_beside_it(model, tokenizer):
    """The per-answer noise: prompt 7's answers are the same alone or in a batch, first or second."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    texts = ["3+4=", "1+2+5="]

    def answers(prompts, keys):
        ids, mask, _ = encode_prompts(tokenizer, prompts, 32, torch.device("cpu"))
        rollout = sample_completions(model, ids, mask, 3, sampling,
                                     tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     noise=answer_noise(5, keys, 3, sampling.max_new_tokens))
        return [tokenizer.decode(rollout.completion_ids[i][rollout.completion_mask[i].bool()])
                for i in range(len(prompts) * 3)]

    both = answers(texts, [6, 7])
    alone = answers(texts[1:], [7])
    assert both[3:] == alone
    swapped = answers(texts[::-1], [7, 6])
    assert swapped[:3] == alone and swapped[3:] == both[:3]
    assert answers(texts[1:], [8]) != alone  # another key, other answers (3 answers x 8 tokens: no tie)


def _preferences(path: Path) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"<answer>{a + b}</answer>", "rejected": f"<answer>{a + b + 1}</answer>"}
            for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reward", "ppo"])
def test_the_other_recipes_on_two_ranks_match_one_process(tmp_path, reward_file, command):
    """The first steps' loss and grad norm of SFT, the reward model and PPO (whitening over every rank's
    tokens, one permutation of the whole batch) on 2 ranks equal the one-process run's."""
    tiny = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64", "tensorboard=false", "optim.warmup_steps=0", "eval_every=0"]
    extra = {"sft": ["steps=3", "batch_size=16", "data.num_demonstrations=64", "data.eval_size=16"],
             "reward": ["epochs=1", "batch_size=16", f"data.path={_preferences(tmp_path / 'prefs.jsonl')}",
                        "data.eval_size=16"],
             "ppo": ["steps=3", "prompts_per_step=16", "num_minibatches=2", "update_epochs=2",
                     "sampling.max_new_tokens=6", "data.eval_size=16", f"rewards={reward_file}"]}[command]
    for ranks in (1, 2):
        _run(["-m", "policyopt", command, f"output_dir={tmp_path / str(ranks)}", *tiny, *extra], ranks=ranks)
    one = [r for r in read_metrics(tmp_path / "1" / "metrics.jsonl") if "loss" in r and r["step"] > 0]
    two = [r for r in read_metrics(tmp_path / "2" / "metrics.jsonl") if "loss" in r and r["step"] > 0]
    assert len(one) == len(two) >= 3
    for key in ("loss", "grad_norm"):
        x, y = one[0][key], two[0][key]
        assert abs(x - y) <= RELATIVE * abs(x) + ABSOLUTE, (command, key, x, y)


@pytest.mark.slow
def test_a_sharded_run_resumes_exactly(tmp_path, reward_file):
    """FSDP2: checkpoints hold whole tensors gathered from the shards (model and AdamW state), and a
    2-rank run resumed from its step-2 checkpoint ends with the uninterrupted run's weights, bit for bit."""
    args = ["steps=4", "save_every=2", "prompts_per_step=8", "group_size=4", "optim.lr=3e-3", "optim.warmup_steps=0",
            "eval_every=0", "tensorboard=false", "sampling.max_new_tokens=6", "data.eval_size=16",
            f"rewards={reward_file}", "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64", "distributed.strategy=fsdp", "distributed.world_size=2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(["-m", "policyopt", "grpo", f"output_dir={whole}", *args], ranks=2)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    _run(["-m", "policyopt", "grpo", f"output_dir={resumed}", *args,
          f"resume={resumed / 'checkpoints' / 'step-000002'}"], ranks=2)
    from safetensors.torch import load_file

    a, b = load_file(whole / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = (lambda records: [{k: v for k, v in r.items() if "second" not in k} for r in records])
    assert timeless(read_metrics(whole / "metrics.jsonl")) == timeless(read_metrics(resumed / "metrics.jsonl"))
