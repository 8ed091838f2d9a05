"""GRPO with its answers sampled by a colocated vLLM engine (vLLM's CPU build): the reward rises, the
engine-vs-trainer mismatch is logged every step, and the truncated IS correction is on."""

import textwrap

import pytest

# vllm.entrypoints, not vllm: under pytest this folder (tests/vllm, no __init__) is itself importable as
# a namespace package "vllm" where the real one is not installed
pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (the vLLM tests run in .venv-vllm: "
                    "scripts/setup_vllm.sh)")

from policyopt.recipes.grpo import GRPOConfig, run_grpo  # noqa: E402
from policyopt.runtime.config import config_from_dict  # noqa: E402
from policyopt.runtime.metrics import read_metrics  # noqa: E402

TINY_32 = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}  # head_dim 32


@pytest.mark.slow
def test_grpo_through_vllm_learns_and_logs_the_mismatch(tmp_path):
    reward = tmp_path / "rewards.py"
    reward.write_text(textwrap.dedent("""
        def starts_with_digit(prompts, completions, **columns):
            return [1.0 if c[:1].isdigit() else 0.0 for c in completions]
    """))
    config = config_from_dict(GRPOConfig, {
        "output_dir": str(tmp_path / "run"), "steps": 20, "prompts_per_step": 16, "group_size": 8,
        "optim": {"lr": 1e-2, "warmup_steps": 0}, "eval_every": 0, "tensorboard": False,
        "rewards": [{"function": f"{reward}:starts_with_digit"}], "sampling": {"max_new_tokens": 6},
        "data": {"eval_size": 16}, "model": {"tiny": TINY_32},
        "rollout": {"engine": "vllm", "vllm": {"kv_cache_gib": 1}},
    })
    run_grpo(config)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert len(records) == 20
    first = sum(r["reward/mean"] for r in records[:4]) / 4
    last = sum(r["reward/mean"] for r in records[-4:]) / 4
    print(f"reward {first:.3f} -> {last:.3f}; mismatch per step (mean |delta|):",
          [f"{r['mismatch/abs_logp_diff']:.1e}" for r in records])
    assert last > first + 0.1, (first, last)
    for r in records:
        # fp32 engine and trainer: the same weights, other kernels (see test_vllm_engine's tolerance)
        assert r["mismatch/abs_logp_diff"] < 1e-4 and r["mismatch/max_abs_diff"] < 1e-3
        assert abs(r["mismatch/ess"] - 1) < 1e-4 and abs(r["mismatch/is_weight_mean"] - 1) < 1e-4
        assert r["mismatch/kl"] < 1e-6 and r["mismatch/is_truncated_fraction"] == 0
    synced = [r for r in records if "rollout/sync_seconds" in r]
    assert len(synced) == 20  # one weight sync per step (the first replaces the engine's dummy weights)
    assert all(r["rollout/sync_probe_gap"] < 1e-4 for r in synced)
