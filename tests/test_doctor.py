"""`policyopt doctor`, the warnings while training (runtime/advice.py), and the first-hour friction fixes."""

import json
import logging
import textwrap
import types

import pytest
import torch

from policyopt.cli import main
from policyopt.data.sources import DataConfig, PromptSource
from policyopt.recipes import doctor
from policyopt.recipes.grpo import GRPOConfig
from policyopt.recipes.sft import SFTConfig, run_sft
from policyopt.rewards.combine import RewardSpec
from policyopt.runtime.advice import PATIENCE, REPEAT_EVERY, advise
from policyopt.runtime.config import config_from_dict
from policyopt.runtime.run import headline_summary

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_layers=1",
        "model.tiny.intermediate_size=64"]
SMALL = ["prompts_per_step=4", "group_size=4", "sampling.max_new_tokens=6", "steps=5"]


@pytest.fixture()
def task(tmp_path):
    """A user's own task: count the letters, as a JSONL file, and reward functions in a file of their own."""
    data = tmp_path / "count.jsonl"
    with data.open("w") as f:
        for i in range(40):
            word = "ab"[i % 2] * (1 + i % 7)
            f.write(json.dumps({"prompt": f"how many letters: {word}", "answer": str(len(word)),
                                "completion": str(len(word))}) + "\n")
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(textwrap.dedent("""
        def exact(prompts, completions, answer, **columns):
            return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

        def always_zero(prompts, completions, **columns):
            return [0.0 for _ in completions]

        def prefers_wrong(prompts, completions, answer, **columns):  # its maximum is not the right answer
            return [0.5 if c.strip() == a else 1.0 for c, a in zip(completions, answer)]
    """))
    return data, rewards


def _doctor(capsys, *args) -> tuple[int, str]:
    code = main(["doctor", *args, *TINY])
    return code, capsys.readouterr().out


def test_doctor_passes_a_healthy_setup_and_reports_every_check(capsys, task):
    data, rewards = task
    code, out = _doctor(capsys, f"data.path={data}", f"rewards={rewards}:exact", *SMALL)
    assert code == 0, out
    assert "\nFATAL" not in out and " 0 FATAL" in out
    for line in ("OK    data", "OK    rewards", "OK    model", "OK    gold", "OK    sampling", "OK    logprobs",
                 "OK    microbatch", "OK    template", "INFO  geometry", "INFO  cost", "INFO  memory"):
        assert line in out, line
    assert '"exit_code": 0' in out
    # a fresh tiny model earns nothing: every group all-wrong, and the advice says what to change
    assert "WARN  sampling" in out and "sampling.temperature" in out and "SFT" in out


def test_doctor_sft_config(capsys, task):
    data, rewards = task
    code, out = _doctor(capsys, "sft", f"data.path={data}", f"rewards={rewards}:exact", "batch_size=4")
    assert code == 0, out
    assert "OK    data" in out and "eval/nll scores" in out and "INFO  cost" in out


def test_doctor_flags_a_reward_that_never_varies(capsys, task):
    data, rewards = task
    code, out = _doctor(capsys, f"data.path={data}", f"rewards={rewards}:always_zero", *SMALL)
    assert code == 1
    assert "FATAL rewards" in out and "never varies within a group" in out


def test_doctor_flags_a_gold_answer_below_the_maximum(capsys, task):
    data, rewards = task
    code, out = _doctor(capsys, f"data.path={data}", f"rewards={rewards}:prefers_wrong", *SMALL)
    assert code == 1
    assert "FATAL gold" in out and ("maximum is not the right answer" in out or "favours wrong answers" in out)


def test_doctor_on_a_missing_reward_file_exits_nonzero(capsys, task, tmp_path):
    data, _ = task
    code = main(["doctor", f"data.path={data}", f"rewards={tmp_path / 'nope.py'}:fn", *TINY, *SMALL])
    captured = capsys.readouterr()
    assert code != 0
    assert "nope.py" in captured.out + captured.err


def test_doctor_flags_a_sampler_trainer_logprob_mismatch(capsys, task, monkeypatch):
    data, rewards = task
    real = doctor.forward_rows

    def shifted(*args, **kwargs):  # a trainer whose log-probs are 0.1 nats off the sampler's
        logp, entropy, values = real(*args, **kwargs)
        return logp + 0.1, entropy, values

    monkeypatch.setattr(doctor, "forward_rows", shifted)
    code, out = _doctor(capsys, f"data.path={data}", f"rewards={rewards}:exact", *SMALL)
    assert code == 1
    assert "FATAL logprobs" in out and "differ by up to 0.1" in out


