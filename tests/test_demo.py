"""The README's main job, exactly as a user runs it: `policyopt demo` with its defaults."""

import json

import pytest

from policyopt.cli import main


@pytest.mark.slow
def test_demo_defaults_raise_heldout_accuracy_by_30_points(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy_after"] == summary["accuracy_after"]
    # the claim the README makes: GRPO beats its SFT start by at least 30 points of held-out accuracy
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 0.30, summary
    assert 0 <= summary["accuracy_sft_control"] <= 1 and summary["sft_control_steps"] > 0
    for name in ("curves.png", "config.yaml", "grpo/metrics.jsonl", "grpo/final/model.safetensors",
                 "sft/final/tokenizer.json", "sft_control/summary.json"):
        assert (tmp_path / name).exists(), name
