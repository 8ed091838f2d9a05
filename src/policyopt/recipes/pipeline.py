"""The whole RLHF pipeline on the built-in task, and what its RL algorithms cost.

1. SFT: a tiny model learns the answer format (and some arithmetic) from demonstrations.
2. Reward model: the SFT policy samples K answers per fresh prompt; a rule labeller ranks them
   (correct above wrong, shorter correct above longer); a scalar head on the SFT backbone learns the
   preferences with Bradley-Terry, and its pairwise accuracy is measured on held-out noise-free pairs.
3. PPO from the SFT policy, scored by the learned reward model, with the seed's four models: policy,
   reference, reward model, and a value model, here a head on the policy's backbone.
4. The same PPO with the value model as a separate transformer (the reward model's backbone with a
   zero head, as InstructGPT initialises its critic from the reward model).
5. GRPO from the same SFT policy, scored by the same reward model: no value model.

The RL stages share the optimisation schedule (answers per step, steps, passes and minibatches,
learning rate, sampling), so what differs is how advantages are estimated, and at what cost. The
exact-answer accuracy is computed at weight 0: logged and evaluated on held-out prompts, never trained
on. Each stage runs in a fresh process (``isolate_stages``), so its memory is its own; a sampler thread
records the peak memory of every step (process RSS on a CPU, ``torch.cuda.max_memory_allocated`` on a
GPU). The report (``summary.json``, ``report.md``, ``curves.png``) holds only numbers this run measured.

The values are the pipeline preset's, ``policyopt/configs/pipeline.yaml``: ``pipeline_config()`` loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import resource
import signal
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..data.arithmetic import ArithmeticTask
from ..models.tiny import TinyModelConfig
from ..rewards.combine import REWARD_MODEL_PREFIX, RewardSpec
from ..runtime.config import config_from_dict, load_config, save_config
from ..runtime.metrics import accuracy_by_training_time, read_metrics
from ..runtime.run import check_output_dir
from ..runtime.signals import StopRequests, TrainingInterrupted
from .grpo import GRPOConfig, run_grpo
from .ppo import PPOConfig, run_ppo
from .reward_model import RewardModelConfig, run_reward_model
from .sft import SFTConfig, run_sft

log = logging.getLogger(__name__)

STAGES = {
    "sft": (SFTConfig, run_sft),
    "reward": (RewardModelConfig, run_reward_model),
    "ppo": (PPOConfig, run_ppo),
    "grpo": (GRPOConfig, run_grpo),
}


PRESET = "pipeline"  # policyopt/configs/pipeline.yaml: the values `policyopt pipeline` runs with


@dataclass
class PipelineConfig:
    """The pipeline's settings. Its values come from the pipeline preset (``pipeline_config()``); the
    class defaults are the single commands' own, so ``PipelineConfig()`` alone is not the pipeline."""

    output_dir: str = "runs/pipeline"  # the report; each stage writes to a folder of its own in here
    seed: int = 0  # one seed for every stage
    task: ArithmeticTask = field(default_factory=ArithmeticTask)  # the built-in arithmetic every stage uses
    sft: SFTConfig = field(default_factory=SFTConfig)  # stage 1: SFT of a tiny model on demonstrations
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)  # stage 2: the reward model
    ppo: PPOConfig = field(default_factory=PPOConfig)  # stages 3-4: PPO (value head; separate critic)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # stage 5: GRPO
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # shape of the model built for SFT
    num_demonstrations: int = 300  # worked examples SFT learns from
    eval_size: int = 200  # held-out prompts for accuracy, never used for training by any stage
    run_ppo: bool = True  # run PPO with the value model as a head on the policy's backbone
    # PPO a second time with the critic as a separate transformer (the reward model's backbone, a zero
    # head): the layout the "GRPO is cheaper without a value model" claim is about
    run_ppo_separate_critic: bool = True
    run_grpo: bool = True  # run GRPO (no value model)
    isolate_stages: bool = True  # each stage in a fresh process: memory numbers are that stage's own
    torch_threads: int = 1  # intra-op threads per stage (tiny models: 1 is fastest on a CPU); 0: torch's default
    memory_sample_seconds: float = 0.005  # how often the sampler thread reads the process's memory
    # auto: continue an interrupted pipeline in the stage it was stopped in (finished stages are kept)
    resume: Literal["auto"] | None = None

    def __post_init__(self) -> None:
        self.share_settings()

    def share_settings(self) -> None:
        """Copy the pipeline-wide settings (task, held-out size, model shape) into every stage's config."""
        self.sft.model.tiny = self.tiny
        self.sft.data.num_demonstrations = self.num_demonstrations
        self.sft.max_new_tokens = self.grpo.sampling.max_new_tokens
        self.reward.data.heldout_rl_size = self.eval_size
        self.reward.data.builtin.max_new_tokens = self.grpo.sampling.max_new_tokens
        for stage in (self.sft, self.reward, self.ppo, self.grpo):
            stage.seed = self.seed
            stage.data.task = self.task
        for stage in (self.sft, self.ppo, self.grpo):
            stage.data.eval_size = self.eval_size

    def validate(self) -> None:
        self.task.validate()
        self.tiny.validate()
        for stage in (self.sft, self.reward, self.ppo, self.grpo):
            stage.validate()
        if self.sft.data.path is not None or self.reward.data.path is not None:
            raise ValueError("the pipeline runs on the built-in task; use the single commands for files")
        ppo_answers, grpo_answers = self.ppo.rollout_size, self.grpo.rollout_size
        if ppo_answers != grpo_answers or self.ppo.steps != self.grpo.steps:
            raise ValueError(f"PPO and GRPO must see the same answers per step ({ppo_answers} vs {grpo_answers}) "
                             f"for the same steps ({self.ppo.steps} vs {self.grpo.steps}) to be compared")
        if self.torch_threads < 0 or not self.memory_sample_seconds > 0:
            raise ValueError("torch_threads must be >= 0 and memory_sample_seconds > 0")