def test_doctor_flags_greedy_sampling(capsys, task):
    data, rewards = task
    code, out = _doctor(capsys, f"data.path={data}", f"rewards={rewards}:exact", *SMALL, "sampling.temperature=0")
    assert code == 1 and "FATAL sampling" in out


# ------------------------------------------------------------------ grpo's start-up check

def _actors(rows, tokenizer, model):
    source = types.SimpleNamespace(train_rows=rows, eval_rows=[])
    return types.SimpleNamespace(source=source, policy=model, tokenizer=tokenizer, device=torch.device("cpu"),
                                 autocast=None, reward_functions=[RewardSpec("accuracy").load(),
                                                                  RewardSpec("format", 0.1).load()])


def test_preflight_warns_when_builtin_rewards_do_not_fit_the_data(tokenizer, model, caplog):
    config = GRPOConfig()
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        warnings = doctor.preflight(_actors(rows, tokenizer, model), config)
    assert any("<answer>" in w and "greedy answers" in w for w in warnings), warnings
    assert torch.equal(torch.get_rng_state(), rng)  # the run it precedes is unchanged
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    no_answers = [{"prompt": f"{i}+1="} for i in range(8)]
    warnings = doctor.preflight(_actors(no_answers, tokenizer, model), config)
    assert any("'answer' column" in w for w in warnings), warnings


# ------------------------------------------------------------------ warnings while training

def _healthy(step):
    return {"reward/mean": 0.4, "reward/accuracy/mean": 0.4, "frac_reward_zero_std": 0.3, "entropy": 0.8,
            "clip_fraction": 0.02, "frac_finished": 0.97, "reward_failures": 0, "completion_length": 8.0}


def test_advice_stays_quiet_on_a_healthy_run():
    memory, config = {}, GRPOConfig()
    for step in range(1, 30):
        metrics = _healthy(step)
        assert advise(memory, step, metrics, config) == []
        assert not any(k.startswith("warn/") for k in metrics)
    # steps that trained nothing log entropy as null: not a collapse
    assert advise(memory, 30, {**_healthy(30), "entropy": float("nan")}, config) == []


@pytest.mark.parametrize("bad, rule, setting", [
    ({"frac_reward_zero_std": 0.98, "reward/mean": 0.004}, "zero_reward_spread", "sampling.temperature"),
    ({"entropy": 0.01}, "entropy_collapse", "optim.lr"),
    ({"clip_fraction": 0.6}, "clip_runaway", "optim.lr"),
    ({"kl": 0.9}, "kl_runaway", "beta"),
    ({"frac_finished": 0.2}, "answers_truncated", "sampling.max_new_tokens=16"),
])
def test_advice_warns_on_a_trend_once_then_every_n_steps(bad, rule, setting):
    memory, config = {}, GRPOConfig()
    advise(memory, 1, _healthy(1), config)  # the first entropy is remembered as the reference
    fired = {}
    for step in range(2, 2 + REPEAT_EVERY + PATIENCE + 2):
        metrics = {**_healthy(step), **bad}
        messages = advise(memory, step, metrics, config)
        if messages:
            fired[step] = messages[0]
        assert (f"warn/{rule}" in metrics) == (step >= 2 + PATIENCE - 1)
    first = 2 + PATIENCE - 1
    assert list(fired) == [first, first + REPEAT_EVERY], fired
    assert setting in fired[first]


def test_zero_spread_advice_suggests_a_kl_pull_only_when_there_is_none():
    sparse = {"frac_reward_zero_std": 0.98, "reward/mean": 0.004}
    messages = {}
    for beta in (0.0, 0.04):
        memory, config = {}, GRPOConfig(beta=beta)
        fired = [advise(memory, step, {**_healthy(step), **sparse}, config) for step in range(1, PATIENCE + 1)]
        messages[beta] = fired[-1][0]
    assert "beta=0.04 (now 0)" in messages[0.0]
    assert "beta=" not in messages[0.04]


