"""The embedded default: a tiny model learns integer arithmetic on a CPU in minutes.

1. Build a byte-level tokenizer and a tiny Llama-style model locally (no download).
2. SFT warm start on a small, fixed set of demonstrations, kept deliberately short: a random
   model earns no reward, and a partial one leaves room to improve.
3. GRPO on fresh prompts that carry only what the verifier needs (the answer), scored 0/1.
4. Control: the same SFT continued on the same demonstrations for as long as GRPO ran, so the
   summary shows what the reward signal added over more imitation.

The values are the demo preset's, ``policyopt/configs/demo.yaml``: ``demo_config()`` loads it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.arithmetic import ArithmeticTask
from ..models.tiny import TinyModelConfig, count_parameters
from ..runtime.config import load_config, save_config
from ..runtime.plots import plot_run
from ..runtime.run import check_output_dir
from .grpo import GRPOConfig, run_grpo
from .sft import SFTConfig, run_sft

PRESET = "demo"  # policyopt/configs/demo.yaml: the values `policyopt demo` runs with


@dataclass
class DemoConfig:
    """The demo's settings. Its values come from the demo preset (``demo_config()``); the class defaults
    are the single commands' own, so ``DemoConfig()`` alone is not the demo."""

    output_dir: str = "runs/demo"  # the demo's summary and curves; its stages write to sft/, grpo/, sft_control/
    seed: int = 0  # one seed for every stage
    task: ArithmeticTask = field(default_factory=ArithmeticTask)  # the built-in arithmetic every stage uses
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # shape of the model built for SFT
    num_demonstrations: int = 300  # worked examples SFT learns from
    eval_size: int = 200  # held-out prompts for accuracy, never trained on
    sft: SFTConfig = field(default_factory=SFTConfig)  # the SFT warm start (and the control)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # GRPO from the SFT model
    sft_control: bool = True  # also continue SFT for GRPO's wall time, the baseline GRPO must beat
    # auto: finish an interrupted demo (stages that finished are kept, the interrupted one resumes)
    resume: Literal["auto"] | None = None

    def validate(self) -> None:
        self.task.validate()
        self.tiny.validate()
        self.sft.validate()
        self.grpo.validate()
        if self.sft.data.path is not None or self.grpo.data.path is not None:
            raise ValueError("the demo runs on the built-in task; use `policyopt sft` / `policyopt grpo` for files")


def demo_config(overrides: list[str] | Mapping | None = None) -> DemoConfig:
    """The demo preset with ``overrides`` (``key=value`` strings or a nested mapping) laid over it."""
    return load_config(DemoConfig, PRESET, overrides)


def _stage(run, config, resume: str | None) -> dict:
    """Run one stage; when resuming, a stage that finished before is read back, not run again."""
    done = Path(config.output_dir) / "summary.json"
    if resume is not None:
        if done.exists():
            return json.loads(done.read_text())
        config.resume = resume
    else:
        done.unlink(missing_ok=True)  # an earlier demo's: a later resume must not take it for this run's
    return run(config)


def _parameters(summary: dict) -> int:
    if "model" in summary:
        return count_parameters(summary["model"])
    from transformers import AutoModelForCausalLM  # a stage finished before a resume: count the saved model

    return count_parameters(AutoModelForCausalLM.from_pretrained(summary["model_dir"]))


def run_demo(config: DemoConfig) -> dict:
    start = time.perf_counter()
    out = Path(config.output_dir)
    check_output_dir(out, config.resume is not None, "demo", nested=True)  # before a stage drops a summary
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")

    # The demo's shared settings flow into each stage's own config.
    sft = copy.deepcopy(config.sft)
    sft.output_dir, sft.seed = str(out / "sft"), config.seed
    sft.model.name_or_path, sft.model.tiny = None, config.tiny
    sft.data.task, sft.data.eval_size = config.task, config.eval_size
    sft.data.num_demonstrations = config.num_demonstrations
    sft.max_new_tokens = config.grpo.sampling.max_new_tokens
    sft_summary = _stage(run_sft, sft, config.resume)
    sft_model_dir = sft_summary["model_dir"]

    grpo = copy.deepcopy(config.grpo)
    grpo.output_dir, grpo.seed = str(out / "grpo"), config.seed
    grpo.model.name_or_path = sft_model_dir
    grpo.data.task, grpo.data.eval_size = config.task, config.eval_size
    grpo_summary = _stage(run_grpo, grpo, config.resume)

    control_summary = None
    if config.sft_control:
        # Same demonstrations, same learning rate (held constant), for GRPO's wall time.
        control = copy.deepcopy(sft)
        control.output_dir = str(out / "sft_control")
        control.model.name_or_path = sft_model_dir
        control.steps, control.max_seconds = 10**9, grpo_summary["seconds"]
        control.optim.lr_schedule, control.optim.warmup_steps = "constant_with_warmup", 0
        control.save_final = False
        control_summary = _stage(run_sft, control, config.resume)

    summary = {
        "accuracy_sft_start": sft_summary["accuracy_before"],
        "accuracy_before": grpo_summary["accuracy_before"],
        "accuracy_after": grpo_summary["accuracy_after"],
        "accuracy_gain_points": 100 * (grpo_summary["accuracy_after"] - grpo_summary["accuracy_before"]),
        "accuracy_sft_control": control_summary["accuracy_after"] if control_summary else None,
        "sft_control_steps": control_summary["steps"] if control_summary else None,
        "grpo_steps": grpo.steps,
        "grpo_seconds": grpo_summary["seconds"],
        "sft_seconds": sft_summary["seconds"],
        "model_parameters": _parameters(sft_summary),
        "seconds": time.perf_counter() - start,
        "seed": config.seed,
        "outputs": {"sft": sft.output_dir, "grpo": grpo.output_dir, "final_model": grpo_summary["model_dir"]},
    }
    lines = {"SFT start": summary["accuracy_before"]}
    if control_summary:
        lines["SFT control (same time)"] = summary["accuracy_sft_control"]
    plot_run(out / "grpo" / "metrics.jsonl", out / "curves.png", title="demo: GRPO after an SFT warm start",
             reference_lines=lines)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
