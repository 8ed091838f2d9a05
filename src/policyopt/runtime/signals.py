"""Stop a training loop cleanly on SIGTERM or Ctrl-C: finish the step, checkpoint, then exit."""

from __future__ import annotations

import signal
import threading


class TrainingInterrupted(Exception):
    """Raised after a stop signal once the run's state is safely checkpointed."""

    def __init__(self, signum: int, checkpoint):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved to {checkpoint}")


class StopRequests:
    """Context manager: while active, SIGTERM/SIGINT set ``requested`` instead of killing the process.

    A second Ctrl-C restores the default behaviour, so an impatient user can still kill the run.
    """

    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
