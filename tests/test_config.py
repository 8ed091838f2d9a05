import typing
from dataclasses import dataclass, field

import pytest

from policyopt.cli import commands, main
from policyopt.recipes.demo import DemoConfig, demo_config
from policyopt.recipes.grpo import GRPOConfig
from policyopt.recipes.pipeline import PipelineConfig, pipeline_config
from policyopt.runtime.config import ConfigError, config_from_dict, config_keys, find_config, load_config, preset_names


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.001\nsampling:\n  temperature: 0.7\ndata:\n  task:\n    operators: '+-'\n")
    cfg = load_config(GRPOConfig, path, ["sampling.temperature=0.9", "group_size=4", "data.task.max_digits=3",
                                         "rewards=[{function: accuracy, weight: 2}]"])
    assert cfg.optim.lr == 0.001 and cfg.sampling.temperature == 0.9 and cfg.group_size == 4
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
    with pytest.raises(ConfigError, match=r"num_minibatches \(3\) must divide.*64 \* 8 = 512"):
        load_config(GRPOConfig, None, ["num_minibatches=3"])
    with pytest.raises(ConfigError, match=r"grad_accum_steps \(3\) must divide the minibatch \(128 answers\)"):
        load_config(GRPOConfig, None, ["num_minibatches=4", "grad_accum_steps=3"])
    cfg = load_config(GRPOConfig, None, ["num_minibatches=4", "update_epochs=2"])
    assert cfg.optimizer_steps_per_step == 8 and cfg.minibatch_size == 128


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
    assert demo_config().grpo.steps != 7  # the override, not the preset, produced that line


