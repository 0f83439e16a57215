"""Stopping a run cleanly: Ctrl-C or SIGTERM becomes a request the recipe honours at the next
step boundary, after saving a checkpoint."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from tuneforge.errors import UserError


class TrainingStopped(UserError):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the step boundary."""


class StopRequest:
    """Turns SIGINT/SIGTERM into a request; a second Ctrl-C stops at once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested: str | None = None
        self.say = say
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: the user means now
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.say(f"{self.requested}: saving a checkpoint at the end of this step")

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