def test_advice_warns_at_once_on_failing_or_silent_rewards():
    memory, config = {}, GRPOConfig()
    metrics = {**_healthy(1), "reward_failures": 3}
    assert "failed on 3 answers" in advise(memory, 1, metrics, config)[0] and metrics["warn/reward_failures"] == 1
    metrics = {**_healthy(2), "reward/accuracy/mean": float("nan")}
    assert "accuracy returned None" in advise(memory, 2, metrics, config)[0]
    metrics = {**_healthy(3), "reward/mean": float("nan")}
    assert "all None" in advise({}, 3, metrics, config)[0] and metrics["warn/reward_missing"] == 1


def test_advice_reaches_the_metrics_log_of_a_run(tmp_path, task):
    data, rewards = task
    from policyopt.recipes.grpo import run_grpo
    from policyopt.runtime.metrics import read_metrics

    config = config_from_dict(GRPOConfig, {
        "output_dir": str(tmp_path / "run"), "steps": PATIENCE, "prompts_per_step": 4, "group_size": 4,
        "eval_every": 0, "tensorboard": False, "data": {"path": str(data)},
        "rewards": [{"function": f"{rewards}:always_zero"}], "sampling": {"max_new_tokens": 4},
        "model": {"tiny": {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64}}})
    run_grpo(config)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert steps[-1]["warn/zero_reward_spread"] == 1 and "warn/zero_reward_spread" not in steps[0]


# ------------------------------------------------------------------ friction fixes

def test_summary_names_the_headline_for_what_it_is():
    custom = headline_summary({"eval/reward": 0.25, "eval/correct": 0.25}, {"eval/reward": 0.75})
    assert custom == {"accuracy_before": None, "accuracy_after": None, "reward_before": 0.25, "reward_after": 0.75}
    builtin = headline_summary({"eval/accuracy": 0.1, "eval/reward": 0.2}, {"eval/accuracy": 0.5, "eval/reward": 0.6})
    assert builtin["accuracy_before"] == 0.1 and builtin["accuracy_after"] == 0.5
    assert headline_summary({}, {})["reward_after"] is None


def test_max_rows_takes_a_subset_of_a_file_and_the_log_says_where_eval_rows_come_from(task, caplog):
    data, _ = task
    with caplog.at_level(logging.INFO):
        source = PromptSource(DataConfig(path=str(data), max_rows=20), seed=0)
    assert len(source.train_rows) + len(source.eval_rows) == 20 and len(source.eval_rows) == 4
    assert "4 rows held out of data.path" in caplog.text and "data.eval_path" in caplog.text
    with pytest.raises(ValueError, match="max_rows"):
        DataConfig(max_rows=-1).validate()


def _sft(tmp_path, name, path, **extra):
    settings = {"output_dir": str(tmp_path / name), "steps": 2, "batch_size": 4, "eval_every": 0,
                "tensorboard": False, "save_final": False, "data": {"path": str(path), **extra.pop("data", {})},
                "model": {"tiny": {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64}}}
    return run_sft(config_from_dict(SFTConfig, {**settings, **extra}))


def test_sft_eval_nll_only_scores_rows_with_completions(tmp_path, task, caplog):
    data, _ = task
    answers_only = tmp_path / "eval.jsonl"
    answers_only.write_text("".join(json.dumps({"prompt": f"how many letters: {'a' * k}", "answer": str(k)}) + "\n"
                                    for k in range(1, 6)))
    with caplog.at_level(logging.INFO):
        summary = _sft(tmp_path, "a", data, data={"eval_path": str(answers_only)})
    assert summary["eval_nll_after"] is None  # not the built-in template's NLL, silently
    assert "eval/nll not measured" in caplog.text
    assert "accuracy not measured" in caplog.text and "rewards=my_rewards.py:fn" in caplog.text
    assert summary["accuracy_after"] is None


def test_sft_defaults_to_grpos_rewards_when_the_data_uses_the_answer_template(tmp_path, caplog):
    data = tmp_path / "tagged.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1),
                                        "completion": f"<answer>{i + 1}</answer>"}) + "\n" for i in range(30)))
    with caplog.at_level(logging.INFO):
        summary = _sft(tmp_path, "b", data)
    assert summary["accuracy_after"] is not None and summary["eval_nll_after"] is not None
    assert "grpo's default rewards" in caplog.text and "eval/nll = mean negative log-likelihood" in caplog.text


def test_cli_silences_transformers_progress_bars_off_a_terminal(capsys):
    from transformers.utils import logging as transformers_logging

    try:
        assert main(["sft", "--print-config"]) == 0  # pytest's stderr is not a terminal
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
    capsys.readouterr()
