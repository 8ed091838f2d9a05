"""Run by tests/test_distributed.py, in one process or under torchrun: a few GRPO cases, each one step,
recording the first update's summed gradient and the logged metrics (rank 0 writes them)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import policyopt.runtime.run as run_module
from policyopt.recipes.grpo import GRPOConfig, run_grpo
from policyopt.runtime.config import config_from_dict
from policyopt.runtime.metrics import read_metrics

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
CASES = {
    "seq_mean_token_mean": {},
    "token_mean+accum": {"loss_aggregation": "token_mean", "grad_accum_steps": 2},
    "seq_sum_constant+minibatches": {"loss_aggregation": "seq_sum_constant", "num_minibatches": 2,
                                     "update_epochs": 2},
    "beta+token_limit": {"beta": 0.05, "max_tokens_per_forward": 40},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
}


def main(out: str, strategy: str, reward: str, steps: int) -> None:
    captured = []
    apply_update = run_module.apply_update

    def recording(model, optimizer, scheduler, loss_value, max_norm):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
        grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]  # fsdp: gather shards
        captured.append(torch.cat([g.reshape(-1) for g in grads]).clone())
        return apply_update(model, optimizer, scheduler, loss_value, max_norm)

    run_module.apply_update = recording
    results = {}
    for name, overrides in CASES.items():
        captured.clear()
        data = {"output_dir": f"{out}/{name}", "steps": steps, "prompts_per_step": 8, "group_size": 4,
                "optim": {"lr": 3e-3, "warmup_steps": 0}, "eval_every": 0, "tensorboard": False,
                "rewards": [{"function": reward}], "sampling": {"max_new_tokens": 6},
                "data": {"eval_size": 16}, "model": {"tiny": TINY}, "save_every": steps,
                "distributed": {"strategy": strategy}, **overrides}
        run_grpo(config_from_dict(GRPOConfig, data))
        if not dist.is_initialized() or dist.get_rank() == 0:
            metrics = [r for r in read_metrics(Path(out) / name / "metrics.jsonl") if "loss" in r]
            torch.save({"grads": captured[0], "all_grads": list(captured), "metrics": metrics}, Path(out) / f"{name}.pt")
        results[name] = True
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(out) / "done.json").write_text(json.dumps(sorted(results)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
