"""`policyopt CMD --help`: every config key with its default and meaning, and examples that work."""

import shlex

import pytest

from policyopt.cli import commands, config_help, default_config, main
from policyopt.runtime.config import config_keys, format_value

COMMANDS = list(commands())


def _help(capsys, name: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_key_with_its_default_and_meaning(capsys, name):
    text = _help(capsys, name)
    for option in ("--config", "--output-dir", "--print-config", "--resume"):
        assert option in text, option
    flat = " ".join(text.split())  # meanings are wrapped over lines
    for key in config_keys(default_config(name)):
        assert f"  {key.key} = {format_value(key.default)}  ({key.type})" in text, key.key
        assert " ".join(key.meaning.split()) in flat, key.key


def test_grpo_help_shows_the_new_keys_and_not_the_refused_one(capsys):
    text = _help(capsys, "grpo")
    assert "optim.lr = 0.0005  (float)" in text and "peak learning rate" in text
    assert "one of seq_mean_token_mean, token_mean, seq_sum_constant" in text
    assert "grpo.lr" not in text  # the old help's example, refused by the config


def test_presets_defaults_are_shown_in_help():
    assert "grpo.steps = 300  (int)" in config_help("demo")
    assert "ppo.missing_eos_penalty = 1.0" in config_help("pipeline")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_example_in_the_help_is_accepted(capsys, name):
    command = commands()[name]
    assert 2 <= len(command.examples) <= 3
    text = config_help(name)
    for _, args in command.examples:
        assert f"policyopt {name} {shlex.join(args)}" in text
        assert main([name, *args, "--print-config"]) == 0, args
    capsys.readouterr()


@pytest.mark.parametrize("name", COMMANDS)
def test_resume_for_every_command_sets_resume_auto(capsys, name):
    assert main([name, "--print-config", "--resume"]) == 0
    assert "\nresume: auto\n" in capsys.readouterr().out


def test_options_and_overrides_mix_in_any_order(capsys):
    assert main(["grpo", "steps=5", "--resume", "optim.lr=1e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "lr: 0.0001" in out and "resume: auto" in out


def test_a_refused_override_is_one_line_naming_the_key(capsys):
    assert main(["grpo", "--print-config", "grpo.lr=1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("policyopt grpo: error: unknown config key grpo") and "\n" not in err
    assert main(["demo", "--config", "nopreset"]) == 2
    err = capsys.readouterr().err
    assert "no preset is named 'nopreset'" in err and "demo" in err and "pipeline" in err
