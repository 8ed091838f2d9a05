import pytest

from policyopt.cli import main
from policyopt.recipes.demo import DemoConfig
from policyopt.recipes.grpo import GRPOConfig
from policyopt.runtime.config import ConfigError, load_config


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nsampling:\n  temperature: 0.7\ndata:\n  task:\n    operators: '+-'\n")
    cfg = load_config(GRPOConfig, path, ["sampling.temperature=0.9", "group_size=4", "data.task.max_digits=3",
                                         "rewards=[{function: accuracy, weight: 2}]"])
    assert cfg.lr == 0.001 and cfg.sampling.temperature == 0.9 and cfg.group_size == 4
    assert cfg.data.task.operators == "+-" and cfg.data.task.max_digits == 3
    assert cfg.rewards[0].function == "accuracy" and cfg.rewards[0].weight == 2.0


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"sampling\.temprature.*did you mean sampling\.temperature"):
        load_config(GRPOConfig, None, ["sampling.temprature=0.5"])


def test_wrong_type_and_out_of_range_values():
    with pytest.raises(ConfigError, match="group_size must be an integer"):
        load_config(GRPOConfig, None, ["group_size=eight"])
    with pytest.raises(ConfigError, match="top_p"):
        load_config(GRPOConfig, None, ["sampling.top_p=1.5"])
    with pytest.raises(ConfigError, match="loss_aggregation"):
        load_config(GRPOConfig, None, ["loss_aggregation=sum"])


def test_batch_geometry_is_checked_up_front():
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(GRPOConfig, None, ["group_size=1"])
    with pytest.raises(ConfigError, match=r"minibatch_size \(48\) must divide.*64 \* 8 = 512"):
        load_config(GRPOConfig, None, ["minibatch_size=48"])
    with pytest.raises(ConfigError, match=r"grad_accum_steps \(3\) must divide minibatch_size \(128\)"):
        load_config(GRPOConfig, None, ["minibatch_size=128", "grad_accum_steps=3"])
    cfg = load_config(GRPOConfig, None, ["minibatch_size=128", "num_iterations=2"])
    assert cfg.optimizer_steps_per_step == 8


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GRPOConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(GRPOConfig, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(GRPOConfig, None, ["lr"])


def test_cli_print_config_applies_overrides(capsys):
    assert main(["demo", "--print-config", "--output-dir", "/tmp/x", "grpo.steps=7", "task.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "output_dir: /tmp/x" in out and "steps: 7" in out
    assert DemoConfig().grpo.steps != 7  # the override, not the default, produced that line


def test_cli_reports_user_errors_without_traceback(capsys, tmp_path):
    assert main(["grpo", "group_size=1"]) == 2
    err = capsys.readouterr().err
    assert "error: group_size must be >= 2" in err and "Traceback" not in err
    assert main(["grpo", "--output-dir", str(tmp_path), "model.name_or_path=./missing/model", "steps=1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overriding_one_key_of_a_section_keeps_that_sections_other_defaults():
    demo_default = DemoConfig().grpo
    cfg = load_config(DemoConfig, None, ["grpo.steps=7", "grpo.sampling.top_k=5"])
    assert cfg.grpo.steps == 7 and cfg.grpo.sampling.top_k == 5
    # the demo's own grpo defaults survive, not policyopt grpo's
    assert cfg.grpo.sampling.temperature == demo_default.sampling.temperature != GRPOConfig().sampling.temperature
    assert cfg.grpo.lr == demo_default.lr and cfg.grpo.eval_every == demo_default.eval_every
    assert cfg.task == DemoConfig().task
