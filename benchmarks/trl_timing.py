"""A TRL trainer callback both TRL comparisons use: each step's wall time, and the logs that carry a key."""

from __future__ import annotations

import time


def step_timer(log_key: str):
    """A ``TrainerCallback`` recording ``seconds`` per optimizer step and every log dict holding ``log_key``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.seconds, self.logs = None, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and log_key in logs:
                self.logs.append(dict(logs))

    return StepTimer()