def test_cli_reports_user_errors_without_traceback(capsys, tmp_path):
    assert main(["grpo", "group_size=1"]) == 2
    err = capsys.readouterr().err
    assert "error: group_size must be >= 2" in err and "Traceback" not in err
    assert main(["grpo", "--output-dir", str(tmp_path), "model.name_or_path=./missing/model", "steps=1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overriding_one_key_of_a_section_keeps_that_sections_other_defaults():
    demo_default = demo_config().grpo
    for cfg in (demo_config(["grpo.steps=7", "grpo.sampling.top_k=5", "sft.optim.warmup_steps=0"]),
                load_config(DemoConfig, "demo", ["grpo.steps=7", "grpo.sampling.top_k=5", "sft.optim.warmup_steps=0"]),
                demo_config({"grpo": {"steps": 7, "sampling": {"top_k": 5}}, "sft": {"optim": {"warmup_steps": 0}}})):
        assert cfg.grpo.steps == 7 and cfg.grpo.sampling.top_k == 5 and cfg.sft.optim.warmup_steps == 0
        # the demo preset's grpo values survive, not policyopt grpo's defaults
        # (the demo's temperature, 0.7, is now also grpo's default, so its max_new_tokens tells them apart)
        assert cfg.grpo.sampling.max_new_tokens == demo_default.sampling.max_new_tokens \
            != GRPOConfig().sampling.max_new_tokens
        assert cfg.grpo.sampling.temperature == demo_default.sampling.temperature
        assert cfg.grpo.optim.lr == demo_default.optim.lr != GRPOConfig().optim.lr
        assert cfg.grpo.eval_every == demo_default.eval_every
        assert cfg.sft.optim.lr == demo_config().sft.optim.lr == 2e-3  # one key of a nested section
        assert cfg.task == demo_config().task


# ------------------------------------------------------------------ presets


def test_presets_are_found_by_name_and_unknown_names_list_them(tmp_path, monkeypatch):
    assert {"demo", "pipeline"} <= set(preset_names())
    assert find_config("demo").name == "demo.yaml" and find_config("pipeline.yaml").name == "pipeline.yaml"
    with pytest.raises(ConfigError, match=r"no preset is named 'dmeo' \(did you mean demo\?\); presets: .*demo"):
        load_config(DemoConfig, "dmeo")
    with pytest.raises(ConfigError, match="does not exist.*presets.*pipeline"):
        load_config(DemoConfig, tmp_path / "nope.yaml")
    (tmp_path / "demo").write_text("seed: 3\n")  # a file of that name wins over the preset
    monkeypatch.chdir(tmp_path)
    assert load_config(DemoConfig, "demo").seed == 3


def test_the_commands_with_presets_start_from_them(capsys):
    demo, pipeline = demo_config(), pipeline_config()
    assert demo.grpo.steps == 300 and demo.grpo.sampling.temperature == 0.7 and demo.task.steps == 3
    assert (pipeline.grpo.update_epochs, pipeline.grpo.num_minibatches, pipeline.grpo.minibatch_size) == (4, 2, 64)
    assert pipeline.ppo.rollout_size == pipeline.grpo.rollout_size == 128 and pipeline.ppo.group_size == 1
    assert pipeline.reward.data.builtin.num_prompts == 2000 and pipeline.reward.optim.lr == 1e-3
    # the presets are not the classes' defaults: DemoConfig() is the single commands' settings
    assert DemoConfig().grpo.steps == GRPOConfig().steps != demo.grpo.steps
    assert isinstance(PipelineConfig().ppo, commands()["ppo"].config)
    assert main(["demo", "--print-config"]) == 0
    assert "steps: 300" in capsys.readouterr().out
    assert main(["pipeline", "--print-config", "--config", "pipeline"]) == 0
    assert "missing_eos_penalty: 1.0" in capsys.readouterr().out


def test_a_bad_override_is_not_blamed_on_the_preset_file_but_a_bad_file_is(tmp_path):
    with pytest.raises(ConfigError) as error:
        demo_config(["grpo.group_size=1"])
    assert "group_size must be >= 2" in str(error.value) and "demo.yaml" not in str(error.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("group_size: 1\n")
    with pytest.raises(ConfigError, match=r"group_size must be >= 2.*\(in .*bad\.yaml\)"):
        load_config(GRPOConfig, bad, ["steps=3"])


# ------------------------------------------------------------------ every key documented


def test_every_key_of_every_command_has_a_meaning():
    """A field added without a comment (trailing, or the line above it) fails here."""
    missing = set()
    for name, command in commands().items():
        keys = config_keys(command.config)
        assert keys, name
        missing |= {f"{k.declared_in}.{k.key.split('.')[-1]}" for k in keys if not k.meaning.strip()}
    assert not missing, "config fields without a comment:\n" + "\n".join(sorted(missing))


def test_config_keys_are_dotted_typed_and_take_defaults_from_the_instance():
    keys = {k.key: k for k in config_keys(GRPOConfig)}
    for key in ("optim.lr", "sampling.temperature", "model.tiny.hidden_size", "data.task.max_digits", "rewards"):
        assert key in keys, key
    assert "optim" not in keys and not any(k.startswith("rewards.") for k in keys)  # sections, a list of specs
    assert keys["optim.lr"].type == "float" and keys["optim.lr"].default == GRPOConfig().optim.lr
    assert keys["rewards"].type == "list of RewardSpec"
    assert keys["loss_aggregation"].type.startswith("one of ") and "token_mean" in keys["loss_aggregation"].type
    assert keys["resume"].type == "str or null"
    assert keys["model.tiny.hidden_size"].type == "int"
    assert keys["optim.lr"].declared_in == "policyopt.runtime.optim.OptimConfig"
    assert keys["steps"].declared_in == "policyopt.recipes.rl.RLConfig"
    demo = {k.key: k for k in config_keys(demo_config())}
    assert demo["grpo.optim.lr"].default == 1e-3 and demo["sft.steps"].default == 1000  # the plateau rule's cap
    assert demo["resume"].type == "auto or null"


@dataclass
class _Inner:
    depth: int = 1  # how deep


@dataclass
class _Base:
    # the first of
    # two lines above
    alpha: float = 0.5
    choice: typing.Literal["a", "b"] = "a"  # pick one
    inner: _Inner = field(default_factory=_Inner)  # a section

    beta: int = 2


@dataclass
class _Child(_Base):
    alpha: float = 0.25  # the child's own comment
    choice: typing.Literal["a", "b"] = "b"
    gamma: list[_Inner] = field(
        default_factory=list
    )  # a list of sections is one key


def test_meanings_come_from_trailing_comments_the_lines_above_and_the_mro():
    base = {k.key: k for k in config_keys(_Base)}
    assert base["alpha"].meaning == "the first of two lines above"
    assert base["choice"].meaning == "pick one" and base["choice"].type == "one of a, b"
    assert base["inner.depth"].meaning == "how deep"
    assert base["beta"].meaning == ""  # a blank line separates it from the comment above
    child = {k.key: k for k in config_keys(_Child)}
    assert child["alpha"].meaning == "the child's own comment" and child["alpha"].default == 0.25
    assert child["choice"].meaning == "pick one" and child["choice"].default == "b"  # inherited comment
    assert child["gamma"].meaning == "a list of sections is one key" and child["gamma"].type == "list of _Inner"


def test_a_reward_given_as_a_string_or_a_list_of_strings():
    from policyopt.recipes.grpo import GRPOConfig

    one = config_from_dict(GRPOConfig, {}, ["rewards=my_rewards.py:correct"])
    assert [(r.function, r.weight, r.name) for r in one.rewards] == [("my_rewards.py:correct", 1.0, "correct")]
    two = config_from_dict(GRPOConfig, {}, ["rewards=[accuracy, {function: format, weight: 0.1}]"])
    assert [(r.function, r.weight) for r in two.rewards] == [("accuracy", 1.0), ("format", 0.1)]
    with pytest.raises(ConfigError, match="rewards"):
        config_from_dict(GRPOConfig, {}, ["rewards=3"])
