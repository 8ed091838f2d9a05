"""The embedded default: a tiny model learns integer arithmetic on a CPU in minutes, and the demo shows
what reinforcement adds over more imitation.

1. Build a byte-level tokenizer and a tiny Llama-style model locally (no download).
2. SFT on a small, fixed set of demonstrations until its held-out accuracy plateaus: rounds of
   ``sft.eval_every`` steps (each resuming the last: same optimizer, data order and constant learning
   rate), held-out accuracy after each, stopping when it has not beaten its best for ``sft_patience``
   rounds or at ``sft.steps``. The best round's model is the checkpoint both branches start from.
3. GRPO from that checkpoint on fresh prompts that carry only what the verifier needs (the answer).
4. Control (``sft_control``): SFT continued from the same checkpoint on the same demonstrations for
   max(GRPO's steps, the SFT steps that fit in GRPO's training time at SFT's measured pace)
   (``control_config``; an SFT step is cheaper than a GRPO step, so the control takes more of them).
5. Both branches are also scored on a harder held-out set (``hard_extra_steps`` more operations than
   any demonstration or training prompt), where imitation and reinforcement may generalise differently.

The values are the demo preset's, ``policyopt/configs/demo.yaml``: ``demo_config()`` loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.arithmetic import ArithmeticTask, make_rows
from ..data.sources import EVAL_SEED_OFFSET
from ..evaluation import evaluate
from ..models.setup import ModelConfig, load_or_build
from ..models.tiny import TinyModelConfig, count_parameters
from ..rewards.combine import RewardSpec
from ..rewards.harness import RewardHarness
from ..runtime.config import load_config, save_config
from ..runtime.metrics import accuracy_by_training_time, read_metrics
from ..runtime.plots import plot_timeline
from ..runtime.run import check_output_dir
from .grpo import GRPOConfig, run_grpo
from .sft import SFTConfig, run_sft

PRESET = "demo"  # policyopt/configs/demo.yaml: the values `policyopt demo` runs with
PLATEAU_FILE = "plateau.json"  # in sft/: the SFT rounds so far, and whether SFT has stopped


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
    # SFT until its plateau: sft.eval_every steps per round, sft.steps at most; stop after this many
    # rounds in a row without a new best held-out accuracy
    sft_patience: int = 3
    sft: SFTConfig = field(default_factory=SFTConfig)  # the SFT stage (and the control)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # GRPO from the plateaued SFT model
    sft_control: bool = True  # also continue SFT for at least GRPO's steps and time, the baseline GRPO must beat
    # the harder held-out set: problems with this many more operations than `task` (0: none)
    hard_extra_steps: int = 1
    # auto: finish an interrupted demo (stages that finished are kept, the interrupted one resumes)
    resume: Literal["auto"] | None = None

    def validate(self) -> None:
        self.task.validate()
        self.tiny.validate()
        self.sft.validate()
        self.grpo.validate()
        if self.sft.data.path is not None or self.grpo.data.path is not None:
            raise ValueError("the demo runs on the built-in task; use `policyopt sft` / `policyopt grpo` for files")
        if self.sft.eval_every < 1 or self.sft_patience < 1:
            raise ValueError(f"the demo's SFT runs in rounds of sft.eval_every steps until sft_patience rounds "
                             f"bring no new best: both must be >= 1, got {self.sft.eval_every}, {self.sft_patience}")
        if self.hard_extra_steps < 0:
            raise ValueError(f"hard_extra_steps must be >= 0, got {self.hard_extra_steps}")
        if self.hard_extra_steps:
            self.hard_task().validate()

    def hard_task(self) -> ArithmeticTask:
        return dataclasses.replace(self.task, steps=self.task.steps + self.hard_extra_steps)


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


def sft_to_plateau(sft: SFTConfig, patience: int, resume: str | None) -> dict:
    """SFT in rounds of ``sft.eval_every`` steps, each resuming the previous round's checkpoint (optimizer,
    data order, schedule), held-out accuracy after each. Stops when ``patience`` rounds in a row bring no
    new best (``_round_rank``: accuracy, then held-out NLL), or at ``sft.steps``. The best round's model
    is copied to ``best/``. Returns the record kept in ``plateau.json``: every round's step, accuracy,
    NLL and training seconds, the best round, the start."""
    out = Path(sft.output_dir)
    record_path = out / PLATEAU_FILE
    record = {"rounds": [], "done": False}
    if resume is not None and record_path.exists():
        record = json.loads(record_path.read_text())
    rounds = record["rounds"]
    while not record["done"]:
        config = copy.deepcopy(sft)
        config.steps = min(sft.steps, (len(rounds) + 1) * sft.eval_every)
        config.eval_every, config.save_every = 0, sft.eval_every  # one evaluation per round: its final one
        config.resume = "auto" if rounds or resume is not None else None  # the last round's checkpoint
        summary = run_sft(config)
        if not rounds:
            record["accuracy_start"] = summary["accuracy_before"]
        rounds.append({"step": summary["steps"], "accuracy": summary["accuracy_after"],
                       "nll": summary["eval_nll_after"], "train_seconds": summary["train_seconds"]})
        best = max(range(len(rounds)), key=lambda i: _round_rank(rounds[i], i))
        if best == len(rounds) - 1:
            shutil.copytree(summary["model_dir"], out / "best", dirs_exist_ok=True)
        record.update(best_round=best, model_dir=str(out / "best"),
                      done=len(rounds) - 1 - best >= patience or summary["steps"] >= sft.steps)
        record_path.write_text(json.dumps(record, indent=2))
    return record


def _round_rank(round_: dict, index: int) -> tuple:
    """How SFT rounds compare: held-out accuracy first; at equal accuracy the lower held-out NLL (a tiny
    model sits at 0 accuracy for its first rounds while it learns the format, and must not be stopped
    there); then the earlier round."""
    return round_["accuracy"], -round_["nll"], -index


def heldout_accuracy(model_dir: str, rows: list[dict], max_new_tokens: int) -> float | None:
    """Greedy exact-answer accuracy of the model in ``model_dir`` on ``rows`` (None without rows)."""
    if not rows:
        return None
    model, tokenizer, device = load_or_build(ModelConfig(name_or_path=model_dir), [], seed=0)
    with RewardHarness.from_specs([RewardSpec("accuracy", 1.0)]) as accuracy:
        return evaluate(model, tokenizer, rows, accuracy, max_new_tokens, 256, device)["eval/accuracy"]


def _accuracy_by_time(stage_dir: Path, start_seconds: float) -> tuple[list[float], list[float]]:
    """(training seconds, held-out accuracy) at each evaluation of a stage (``accuracy_by_training_time``),
    its training time counted from ``start_seconds``."""
    points = accuracy_by_training_time(read_metrics(stage_dir / "metrics.jsonl"))
    return [start_seconds + t for t, _ in points], [accuracy for _, accuracy in points]


def stage_configs(config: DemoConfig, out: Path) -> tuple[SFTConfig, GRPOConfig]:
    """The demo's shared settings flowed into the SFT and GRPO stages' own configs."""
    sft = copy.deepcopy(config.sft)
    sft.output_dir, sft.seed = str(out / "sft"), config.seed
    sft.model.name_or_path, sft.model.tiny = None, config.tiny
    sft.data.task, sft.data.eval_size = config.task, config.eval_size
    sft.data.num_demonstrations = config.num_demonstrations
    sft.max_new_tokens = config.grpo.sampling.max_new_tokens
    sft.optim.lr_schedule = "constant_with_warmup"  # rounds of unknown number: no decay to a planned end
    grpo = copy.deepcopy(config.grpo)
    grpo.output_dir, grpo.seed = str(out / "grpo"), config.seed
    grpo.data.task, grpo.data.eval_size = config.task, config.eval_size
    return sft, grpo


def control_config(sft: SFTConfig, grpo: GRPOConfig, plateau: dict, grpo_train_seconds: float,
                   output_dir: Path) -> SFTConfig:
    """SFT continued from the best SFT round on the same demonstrations at the same constant rate, for
    max(GRPO's steps, the steps that fit in GRPO's training time at the SFT stage's own seconds per step):
    at least GRPO's number of updates, and GRPO's time at the pace SFT showed, fixed as a step count so
    that load from other processes while the control runs neither shortens nor lengthens it. A fresh
    optimizer with GRPO's warmup, as GRPO's."""
    last = plateau["rounds"][-1]
    sft_seconds_per_step = last["train_seconds"] / last["step"]
    control = copy.deepcopy(sft)
    control.output_dir, control.model.name_or_path = str(output_dir), plateau["model_dir"]
    control.steps = max(grpo.steps, round(grpo_train_seconds / sft_seconds_per_step))
    control.optim.warmup_steps = grpo.optim.warmup_steps
    evaluations = max(1, grpo.steps // grpo.eval_every) if grpo.eval_every else 1  # as many points as GRPO's
    control.eval_every = max(1, control.steps // evaluations)
    return control


def run_demo(config: DemoConfig) -> dict:
    start = time.perf_counter()
    out = Path(config.output_dir)
    check_output_dir(out, config.resume is not None, "demo", nested=True)  # before a stage drops a summary
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    sft, grpo = stage_configs(config, out)

    plateau = sft_to_plateau(sft, config.sft_patience, config.resume)  # 1-2. SFT until its plateau
    branch = plateau["rounds"][plateau["best_round"]]
    grpo.model.name_or_path = plateau["model_dir"]  # 3. GRPO from the best SFT round
    grpo_summary = _stage(run_grpo, grpo, config.resume)
    grpo_train_seconds = _accuracy_by_time(out / "grpo", 0.0)[0][-1]

    control_summary = None
    if config.sft_control:  # 4. same checkpoint, same demonstrations, same learning rate, >= GRPO's budget
        control = control_config(sft, grpo, plateau, grpo_train_seconds, out / "sft_control")
        control_summary = _stage(run_sft, control, config.resume)

    # 5. the harder held-out set: one more operand than anything trained on (demonstrations or prompts)
    hard_rows = (make_rows(config.eval_size, config.hard_task(), seed=config.seed + EVAL_SEED_OFFSET)
                 if config.hard_extra_steps else [])
    max_new = grpo.sampling.max_new_tokens
    summary = {
        "accuracy_sft_start": plateau["accuracy_start"],
        "accuracy_before": grpo_summary["accuracy_before"],
        "accuracy_after": grpo_summary["accuracy_after"],
        "accuracy_gain_points": 100 * (grpo_summary["accuracy_after"] - grpo_summary["accuracy_before"]),
        "accuracy_sft_control": control_summary["accuracy_after"] if control_summary else None,
        "hard_accuracy_before": heldout_accuracy(plateau["model_dir"], hard_rows, max_new),
        "hard_accuracy_after": heldout_accuracy(grpo_summary["model_dir"], hard_rows, max_new),
        "hard_accuracy_sft_control": (heldout_accuracy(control_summary["model_dir"], hard_rows, max_new)
                                      if control_summary else None),
        "hard_task": dataclasses.asdict(config.hard_task()) if hard_rows else None,
        "sft_steps": plateau["rounds"][-1]["step"], "sft_best_step": branch["step"],
        "sft_rounds": plateau["rounds"],
        "grpo_steps": grpo.steps, "grpo_train_seconds": grpo_train_seconds,
        "sft_control_steps": control_summary["steps"] if control_summary else None,
        "sft_control_train_seconds": control_summary["train_seconds"] if control_summary else None,
        "sft_seconds": plateau["rounds"][-1]["train_seconds"],
        "model_parameters": count_parameters(load_or_build(ModelConfig(name_or_path=plateau["model_dir"]), [],
                                                           seed=0)[0]),
        "seconds": time.perf_counter() - start,
        "seed": config.seed,
        "outputs": {"sft": plateau["model_dir"], "grpo": grpo.output_dir, "final_model": grpo_summary["model_dir"]},
    }
    _plot(out, plateau, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _plot(out: Path, plateau: dict, summary: dict) -> None:
    """SFT, GRPO and the control on one axis of training seconds; the harder set at the branch and the ends."""
    rounds, branch = plateau["rounds"], plateau["rounds"][plateau["best_round"]]
    curves = {"SFT (to its plateau)": ([0.0] + [r["train_seconds"] for r in rounds],
                                       [plateau["accuracy_start"]] + [r["accuracy"] for r in rounds])}
    branches = {"GRPO": ("grpo", "hard_accuracy_after")}
    if summary["accuracy_sft_control"] is not None:
        branches["SFT control (continued)"] = ("sft_control", "hard_accuracy_sft_control")
    hard = {}
    for label, (stage, hard_key) in branches.items():
        curves[label] = _accuracy_by_time(out / stage, branch["train_seconds"])
        if summary[hard_key] is not None:
            hard[f"{label}, harder set"] = ([branch["train_seconds"], curves[label][0][-1]],
                                            [summary["hard_accuracy_before"], summary[hard_key]])
    plot_timeline(curves, out / "curves.png", dashed=hard, branch_at=branch["train_seconds"],
                  title="demo: SFT to its plateau, then GRPO vs more SFT from the best SFT round")
