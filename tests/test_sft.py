import json

import pytest

from policyopt.cli import main
from policyopt.data.loading import DataError
from policyopt.recipes.sft import SFTConfig, run_sft
from policyopt.runtime.config import config_from_dict
from policyopt.runtime.metrics import read_metrics

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def test_sft_on_builtin_demonstrations_lowers_heldout_nll(tmp_path):
    cfg = config_from_dict(SFTConfig, {"output_dir": str(tmp_path), "steps": 40, "batch_size": 16, "optim": {"lr": 5e-3},
                                       "eval_every": 0, "tensorboard": False, "model": {"tiny": TINY},
                                       "data": {"num_demonstrations": 64, "eval_size": 16}})
    summary = run_sft(cfg)
    assert summary["eval_nll_after"] < summary["eval_nll_before"] - 1.0
    assert summary["accuracy_before"] == 0.0 and summary["steps"] == 40
    for name in ("summary.json", "config.yaml", "curves.png", "initial/config.json", "final/config.json"):
        assert (tmp_path / name).exists(), name


def test_sft_time_budget_stops_early(tmp_path):
    cfg = config_from_dict(SFTConfig, {"output_dir": str(tmp_path), "steps": 10**6, "max_seconds": 0.5,
                                       "eval_every": 0, "tensorboard": False, "save_final": False,
                                       "model": {"tiny": TINY}, "data": {"num_demonstrations": 32, "eval_size": 8}})
    summary = run_sft(cfg)
    assert 0 < summary["steps"] < 10**6 and summary["model_dir"] is None


def test_sft_cli_on_a_user_file_with_chat_messages(tmp_path):
    data = tmp_path / "demos.jsonl"
    with data.open("w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"echo {i}"}],
                                "completion": [{"role": "assistant", "content": f"{i}"}]}) + "\n")
    out = tmp_path / "run"
    assert main(["sft", "--output-dir", str(out), f"data.path={data}", "steps=5", "batch_size=4",
                 "tensorboard=false", "model.tiny.hidden_size=32", "model.tiny.num_heads=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_nll_after"] is not None and summary["accuracy_after"] is None
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 5


def test_sft_file_without_completions_is_a_clear_error(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl.*completion"):
        run_sft(config_from_dict(SFTConfig, {"output_dir": str(tmp_path / "o"), "data": {"path": str(data)}}))
