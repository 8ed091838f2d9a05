"""The reward harness: every reward function called under a deadline, every failure named by function
and sample, and "could not score" (None) never taken for a score of 0.

A recipe builds one harness from its reward specs and keeps it for the whole run (it remembers, across
batches, how long each function has scored nothing)::

    harness = RewardHarness.from_specs(config.rewards, timeout=config.reward_timeout,
                                       workers=config.reward_workers, on_error=config.reward_on_error)
    scores = harness.score(prompts, completions, columns)                 # a training batch
    scores = score_completions(harness, prompts, completions, columns)    # evaluation (not counted)

Where the functions run (``workers``):

- ``0``: in the trainer's own process, one after another. The deadline is SIGALRM (``signal.setitimer``),
  which only the main thread receives, so it holds only there, and only for Python code: a call stuck in
  C code (a long regex, an extension) is interrupted when it returns to Python, and a function that sets
  an alarm of its own (``math_verify`` does) replaces the deadline for the length of its call. Off the
  main thread no deadline can be enforced in-process; a warning says so once.
- ``N >= 1``: in N worker processes (forkserver where available, else spawn), each calling the functions
  on its own main thread, so ``signal.alarm`` works there. A call past the deadline gets its worker
  killed with everything it started, and the worker is replaced; a worker that dies (segfault,
  ``os._exit``, out of memory) is replaced too. This is the hard guarantee: nothing a reward function
  does stops the trainer. Reward models (``rm:``) still run in the trainer, on its device.

On a failure (an exception, a timeout, a dead worker) the batch call is retried one sample at a time,
within one more ``timeout`` in all, to name the sample that fails. With ``on_error="raise"`` the first
failing sample stops the run with a message naming the function, the sample's index and a prompt
excerpt; with ``"skip"`` the failing samples count as missing (NaN, counted in ``num_failed``) and the
others keep their scores. None is "does not apply": a batch in which a function returns None for every
sample logs a warning, and ``max_unscored_batches`` training batches in a row of it stop the run.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from ..data.loading import prompt_text
from .combine import REWARD_MODEL_PREFIX, RewardError, RewardScores, RewardSpec, _as_list, _short, _to_float
from .combine import check_batch, load_reward_function

logger = logging.getLogger(__name__)

WORKER_STARTUP_SECONDS = 120.0  # a worker imports the reward files (and what they import) before it is ready


# ------------------------------------------------------------------ one call and how it ended


@dataclass
class _Outcome:
    kind: str  # ok | raised | timeout | crashed
    output: Any = None
    error: str = ""  # raised: "TypeName: message"; crashed: how the worker died
    exception: BaseException | None = None  # raised in this process: the exception, kept as the error's cause

    def describe(self, timeout: float) -> str:
        if self.kind == "raised":
            return f"raised {self.error}"
        if self.kind == "timeout":
            return f"timed out after {timeout:g}s (reward_timeout)"
        return f"crashed ({self.error})"


class _Deadline(BaseException):
    """SIGALRM's exception: a BaseException, so a reward function's own ``except Exception`` lets it pass."""


def _raised(exc: BaseException) -> _Outcome:
    return _Outcome("raised", error=f"{type(exc).__name__}: {exc}", exception=exc)


def _call_in_process(function: Callable, kwargs: dict, timeout: float) -> _Outcome:
    """``function(**kwargs)`` here, interrupted by SIGALRM after ``timeout`` seconds (main thread only)."""
    if not (timeout > 0 and threading.current_thread() is threading.main_thread()):
        try:
            return _Outcome("ok", function(**kwargs))
        except Exception as e:
            return _raised(e)

    def on_alarm(signum, frame):
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    earlier_delay, _ = signal.setitimer(signal.ITIMER_REAL, timeout)
    started = time.monotonic()
    try:
        try:
            return _Outcome("ok", function(**kwargs))
        except Exception as e:
            return _raised(e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:  # also when the alarm lands in the handler above
        return _Outcome("timeout")
    finally:
        signal.signal(signal.SIGALRM, previous)
        if earlier_delay:  # someone else's timer was running: give back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(earlier_delay - (time.monotonic() - started), 1e-3))


# ------------------------------------------------------------------ worker processes


def _die_with_parent() -> None:
    """End this worker and all it started once the trainer is gone, even mid-call. (Not PR_SET_PDEATHSIG:
    it fires when the *thread* that started the worker ends, and replacements start on pool threads.)"""
    trainer = os.getppid()

    def watch() -> None:
        while os.getppid() == trainer:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="policyopt-watch-trainer").start()


def _portable(output: Any) -> Any:
    """What the worker sends back: tensors and arrays as lists (the trainer checks the values)."""
    if hasattr(output, "tolist") and getattr(output, "ndim", None) == 1:
        return output.tolist()
    return output


def _worker_entry() -> None:
    """A worker process (``python -c ... READ_FD WRITE_FD``): receive the trainer's ``sys.path`` and the
    functions (spec strings, or callables pickled by reference), load them, then answer calls forever."""
    from multiprocessing.connection import Connection

    _die_with_parent()
    incoming = Connection(int(sys.argv[1]), writable=False)
    outgoing = Connection(int(sys.argv[2]), readable=False)
    try:
        sys.path[:] = incoming.recv()
        functions = [load_reward_function(source) if isinstance(source, str) else source
                     for source in incoming.recv()]
    except Exception as e:
        outgoing.send(("load_error", str(e) if isinstance(e, RewardError) else f"{type(e).__name__}: {e}"))
        return
    outgoing.send(("ready", None))
    while True:
        try:
            index, kwargs = incoming.recv()
        except (EOFError, OSError):
            return  # the trainer closed the pipe, or is gone
        try:
            reply = ("ok", _portable(functions[index](**kwargs)))
        except Exception as e:
            reply = ("raised", f"{type(e).__name__}: {e}")
        try:
            outgoing.send(reply)
        except Exception as e:  # a return value that cannot be pickled
            outgoing.send(("raised", f"{type(e).__name__}: its return value cannot be sent back: {e}"))


def _exit_description(process: subprocess.Popen) -> str:
    try:
        code = process.wait(1.0)
    except subprocess.TimeoutExpired:
        return "the worker stopped answering"
    if code < 0:
        try:
            return f"the worker was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the worker was killed by signal {-code}"
    return f"the worker exited with status {code}"


_WORKER_COMMAND = "from policyopt.rewards.harness import _worker_entry; _worker_entry()"


class _Worker:
    """One worker process, in a session of its own (a kill reaches all it started), and its two pipes.

    A plain subprocess of this interpreter rather than multiprocessing's spawn or forkserver, which
    re-import the trainer's main module in the child (breaking scripts without a ``__main__`` guard).
    It imports no torch: starting one costs an interpreter and the reward files' own imports."""

    def __init__(self, sources: list, names: list[str]):
        from multiprocessing.connection import Connection

        worker_reads, trainer_writes = os.pipe()
        trainer_reads, worker_writes = os.pipe()
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER_COMMAND, str(worker_reads),
                                         str(worker_writes)], pass_fds=(worker_reads, worker_writes),
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(worker_reads)
        os.close(worker_writes)
        self.send_conn = Connection(trainer_writes, readable=False)
        self.conn = Connection(trainer_reads, writable=False)
        try:
            self.send_conn.send(list(sys.path))
            self.send_conn.send(sources)
        except (OSError, EOFError):
            pass  # it died at once; the reply below says how
        except Exception as e:  # a function given as an object that cannot be pickled
            self.kill()
            raise RewardError(f"reward functions {', '.join(map(repr, names))} cannot be sent to a worker process "
                              f"({type(e).__name__}: {e}); give them as path/to/file.py:function, or set "
                              "reward_workers=0") from None
        try:
            message = self.conn.recv() if self.conn.poll(WORKER_STARTUP_SECONDS) else ("late", None)
        except (EOFError, OSError):
            message = ("died", None)
        if message[0] != "ready":
            description = _exit_description(self.process)
            self.kill()
            if message[0] == "late":
                raise RewardError(f"a reward worker did not start within {WORKER_STARTUP_SECONDS:g}s")
            if message[0] == "load_error":
                raise RewardError(f"in a reward worker process: {message[1]}")
            raise RewardError(f"a reward worker died while loading the reward functions ({description})")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None and not self.conn.closed

    def call(self, index: int, kwargs: dict, timeout: float) -> _Outcome:
        try:
            self.send_conn.send((index, kwargs))
            if not self.conn.poll(timeout if timeout > 0 else None):
                self.kill()
                return _Outcome("timeout")
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            description = _exit_description(self.process)
            self.kill()
            return _Outcome("crashed", error=description)
        if kind == "ok":
            return _Outcome("ok", payload)
        return _Outcome("raised", error=payload)

    def kill(self) -> None:
        """SIGKILL the worker's whole session (what it started too, even once it is gone itself)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self.send_conn.close()
        self.conn.close()


def _close_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.send_conn.close()  # the worker's recv sees EOF and it returns
    for worker in workers:
        try:
            worker.process.wait(2.0)
        except subprocess.TimeoutExpired:
            pass
        worker.kill()


# ------------------------------------------------------------------ the harness


@dataclass
class _Entry:
    name: str
    weight: float
    function: Callable | None  # called in this process; None: in the workers
    worker_index: int = -1  # its index in what the workers load


@dataclass
class _Result:
    values: list[float]  # per sample; NaN: no score (None returned, or failed)
    failed: int = 0
    unscored: int = 0  # samples the function returned None for


class RewardHarness:
    """Reward functions with a per-call ``timeout`` (seconds; 0: none), run in this process (``workers=0``)
    or in ``workers`` processes; see the module docstring for what each guarantees."""

    def __init__(self, functions: list[tuple[str, Callable | str, float]], *, timeout: float = 0.0,
                 workers: int = 0, on_error: str = "raise", max_unscored_batches: int = 3):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if timeout < 0 or workers < 0 or max_unscored_batches < 0:
            raise ValueError("timeout, workers and max_unscored_batches must be >= 0")
        self.timeout, self.on_error, self.max_unscored_batches = float(timeout), on_error, max_unscored_batches
        self.entries: list[_Entry] = []
        sources: list = []
        for name, function, weight in functions:
            in_trainer = workers == 0 or (isinstance(function, str) and function.startswith(REWARD_MODEL_PREFIX))
            if in_trainer:
                loaded = load_reward_function(function) if isinstance(function, str) else function
                self.entries.append(_Entry(name, float(weight), loaded))
            else:
                self.entries.append(_Entry(name, float(weight), None, len(sources)))
                sources.append(function)
        self.names = [e.name for e in self.entries]
        self._unscored_streak = [0] * len(self.entries)
        self._warned_no_deadline = False
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._lock = threading.Condition()
        self._sources = sources
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)
        if sources:
            worker_names = [e.name for e in self.entries if e.function is None]
            for _ in range(workers):
                self._add_worker(_Worker(sources, worker_names))

    @classmethod
    def from_specs(cls, specs: list[RewardSpec], **settings) -> RewardHarness:
        return cls([(s.name, s.function, float(s.weight)) for s in specs], **settings)

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        """Stop the worker processes (also done when the harness is garbage-collected or at exit)."""
        self._finalizer()

    def __enter__(self) -> RewardHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- workers

    def _add_worker(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.append(worker)
            self._idle.append(worker)
            self._lock.notify()

    def _call_in_worker(self, index: int, kwargs: dict, timeout: float) -> _Outcome:
        with self._lock:
            while not self._idle:
                self._lock.wait()
            worker = self._idle.pop()
        outcome = worker.call(index, kwargs, timeout)
        if worker.alive:
            with self._lock:
                self._idle.append(worker)
                self._lock.notify()
        else:  # killed at its deadline, or died: a fresh one takes its place
            with self._lock:
                self._workers.remove(worker)
            names = [e.name for e in self.entries if e.function is None]
            self._add_worker(_Worker(self._sources, names))
        return outcome

    def _call(self, entry: _Entry, kwargs: dict, timeout: float) -> _Outcome:
        if entry.function is None:
            return self._call_in_worker(entry.worker_index, kwargs, timeout)
        if timeout > 0 and threading.current_thread() is not threading.main_thread() and not self._warned_no_deadline:
            self._warned_no_deadline = True
            logger.warning("reward_timeout=%gs is not enforced: reward functions run in this process, off its "
                           "main thread, where no signal arrives; set reward_workers >= 1 for a deadline", timeout)
        return _call_in_process(entry.function, kwargs, timeout)

    # -------------------------------------------------------------- scoring

    def score(self, prompts: list, completions: list, columns: dict[str, list], *,
              training: bool = True) -> RewardScores:
        """Call each function on the batch; ``training`` batches count toward ``max_unscored_batches``."""
        import torch  # here, not at the top: the worker processes import this module and need no torch

        check_batch(prompts, completions, columns)
        n = len(prompts)
        inline = [j for j, e in enumerate(self.entries) if e.function is not None]
        remote = [j for j, e in enumerate(self.entries) if e.function is None]
        results: dict[int, _Result] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(len(remote), len(self._workers)))) as pool:
            futures = {j: pool.submit(self._score_one, self.entries[j], prompts, completions, columns)
                       for j in remote}
            for j in inline:  # on this thread: SIGALRM deadlines need the main thread
                results[j] = self._score_one(self.entries[j], prompts, completions, columns)
        for j, future in futures.items():  # the pool has waited for them; a RewardError is raised here
            results[j] = future.result()
        per_function = torch.full((n, len(self.entries)), float("nan"))
        for j, result in results.items():
            per_function[:, j] = torch.tensor(result.values, dtype=per_function.dtype)
        self._watch_unscored(results, n, training, sorted(columns))
        weights = torch.tensor([e.weight for e in self.entries])
        total = torch.nansum(per_function * weights, dim=1)
        total[per_function.isnan().all(dim=1)] = float("nan")
        return RewardScores(per_function, total, list(self.names), sum(r.failed for r in results.values()))

    def _fail(self, result: _Result, message: str, count: int, cause: BaseException | None = None) -> None:
        if self.on_error == "raise":
            raise RewardError(message) from cause
        logger.warning("%s; scoring as missing", message)
        result.failed += count

    def _score_one(self, entry: _Entry, prompts: list, completions: list, columns: dict) -> _Result:
        n = len(prompts)
        result = _Result([math.nan] * n)
        outcome = self._call(entry, dict(prompts=prompts, completions=completions, **columns), self.timeout)
        if outcome.kind != "ok":
            self._localise(entry, prompts, completions, columns, outcome, result)
            return result
        values = _as_list(outcome.output)
        if values is None or len(values) != n:
            got = f"{len(values)} values" if values is not None else type(outcome.output).__name__
            self._fail(result, f"reward function {entry.name!r} must return a list of {n} values, got {got}", n)
            return result
        for i, value in enumerate(values):
            self._take(entry, result, i, value, prompts)
        return result

    def _take(self, entry: _Entry, result: _Result, i: int, value: Any, prompts: list) -> None:
        try:
            score = _to_float(value)
        except ValueError:
            self._fail(result, f"reward function {entry.name!r} returned {_short(value)} for sample {i} "
                               f"(prompt {_excerpt(prompts[i])}); rewards must be finite numbers or None", 1)
            return
        if score is None:
            result.unscored += 1
        else:
            result.values[i] = score

    def _localise(self, entry: _Entry, prompts, completions, columns, batch: _Outcome, result: _Result) -> None:
        """After a failed batch call: call one sample at a time, within one more timeout in all, so the
        message names the sample; with on_error=skip the samples that score alone keep their score."""
        n = len(prompts)
        batch_message = f"reward function {entry.name!r} {batch.describe(self.timeout)} on a batch of {n} samples"
        if n == 1:
            self._fail(result, f"reward function {entry.name!r} {batch.describe(self.timeout)} on sample 0 "
                               f"(prompt {_excerpt(prompts[0])})", 1, batch.exception)
            return
        budget_ends = time.monotonic() + self.timeout if self.timeout > 0 else None
        failed_alone = 0
        for i in range(n):
            left = budget_ends - time.monotonic() if budget_ends is not None else 0.0
            if budget_ends is not None and left <= 0:
                self._fail(result, f"{batch_message}; samples {i}..{n - 1} were not retried one at a time "
                                   "(the retries' time, one more reward_timeout, ran out)", n - i)
                return
            one = {k: v[i:i + 1] for k, v in columns.items()}
            outcome = self._call(entry, dict(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **one),
                                 left)
            values = _as_list(outcome.output) if outcome.kind == "ok" else None
            if outcome.kind != "ok" or values is None or len(values) != 1:
                failed_alone += 1
                what = outcome.describe(self.timeout) if outcome.kind != "ok" else "returned no list of 1 value"
                self._fail(result, f"reward function {entry.name!r} {what} on sample {i} of {n} "
                                   f"(prompt {_excerpt(prompts[i])})", 1, outcome.exception)
                continue
            self._take(entry, result, i, values[0], prompts)
        if failed_alone == 0:
            message = (f"{batch_message}, but each sample scored when called alone (the failure depends on the "
                       "batch, or was transient)")
            if self.on_error == "raise":
                raise RewardError(message) from batch.exception
            logger.warning("%s; keeping those scores", message)

    def _watch_unscored(self, results: dict[int, _Result], n: int, training: bool, columns: list[str]) -> None:
        for j, entry in enumerate(self.entries):
            nothing = n > 0 and results[j].unscored == n
            if nothing:
                logger.warning("reward function %r could not score any of the %d samples of this %s batch (it "
                               "returned None, 'does not apply', for every one)", entry.name, n,
                               "training" if training else "evaluation")
            if not training:
                continue
            self._unscored_streak[j] = self._unscored_streak[j] + 1 if nothing else 0
            if self.max_unscored_batches and self._unscored_streak[j] >= self.max_unscored_batches:
                raise RewardError(
                    f"reward function {entry.name!r} returned None (could not score) for every sample of "
                    f"{self._unscored_streak[j]} training batches in a row, so the run would train on nothing "
                    f"from it; check the columns it reads (the batches have: {', '.join(columns) or 'none'}), "
                    "or raise reward_max_unscored_batches (0: never stop)")


def _excerpt(prompt: Any, limit: int = 80) -> str:
    return _short(prompt_text(prompt) if isinstance(prompt, (str, list)) else prompt, limit)