def pipeline_config(overrides: list[str] | Mapping | None = None) -> PipelineConfig:
    """The pipeline preset with ``overrides`` (``key=value`` strings or a nested mapping) laid over it."""
    return load_config(PipelineConfig, PRESET, overrides)


def run_pipeline(config: PipelineConfig) -> dict:
    start = time.perf_counter()
    out = Path(config.output_dir).resolve()
    check_output_dir(out, config.resume is not None, "pipeline", nested=True)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    config.share_settings()
    if config.resume is None:
        for stage in out.glob(f"*/{STAGE_RESULT}"):
            stage.unlink()  # an earlier pipeline's: a later resume must not take it for this run's
    save_config(config, out / "config.yaml")

    # 1. SFT warm start on demonstrations of the task, from a tiny model built on them.
    sft = copy.deepcopy(config.sft)
    sft.output_dir, sft.model.name_or_path = str(out / "sft"), None
    sft_result = _run_stage("sft", sft, config)
    sft_dir = sft_result["summary"]["model_dir"]

    # 2. Reward model on the SFT policy's own answers, labelled by rule; its backbone starts from SFT.
    reward = copy.deepcopy(config.reward)
    reward.output_dir, reward.model.name_or_path, reward.data.builtin.policy = str(out / "reward"), sft_dir, sft_dir
    reward_result = _run_stage("reward", reward, config)
    rm_dir = reward_result["summary"]["model_dir"]

    # 3-5. PPO (value head on the policy; a separate critic) and GRPO from the same SFT policy, all
    # scored by the learned reward model only.
    rewards = [RewardSpec(f"{REWARD_MODEL_PREFIX}{rm_dir}", 1.0, name="rm"),
               RewardSpec("accuracy", 0.0)]  # weight 0: evaluated and logged, never trained on
    separate = copy.deepcopy(config.ppo)
    separate.value_model, separate.value_model_path, separate.value_head_init = "separate", rm_dir, "zero"
    results = {}
    for name, enabled, recipe, stage in (("ppo", config.run_ppo, "ppo", copy.deepcopy(config.ppo)),
                                         ("ppo_separate_critic", config.run_ppo_separate_critic, "ppo", separate),
                                         ("grpo", config.run_grpo, "grpo", copy.deepcopy(config.grpo))):
        if not enabled:
            continue
        stage.output_dir, stage.model.name_or_path, stage.rewards = str(out / name), sft_dir, rewards
        results[name] = _run_stage(recipe, stage, config)

    # The report: every number in it was measured in this run.
    summary = _summarise(config, out, sft_result, reward_result, results, time.perf_counter() - start)
    _plot(out, results, summary)
    (out / "report.md").write_text(_report(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------ running a stage, measuring memory


def _common_lines(a: bytes, b: bytes) -> int:
    """Bytes of the complete lines ``a`` and ``b`` begin with in common."""
    common = 0
    for x, y in zip(a.splitlines(keepends=True), b.splitlines(keepends=True)):
        if x != y or not x.endswith(b"\n"):
            break
        common += len(x)
    return common


class StepMemoryProbe(threading.Thread):
    """Sample memory every ``interval`` seconds and cut the samples into the recipe's steps.

    A step ends when its record appears in ``metrics.jsonl`` (the recipes flush one line per step),
    so no recipe needs to know it is being measured. Per window: the peak and starting process RSS
    (MB) and, on a GPU, the peak of ``torch.cuda.max_memory_allocated`` (reset at each boundary).
    Windows whose record holds no ``seconds_per_step`` are set-up or evaluation, not training steps.
    """

    def __init__(self, metrics_path: Path, interval: float, cuda: bool):
        super().__init__(daemon=True)
        self.metrics_path, self.interval, self.cuda = metrics_path, interval, cuda
        self.windows: list[dict] = []
        self._done = threading.Event()
        import psutil

        self._process = psutil.Process()

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _read(self) -> bytes:
        try:
            return self.metrics_path.read_bytes()
        except FileNotFoundError:
            return b""

    def _file(self) -> tuple[int | None, int, int]:
        try:
            stat = self.metrics_path.stat()
        except FileNotFoundError:
            return None, 0, 0
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def run(self) -> None:
        last = self._file()
        seen = self._read()  # lines already there belong to an earlier run
        partial = ""
        start_rss = peak_rss = self._rss_mb()
        window_start = time.perf_counter()
        while True:
            stopping = self._done.wait(self.interval)
            peak_rss = max(peak_rss, self._rss_mb())
            current = self._file()
            if current != last:
                last, data = current, self._read()
                if data.startswith(seen):  # appended to
                    new = data[len(seen):]
                elif seen.startswith(data):
                    # cut back (a resumed recipe copying its checkpoint's records over the file, possibly
                    # caught mid-copy), or a new file not written yet: nothing new; keep what was seen, so
                    # the records that come back are still known as old
                    new, data = b"", seen
                else:
                    # rewritten: the lines it shares with what was seen are old (a resumed recipe's
                    # records up to its checkpoint), the rest is new (a fresh file shares none)
                    new, partial = data[_common_lines(seen, data):], ""
                seen = data
                partial += new.decode(errors="replace")
                *lines, partial = partial.split("\n")
                for line in lines:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    window = {"step": record.get("step"), "train_step": "seconds_per_step" in record,
                              "seconds": time.perf_counter() - window_start,
                              "start_rss_mb": start_rss, "peak_rss_mb": peak_rss}
                    if self.cuda:
                        window["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
                        torch.cuda.reset_peak_memory_stats()
                    self.windows.append(window)
                    start_rss = peak_rss = self._rss_mb()
                    window_start = time.perf_counter()
            if stopping:
                return

    def stop(self) -> list[dict]:
        self._done.set()
        self.join()
        return self.windows


def _stage_body(name: str, config_dict: dict, threads: int, interval: float) -> dict:
    """Run one recipe under the memory probe; returns its JSON-able summary and measurements."""
    if threads:
        torch.set_num_threads(threads)
    config_cls, run = STAGES[name]
    config = config_from_dict(config_cls, config_dict)
    cuda = torch.cuda.is_available() and config.model.device in ("auto", "cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics_path = Path(config.output_dir) / "metrics.jsonl"
    probe = StepMemoryProbe(metrics_path, interval, cuda)
    probe.start()
    started = time.perf_counter()
    try:
        summary = run(config)
    finally:
        windows = probe.stop()
    summary = {k: v for k, v in summary.items() if k not in ("model", "tokenizer")}
    return {"summary": summary, "memory": windows, "wall_seconds": time.perf_counter() - started,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "device": "cuda" if cuda else "cpu"}


def _stage_child(name: str, config_dict: dict, threads: int, interval: float, result_path: str) -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = _stage_body(name, config_dict, threads, interval)
    except TrainingInterrupted as exc:  # SIGTERM or Ctrl-C: the stage saved its state; the parent says so
        Path(result_path).write_text(json.dumps({"interrupted": exc.signum, "checkpoint": str(exc.checkpoint)}))
        return
    except BaseException as exc:  # reported by the parent, with the stage's name
        Path(result_path).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    Path(result_path).write_text(json.dumps(result, default=str))


def _die_with_parent() -> None:
    """Have the kernel send this stage SIGTERM if the pipeline process dies (Linux), so a killed pipeline
    leaves no orphan training on, and the stage checkpoints before it exits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


STAGE_RESULT = "stage_result.json"  # written when a stage has finished; a resumed pipeline reads it back


def _run_stage(name: str, stage_config, config: PipelineConfig) -> dict:
    """Run one stage, or read back its result when a resumed pipeline finished it before; the stage a
    pipeline was stopped in continues from its newest checkpoint."""
    directory = Path(stage_config.output_dir)
    done = directory / STAGE_RESULT
    if config.resume is not None:
        if done.exists():
            log.info("pipeline: %s stage finished before (%s)", name, directory)
            return json.loads(done.read_text())
        stage_config.resume = "auto"  # from its newest checkpoint; from the start when it has none
    log.info("pipeline: %s stage -> %s", name, directory)
    config_dict = dataclasses.asdict(stage_config)
    if config.isolate_stages:
        result = _run_isolated(name, config_dict, config)
    else:
        previous = torch.get_num_threads()
        try:
            result = _stage_body(name, config_dict, config.torch_threads, config.memory_sample_seconds)
        finally:
            torch.set_num_threads(previous)
    result["resumed"] = config.resume is not None
    directory.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(done)
    return result


def _run_isolated(name: str, config_dict: dict, config: PipelineConfig) -> dict:
    """``_stage_body`` in a fresh process; SIGTERM or Ctrl-C here is passed on, so the stage checkpoints."""
    import multiprocessing

    directory = Path(config_dict["output_dir"])
    result_path = directory.with_suffix(".result.json")
    directory.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    process = multiprocessing.get_context("spawn").Process(
        target=_stage_child, args=(name, config_dict, config.torch_threads, config.memory_sample_seconds,
                                   str(result_path)))
    with StopRequests() as stop:
        process.start()
        forwarded = False
        while process.is_alive():
            process.join(0.2)
            if stop.requested and not forwarded:
                os.kill(process.pid, signal.SIGTERM)
                forwarded = True
    result = json.loads(result_path.read_text()) if result_path.exists() else {"error": f"exit code {process.exitcode}"}
    result_path.unlink(missing_ok=True)
    if "interrupted" in result:
        raise TrainingInterrupted(result["interrupted"], result["checkpoint"])
    if "error" in result:
        raise RuntimeError(f"pipeline stage {name} failed: {result['error']}")
    return result


# ------------------------------------------------------------------ the report


WINDOW = 10  # steps averaged for the "first" and "last" training numbers


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def accuracy_at(points: list[tuple[float, float]], seconds: float) -> tuple[float, float] | None:
    """(t, accuracy) of the last evaluation at or before ``seconds`` of training -- a step function, not an
    interpolation: what a run stopped at that time had last measured. None before the first evaluation."""
    before = [point for point in points if point[0] <= seconds]
    return tuple(before[-1]) if before else None


def _rl_summary(result: dict, out: Path, name: str) -> dict:
    summary = result["summary"]
    records = read_metrics(out / name / "metrics.jsonl")
    train = [r for r in records if "seconds_per_step" in r]
    by_time = accuracy_by_training_time(records)
    windows = [w for w in result["memory"] if w["train_step"]]
    seconds = [r["seconds_per_step"] for r in train]
    peaks = [w["peak_rss_mb"] for w in windows]
    growth = [w["peak_rss_mb"] - w["start_rss_mb"] for w in windows]
    report = {
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "accuracy_gain_points": 100 * (summary["accuracy_after"] - summary["accuracy_before"]),
        "rm_score_first_steps": _mean([r["reward/mean"] for r in train[:WINDOW]]),
        "rm_score_last_steps": _mean([r["reward/mean"] for r in train[-WINDOW:]]),
        "train_accuracy_first_steps": _mean([r.get("reward/accuracy/mean") for r in train[:WINDOW]]),
        "train_accuracy_last_steps": _mean([r.get("reward/accuracy/mean") for r in train[-WINDOW:]]),
        "eval_history": summary["eval_history"],
        "accuracy_by_training_time": [list(point) for point in by_time],  # [seconds, accuracy] per evaluation
        # evaluations excluded; summed in the order accuracy_by_training_time sums, so its final evaluation's
        # t is this number exactly and the shortest stage is read at its final evaluation
        "training_seconds": sum(seconds),
        "steps": len(train),
        "seconds_per_step_median": _median(seconds),
        "seconds_per_step_mean": _mean(seconds),
        "generation_seconds_per_step_median": _median([r["generation_seconds"] for r in train]),
        "tokens_per_second_median": _median([r["tokens_per_second"] for r in train]),
        "peak_rss_mb_per_step_median": _median(peaks),
        "peak_rss_mb_per_step_max": max(peaks) if peaks else None,
        "rss_growth_mb_per_step_median": _median(growth),
        "rss_growth_mb_per_step_max": max(growth) if growth else None,
        "stage_seconds": result["wall_seconds"],
        "resumed": result.get("resumed", False),  # memory and time then cover the steps after the resume
        "value_model": summary.get("value_model", "none"),
        "device": result["device"],
        "threads": result["threads"],
    }
    cuda = [w["peak_cuda_allocated_mb"] for w in windows if "peak_cuda_allocated_mb" in w]
    if cuda:
        report["peak_cuda_allocated_mb_per_step_median"] = _median(cuda)
        report["peak_cuda_allocated_mb_per_step_max"] = max(cuda)
    if result.get("isolated"):
        report["process_peak_rss_mb"] = result["process_peak_rss_mb"]
    return report


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarise(config: PipelineConfig, out: Path, sft: dict, reward: dict, results: dict, seconds: float) -> dict:
    rm = reward["summary"]
    summary = {
        "task": dataclasses.asdict(config.task),
        "seed": config.seed,
        "sft": {"accuracy_after": sft["summary"]["accuracy_after"], "steps": sft["summary"]["steps"],
                "seconds": sft["wall_seconds"]},
        "reward_model": {
            "heldout_pairwise_accuracy": rm["pairwise_accuracy_after"],
            "heldout_pairwise_accuracy_before_training": rm["pairwise_accuracy_before"],
            "heldout_pairwise_accuracy_by_kind": {k.split("/")[-1]: v for k, v in rm["eval_after"].items()
                                                  if k.startswith("eval/pairwise_accuracy/")},
            "heldout_pairs": rm["eval_pairs"], "heldout_prompts": rm["eval_prompts"],
            "train_pairs": rm["train_pairs"], "train_prompts": rm["train_prompts"], "steps": rm["steps"],
            "reward_mean": rm["reward_mean"], "reward_std": rm["reward_std"], "seconds": reward["wall_seconds"],
        },
        "answers_per_step": config.grpo.prompts_per_step * config.grpo.group_size,
        "isolated_stages": config.isolate_stages,
        "steps_averaged_for_first_and_last": WINDOW,
        "memory_sample_seconds": config.memory_sample_seconds,
    }
    for name, result in results.items():
        result["isolated"] = config.isolate_stages
        summary[name] = _rl_summary(result, out, name)
    if results:
        summary["equal_time"] = _equal_time(summary, list(results))
    if "grpo" in summary:
        # ratios for time and peaks; a plain difference for the within-step growth, which is often ~0 MB
        grpo = summary["grpo"]
        for name in ("ppo", "ppo_separate_critic"):
            if name not in summary:
                continue
            ppo, versus = summary[name], {}
            for key in ("seconds_per_step_median", "peak_rss_mb_per_step_median",
                        "peak_cuda_allocated_mb_per_step_median", "process_peak_rss_mb"):
                if ppo.get(key) is not None and grpo.get(key):
                    versus[f"{key}_ratio"] = ppo[key] / grpo[key]
            if ppo.get("rss_growth_mb_per_step_median") is not None and grpo.get("rss_growth_mb_per_step_median") is not None:
                versus["rss_growth_mb_per_step_median_difference"] = (ppo["rss_growth_mb_per_step_median"]
                                                                      - grpo["rss_growth_mb_per_step_median"])
            summary[f"{name}_vs_grpo"] = versus
    summary["seconds"] = seconds
    return summary


EQUAL_TIME_RULE = "the last evaluation at or before the budget (a step function, not interpolated)"


def _equal_time(summary: dict, names: list[str]) -> dict:
    """The equal-compute budget -- the shortest RL stage's training seconds, evaluations excluded -- and each
    stage's held-out accuracy at it (``accuracy_at``); written into each stage's summary too."""
    budget_stage = min(names, key=lambda n: summary[n]["training_seconds"])
    budget = summary[budget_stage]["training_seconds"]
    for name in names:
        point = accuracy_at(summary[name]["accuracy_by_training_time"], budget)
        summary[name]["accuracy_at_equal_time"] = point[1] if point else None
        summary[name]["accuracy_at_equal_time_measured_at_seconds"] = point[0] if point else None
    return {"budget_seconds": budget, "budget_stage": budget_stage, "rule": EQUAL_TIME_RULE}


def _plot(out: Path, results: dict, summary: dict) -> None:
    """``curves.png``: held-out accuracy against the step and against training seconds (equal samples, equal
    compute) on top; the reward model's score, seconds per step and peak memory per step below."""
    import matplotlib.pyplot as plt

    from ..runtime import plots  # noqa: F401  (selects the Agg backend)

    fig, axes = plt.subplot_mosaic([["accuracy"] * 3 + ["accuracy_by_time"] * 3,
                                    ["reward"] * 2 + ["seconds"] * 2 + ["memory"] * 2], figsize=(14, 8))
    for name, result in results.items():
        _plot_stage(axes, name, result, read_metrics(out / name / "metrics.jsonl"), summary[name])
    sft_accuracy = summary["sft"]["accuracy_after"]
    for key in ("accuracy", "accuracy_by_time"):
        axes[key].axhline(sft_accuracy, linestyle="--", color="gray", label=f"SFT start: {sft_accuracy:.3f}")
    if "equal_time" in summary:
        budget = summary["equal_time"]["budget_seconds"]
        axes["accuracy_by_time"].axvline(budget, linestyle=":", color="black",
                                         label=f"equal-time budget: {budget:.1f} s")
    cuda = any("peak_cuda_allocated_mb_per_step_median" in summary.get(n, {}) for n in results)
    memory_unit = "MB (CUDA allocated)" if cuda else "MB (process RSS)"
    titles = {"accuracy": ("held-out exact-answer accuracy (greedy), by step", "step", "accuracy"),
              "accuracy_by_time": ("the same accuracy against training time: equal compute", "training seconds "
                                   "(sum of seconds per step; evaluations excluded)", "accuracy"),
              "reward": ("learned reward model score (normalised), sampled answers", "step", "RM score"),
              "seconds": ("seconds per step", "step", "seconds"),
              "memory": ("peak memory per training step", "step", memory_unit)}
    for key, (title, xlabel, ylabel) in titles.items():
        axes[key].set_title(title, fontsize=10)
        axes[key].set_xlabel(xlabel)
        axes[key].set_ylabel(ylabel)
        axes[key].grid(alpha=0.3)
        axes[key].legend(fontsize=8)
    fig.suptitle(f"PPO vs GRPO from one SFT policy, scored by one learned reward model "
                 f"({summary['answers_per_step']} answers per step)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


STAGE_COLORS = {"ppo": "tab:orange", "ppo_separate_critic": "tab:red", "grpo": "tab:blue"}


def _plot_stage(axes: dict, name: str, result: dict, records: list[dict], stage_summary: dict) -> None:
    """One RL stage's curves on every panel of ``_plot``."""
    style = {"color": STAGE_COLORS[name], "label": STAGE_LABELS[name]}
    train = [r for r in records if "seconds_per_step" in r]
    evals = [r for r in records if r.get("eval/accuracy") is not None]
    steps = [r["step"] for r in train]
    axes["reward"].plot(steps, [r["reward/mean"] for r in train], **style)
    axes["accuracy"].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], marker="o", **style)
    by_time = stage_summary["accuracy_by_training_time"]
    axes["accuracy_by_time"].plot([t for t, _ in by_time], [a for _, a in by_time], marker="o", **style)
    axes["seconds"].plot(steps, [r["seconds_per_step"] for r in train], **style)
    windows = [w for w in result["memory"] if w["train_step"]]
    key = "peak_cuda_allocated_mb" if windows and "peak_cuda_allocated_mb" in windows[0] else "peak_rss_mb"
    axes["memory"].plot([w["step"] for w in windows], [w[key] for w in windows], **style)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


STAGE_LABELS = {"ppo": "PPO (value head)", "ppo_separate_critic": "PPO (separate critic)", "grpo": "GRPO"}


def _report(summary: dict) -> str:
    rm, task = summary["reward_model"], summary["task"]
    lines = [
        "# Pipeline report: SFT -> reward model -> PPO and GRPO",
        "",
        (f"Task: built-in arithmetic, operands of {task['min_digits']} to {task['max_digits']} digits, operators "
         f"`{task['operators']}`, {task['steps']} operations per problem; seed {summary['seed']}. Every number "
         "here was measured by this run and is in `summary.json`."),
        "",
        f"- SFT: held-out accuracy {_fmt(summary['sft']['accuracy_after'])} after {summary['sft']['steps']} steps.",
        f"- Reward model: held-out pairwise accuracy {_fmt(rm['heldout_pairwise_accuracy'])} on {rm['heldout_pairs']} "
        f"noise-free pairs of {rm['heldout_prompts']} unseen prompts (before training: "
        f"{_fmt(rm['heldout_pairwise_accuracy_before_training'])}); by kind: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in rm["heldout_pairwise_accuracy_by_kind"].items())
        + f". Trained on {rm['train_pairs']} pairs from {rm['train_prompts']} prompts in {rm['steps']} steps.",
        f"- RL: every stage starts from the SFT policy, is scored by the reward model alone and sees "
        f"{summary['answers_per_step']} sampled answers per step; exact-answer accuracy is only measured.",
        "",
    ]
    rl = [n for n in STAGE_LABELS if n in summary]
    if rl:
        lines += ["| | " + " | ".join(STAGE_LABELS[n] for n in rl) + " |", "|---|" + "---|" * len(rl)]
        rows = [
            ("held-out accuracy, SFT start", "accuracy_before", 3),
            ("held-out accuracy, after RL", "accuracy_after", 3),
            ("gain (points)", "accuracy_gain_points", 1),
            ("training seconds (sum of seconds per step; evaluations excluded)", "training_seconds", 1),
            ("held-out accuracy at the equal-time budget", "accuracy_at_equal_time", 3),
            ("... measured at training second (that evaluation)", "accuracy_at_equal_time_measured_at_seconds", 1),
            ("RM score of sampled answers, first steps", "rm_score_first_steps", 3),
            ("RM score of sampled answers, last steps", "rm_score_last_steps", 3),
            ("exact-answer accuracy of sampled answers, first steps", "train_accuracy_first_steps", 3),
            ("exact-answer accuracy of sampled answers, last steps", "train_accuracy_last_steps", 3),
            ("seconds per step (median)", "seconds_per_step_median", 3),
            ("generation seconds per step (median)", "generation_seconds_per_step_median", 3),
            ("peak RSS per step, MB (median)", "peak_rss_mb_per_step_median", 1),
            ("RSS growth within a step, MB (median)", "rss_growth_mb_per_step_median", 1),
            ("peak CUDA allocated per step, MB (median)", "peak_cuda_allocated_mb_per_step_median", 1),
            ("process peak RSS, MB", "process_peak_rss_mb", 1),
            ("stage wall time, s", "stage_seconds", 1),
        ]
        for label, key, digits in rows:
            if any(key in summary[n] for n in rl):
                lines.append(f"| {label} | " + " | ".join(_fmt(summary[n].get(key), digits) for n in rl) + " |")
        lines.append("")
        lines.append(f"(\"first\"/\"last\" steps: the mean over {summary['steps_averaged_for_first_and_last']} steps.)")
        lines.append("")
        equal = summary["equal_time"]
        lines.append(f"Equal compute: the budget is {_fmt(equal['budget_seconds'], 1)} s of training, the shortest "
                     f"stage's ({STAGE_LABELS[equal['budget_stage']]}); a stage's accuracy at it is {equal['rule']}.")
        lines.append("")
    names = {"seconds_per_step_median_ratio": ("seconds per step", "x", 3),
             "peak_rss_mb_per_step_median_ratio": ("peak RSS per step", "x", 3),
             "peak_cuda_allocated_mb_per_step_median_ratio": ("peak CUDA memory per step", "x", 3),
             "process_peak_rss_mb_ratio": ("process peak RSS", "x", 3),
             "rss_growth_mb_per_step_median_difference": ("RSS growth within a step", " MB", 1)}
    for name in ("ppo", "ppo_separate_critic"):
        versus = summary.get(f"{name}_vs_grpo")
        if versus:
            lines.append(f"Is GRPO cheaper than {STAGE_LABELS[name]}? {STAGE_LABELS[name]} against GRPO: "
                         + "; ".join(f"{names[k][0]} {'+' if k.endswith('difference') and v >= 0 else ''}"
                                     f"{_fmt(v, names[k][2])}{names[k][1]}" for k, v in versus.items())
                         + ".")
            lines.append("")
    lines.append(f"Total wall time: {_fmt(summary['seconds'], 1)} s. Curves: `curves.png`.")
    return "\n".join(lines) + "\n"
