"""The run layer every recipe shares: what is the same in SFT, the reward model, PPO and GRPO.

A recipe creates a ``Run``, names the objects whose state makes up the run (model, optimizer,
scheduler, data position, random generators, anything with ``state_dict``), and then loops over
``run.steps()``. The run owns the output directory and its ``config.yaml``, seeding, the metrics
log, the evaluation schedule, checkpoints with exact resume, SIGTERM and Ctrl-C, the non-finite
update guard, the progress bar, ``summary.json`` and the plot. It never holds the algorithm.

    run = Run(config, "grpo", total_steps=config.steps)
    ... build the model from run.model_source(config.model) ...
    run.track(model=policy, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, data=source)
    run.begin(evaluate)                 # fresh: evaluate at step 0; resumed: restore everything
    for step in run.steps():            # checkpoints after a step on save_every, SIGTERM or Ctrl-C
        metrics = ...one step...
        run.log(step, metrics, evaluate)
    return run.finish(evaluate, {...})  # final evaluation, final/ weights, plot, summary.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from .checkpoint import (
    list_checkpoints,
    load_training_state,
    resolve_resume,
    restore_rng_state,
    rng_state,
    save_pretrained_atomic,
    save_training_checkpoint,
)
from ..models.lora import is_adapter_model, load_adapter_weights, save_merged
from .advice import advise
from .config import ConfigError, save_config
from .distributed import DistributedConfig, init_world
from .metrics import MetricsLogger
from .optim import OptimConfig, UpdateGuard, apply_update
from .plots import plot_run
from .seeding import set_seed
from .signals import StopRequests, TrainingInterrupted

log = logging.getLogger(__name__)

INITIAL_DIR = "initial"  # a model built at the run's start (the tiny model), reloaded on resume


@dataclass
class RunSettings:
    """The settings every recipe's run shares (each recipe's config starts with these)."""

    output_dir: str = "runs/run"  # where config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json go
    seed: int = 0  # seeds Python, NumPy, torch and every sampler: one seed, one run
    eval_every: int = 10  # evaluate on the held-out rows every N steps (0: only before and after training)
    save_every: int = 0  # checkpoint the full training state every N steps (0: never; SIGTERM/Ctrl-C always do)
    keep_last: int = 2  # training checkpoints kept on disk
    resume: str | None = None  # auto: continue from the newest complete checkpoint in output_dir; or a path
    tensorboard: bool = True  # also write metrics as TensorBoard events under tensorboard/
    max_bad_updates_in_a_row: int = 5  # non-finite loss/gradient updates are skipped; this many in a row stop the run
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its learning-rate schedule
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # several processes (torchrun)

    def validate(self) -> None:
        self.optim.validate()
        self.distributed.validate()
        if self.eval_every < 0 or self.save_every < 0 or self.keep_last < 1:
            raise ValueError("eval_every and save_every must be >= 0, keep_last >= 1")
        if self.max_bad_updates_in_a_row < 1:
            raise ValueError(f"max_bad_updates_in_a_row must be >= 1, got {self.max_bad_updates_in_a_row}")

    def derived(self) -> dict[str, Any]:
        """Quantities the settings imply (batch geometry, normalisers), printed when a run starts."""
        return {}


class Run:
    """One training run's shared machinery; see the module docstring for its use."""

    def __init__(self, config: RunSettings, name: str, total_steps: int):
        self.config, self.name, self.total_steps = config, name, total_steps
        self.world = init_world(config.distributed)  # only rank 0 writes files; every rank reads them
        self.out = Path(config.output_dir)
        self.checkpoint_root = self.out / "checkpoints"
        self.resume_from = resolve_resume(config.resume, self.checkpoint_root)
        # only checks: nothing is written until start() (from begin), after the recipe has loaded its data,
        # model and rewards, so a mistake in any of them leaves the directory as it was
        check_output_dir(self.out, resuming=config.resume is not None)
        self.world.barrier()  # every rank has checked the directory before rank 0 writes into it
        self._started = False
        set_seed(config.seed)
        self.started = time.perf_counter()
        self.elapsed_earlier = 0.0
        self.guard = UpdateGuard(config.max_bad_updates_in_a_row, str(self.checkpoint_root))
        self.values: dict[str, Any] = {}  # plain recipe state saved with each checkpoint (e.g. PPO's beta)
        self.history: list[tuple[int, float]] = []  # (step, headline number) of each evaluation
        self.before: dict = {}
        self.first_step = 1
        self.logger: MetricsLogger | None = None
        self._model = self._tokenizer = None
        self._stateful: dict[str, Any] = {}
        self._progress = None
        for key, value in config.derived().items() if self.world.is_main else ():
            log.info("%s: %s = %s", name, key, value)

    # ------------------------------------------------------------------ setup

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    @property
    def initial_dir(self) -> Path:
        return self.out / INITIAL_DIR

    @property
    def build_dir(self) -> Path | None:
        """Where a model built at the start is saved: ``initial/``, by rank 0 only (None on the others)."""
        return self.initial_dir if self.world.is_main else None

    def model_source(self, model_config):
        """``model_config``, pointed at the model this run built at its start when resuming a built one."""
        if self.resuming and model_config.name_or_path is None:
            return dataclasses.replace(model_config, name_or_path=str(self.initial_dir))
        return model_config

    def track(self, model=None, tokenizer=None, **stateful) -> None:
        """Name what a checkpoint holds: the model (saved with ``save_pretrained``, so every checkpoint is
        a Hugging Face model directory), its tokenizer, and objects with ``state_dict``/``load_state_dict``
        or ``get_state``/``set_state`` (optimizer, scheduler, data position, torch generators, modules)."""
        if model is not None:
            self._model, self._tokenizer = model, tokenizer
        self._stateful.update(stateful)

    def start(self) -> None:
        """Create the output directory and write ``config.yaml`` (rank 0): the run's first write, once
        everything it needs has loaded. ``begin`` calls it."""
        if self._started:
            return
        if self.world.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                save_config(self.config, self.out / "config.yaml")
            except OSError as e:
                raise ConfigError(f"output_dir {self.out}: cannot write there ({e.strerror or e})") from None
        self._started = True

    def begin(self, evaluate: Callable[[], dict]) -> int:
        """Fresh run: evaluate and log step 0. Resumed run: restore every tracked state. Returns the first step."""
        self.start()
        metrics_path = self.out / "metrics.jsonl"
        if not self.resuming:
            if self.world.is_main:
                metrics_path.unlink(missing_ok=True)
            self.logger = self._metrics_logger()
            self.before = evaluate()
            self._record_eval(0, self.before)
            self.logger.log(0, self.before)
            return self.first_step
        state = load_training_state(self.resume_from)
        if self._model is not None:
            _load_weights(self._model, self.resume_from, self.world)
        generators = {k: v for k, v in self._stateful.items() if isinstance(v, torch.Generator)}
        for key, obj in self._stateful.items():
            if key == "optimizer" and self._model is not None:
                self.world.load_optimizer_state(self._model, obj, state["stateful"][key])  # whole or sharded
            elif key not in generators:
                obj.load_state_dict(state["stateful"][key])
        restore_rng_state(state["rng_by_rank"][self.world.rank] if "rng_by_rank" in state else state["rng"],
                          generators)
        self.guard.load_state_dict(state["guard"])
        self.values, self.before, self.history = state["values"], state["before"], state["history"]
        self.elapsed_earlier = state["elapsed"]
        self.first_step = state["step"] + 1
        if self.world.is_main:
            shutil.copyfile(self.resume_from / "metrics.jsonl", metrics_path)  # drops records after the checkpoint
        self.logger = self._metrics_logger(purge_step=self.first_step)
        log.info("resumed from %s at step %d", self.resume_from, self.first_step)
        return self.first_step

    def _metrics_logger(self, purge_step: int | None = None):
        if not self.world.is_main:
            return _NoLogger(self.out / "metrics.jsonl")
        return MetricsLogger(self.out, tensorboard=self.config.tensorboard, purge_step=purge_step)

    # ------------------------------------------------------------------ the loop

    def steps(self) -> Iterator[int]:
        """Steps first_step..total_steps under a progress bar. After each one, a checkpoint when it is due
        (``save_every``) or a stop signal arrived; on a signal the run then ends with ``TrainingInterrupted``."""
        stop = StopRequests()
        self._progress = tqdm(total=self.total_steps, initial=self.first_step - 1, desc=self.name,
                              dynamic_ncols=True, disable=None if self.world.is_main else True)
        try:
            with stop:
                for step in range(self.first_step, self.total_steps + 1):
                    yield step
                    self._progress.update(1)
                    save_every = self.config.save_every
                    # every rank stops after the same step, whichever of them the signal reached first
                    stopping = self.world.max(stop.requested or 0)
                    if (save_every and step % save_every == 0) or stopping:
                        saved = self.save_checkpoint(step)
                        if stopping:
                            self.logger.close()
                            raise TrainingInterrupted(stopping, saved)
        finally:
            self._progress.close()

    def eval_due(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(every) and step % every == 0 and step < self.total_steps

    def log(self, step: int, metrics: dict, evaluate: Callable[[], dict] | None = None, **shown: str) -> dict:
        """Log one step's metrics, with a held-out evaluation first when one is due; ``shown`` goes on the bar."""
        if evaluate is not None and self.eval_due(step):
            evaluation = evaluate()
            metrics.update(evaluation)
            self._record_eval(step, evaluation)
        advise(self.values.setdefault("advice", {}), step, metrics, self.config)  # warn/<rule> flags, warnings
        self.logger.log(step, metrics)
        if self._progress is not None:
            if self.history:
                shown.setdefault("eval", f"{self.history[-1][1]:.3f}")
            self._progress.set_postfix(shown)
        return metrics

    def optimizer_step(self, model, optimizer, scheduler, loss_value: float, step: int,
                       sums: dict | None = None) -> tuple[float, bool]:
        """Clip the gradients and step, or skip an update whose loss or gradient is not finite (the weights
        keep their last good values; too many in a row stop the run with its checkpoints intact).
        Adds to ``sums``: updates, skipped, and loss and grad_norm of the applied ones. Returns
        (grad_norm, applied)."""
        self.world.sum_gradients(model)  # the ranks' shares of the global loss, summed
        loss_value = self.world.sum(loss_value)  # so every rank skips (or applies) the same updates
        grad_norm, applied = apply_update(model, optimizer, scheduler, loss_value, self.config.optim.max_grad_norm)
        self.guard.record(applied, f"{self.name} step {step}")
        if sums is not None:
            sums["updates"] += 1
            if applied:
                sums["loss"] += loss_value
                sums["grad_norm"] += grad_norm
            else:
                sums["skipped"] += 1
        return grad_norm, applied

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoints/step-N`` (rank 0), with every rank's random-number states."""
        generators = {k: v for k, v in self._stateful.items() if isinstance(v, torch.Generator)}
        rngs = self.world.gather_objects(rng_state(generators))
        model_state = self.world.full_model_state(self._model)  # sharded: gathered whole (every rank takes part)
        stateful = {k: self.world.optimizer_state(self._model, v) if k == "optimizer" and self._model is not None
                    else v.state_dict() for k, v in self._stateful.items() if k not in generators}
        final = self.checkpoint_root / f"step-{step:06d}"
        if not self.world.is_main:
            self.world.barrier()  # rank 0 is writing it
            return final
        state = {
            "stateful": stateful,
            "rng": rngs[0],
            **({"rng_by_rank": rngs} if self.world.size > 1 else {}),
            "guard": self.guard.state_dict(),
            "values": self.values,
            "before": self.before,
            "history": self.history,
            "elapsed": self.seconds(),
        }
        saved = save_training_checkpoint(self.checkpoint_root, step, self._model, self._tokenizer, state,
                                         self.logger.path, keep_last=self.config.keep_last, model_state=model_state)
        self.world.barrier()
        return saved

    # ------------------------------------------------------------------ the end

    def seconds(self) -> float:
        """Wall time of the run so far, including the runs it resumed."""
        return self.elapsed_earlier + time.perf_counter() - self.started

    def finish(self, evaluate: Callable[[], dict] | None, summary: dict, save_model: bool = True,
               plot: dict | None = None, save_also: Callable[[Path], Any] | None = None,
               last_step: int | None = None) -> dict:
        """Final evaluation, ``final/`` (model, tokenizer and ``save_also(final_dir)``), the plot and
        ``summary.json``; returns the summary. ``last_step``: the step training ended at (default: the last)."""
        last_step = self.total_steps if last_step is None else last_step
        after = {}
        if evaluate is not None:
            after = evaluate()
            self._record_eval(last_step, after)
            self.logger.log(last_step, after)
        self.logger.close()
        final = self.out / "final"
        merged = self.out / "final_merged" if self._saves_merged() else None  # LoRA: the plain merged model too
        model_state = self.world.full_model_state(self._model) if save_model and self._model is not None else None
        if save_model and self._model is not None and self.world.is_main:
            save_pretrained_atomic(self._model, self._tokenizer, final, state_dict=model_state)  # LoRA: the adapter
            if merged is not None:
                save_merged(self._model, self._tokenizer, merged)
            for directory in (final, merged) if save_also is not None else ():
                if directory is not None:
                    save_also(directory)
        if plot is not None and self.world.is_main:
            plot_run(self.out / "metrics.jsonl", self.out / "curves.png", **plot)
        summary = {"recipe": self.name, "steps": last_step,
                   **headline_summary(self.before, after),
                   "eval_before": self.before, "eval_after": after, "eval_history": self.history,
                   **summary, "seconds": self.seconds()}
        summary["model_dir"] = str(merged or final) if save_model and self._model is not None else None
        if save_model and is_adapter_model(self._model):  # model_dir (what a next stage loads) is a plain model
            summary["adapter_dir"] = str(final)
        return self.write_summary(summary)

    def _saves_merged(self) -> bool:
        """A LoRA model is also written merged into final_merged/ unless ``model.lora.save_merged`` is false."""
        lora = getattr(getattr(self.config, "model", None), "lora", None)
        return is_adapter_model(self._model) and bool(getattr(lora, "save_merged", True))

    def write_summary(self, summary: dict) -> dict:
        if self.world.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _record_eval(self, step: int, evaluation: dict) -> None:
        if evaluation:
            self.history.append((step, headline(evaluation)))


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # a run's first and last writes: an earlier run's mark


def earlier_run_files(directory: Path, nested: bool = False) -> list[str]:
    """What an earlier run left in ``directory`` (``nested``: or in its subdirectories, a pipeline's stages)."""
    found = [name for name in RUN_FILES if (directory / name).is_file()]
    if list_checkpoints(directory / "checkpoints"):
        found.append("checkpoints/")
    if nested and directory.is_dir():
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            found += [f"{sub.name}/{name}" for name in earlier_run_files(sub)]
    return found


def check_output_dir(out: Path, resuming: bool, what: str = "run", nested: bool = False) -> None:
    """Refuse, before anything is written, an output_dir that is a file or cannot be written, and, unless
    resuming, one holding an earlier run (``nested``: in a subdirectory too), which a fresh run would overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a directory; choose another output_dir")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {out}: {existing} is a file, so no directory can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: {existing} is not writable by this user; choose another output_dir")
    if resuming:
        return
    if list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds checkpoints of an earlier {what}: continue it with "
                          "resume=auto (--resume), or choose another output_dir")
    found = earlier_run_files(out, nested)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(f"{out} already holds an earlier {what} ({shown}), which a fresh {what} would overwrite: "
                          "continue it with resume=auto (--resume), or choose another output_dir")


def headline(metrics: dict) -> float:
    """The number the progress bar and the evaluation history show: accuracy when the run has a reward named
    accuracy, else the mean total reward."""
    return metrics.get("eval/accuracy", metrics.get("eval/reward", float("nan")))


def headline_summary(before: dict, after: dict) -> dict:
    """The summary's headline numbers, each named for what it is: ``accuracy_before``/``accuracy_after`` are
    the held-out ``eval/accuracy`` (null when no reward is named accuracy: not measured), and
    ``reward_before``/``reward_after`` the held-out mean total reward (null when nothing was evaluated)."""
    return {"accuracy_before": before.get("eval/accuracy"), "accuracy_after": after.get("eval/accuracy"),
            "reward_before": before.get("eval/reward"), "reward_after": after.get("eval/reward")}


def _load_weights(model: torch.nn.Module, directory: Path, world=None) -> None:
    """Copy the weights saved with ``save_pretrained`` in ``directory`` into ``model``, bit for bit.

    A LoRA model's checkpoint holds only its adapter (peft's format): the base was reloaded from where
    it came from (``model_source``) and is frozen, so copying the adapter in restores the whole model."""
    if is_adapter_model(model):
        load_adapter_weights(model, directory)
        return
    dtype = next(model.parameters()).dtype
    cls = type(model)
    if world is not None and world.sharded:  # FSDP2 made the class FSDP<cls>(FSDPModule, cls)
        cls = next(base for base in cls.__mro__[1:] if hasattr(base, "from_pretrained"))
    saved = cls.from_pretrained(str(directory), dtype=dtype)
    if world is not None and world.sharded:
        world.load_full_model_state(model, saved.state_dict())
    else:
        model.load_state_dict(saved.state_dict())


class _NoLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the metrics of the whole batch)."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass
