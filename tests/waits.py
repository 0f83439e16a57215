"""Waiting in tests without fixed clocks: every limit scales with one factor, every wait says what it
waited for, and nothing reads a live process's pipe without a limit.

`TUNEFORGE_TEST_TIMEOUT_FACTOR` (default 1) multiplies every limit: a loaded or slower CI machine
raises it instead of editing tests. A limit is only a guard against hanging; what a test checks is
the event it waited for (a file, a log line, an answer), never the time it took.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def factor() -> float:
    raw = os.environ.get("TUNEFORGE_TEST_TIMEOUT_FACTOR", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"TUNEFORGE_TEST_TIMEOUT_FACTOR={raw!r} is not a number (e.g. 2)") from None
    if value <= 0:
        raise ValueError(f"TUNEFORGE_TEST_TIMEOUT_FACTOR={raw!r} must be positive")
    return value


def limit(seconds: float) -> float:
    """SECONDS scaled by the machine's factor: the longest a step may take before the test fails."""
    return seconds * factor()


def wait_for(check: Callable[[], T], seconds: float, what: str, *, proc: subprocess.Popen | None = None,
             every: float = 0.2) -> T:
    """Poll CHECK until it returns something truthy and return that. Fails naming WHAT when the
    (scaled) limit passes, or at once when PROC ends first (with its output so far)."""
    deadline = time.monotonic() + limit(seconds)
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{drain(proc)[-3000:]}")
        if time.monotonic() > deadline:
            tail = "" if proc is None else "\n" + drain(proc, kill=True)[-3000:]
            raise AssertionError(f"gave up after {limit(seconds):.0f} s waiting for {what}{tail}")
        time.sleep(every)


def drain(proc: subprocess.Popen, *, kill: bool = False, seconds: float = 10) -> str:
    """What PROC wrote to its pipes, read with a limit (a live server's pipe never ends)."""
    if kill and proc.poll() is None:
        proc.kill()
    chunks: list[str] = []

    def read(stream) -> None:
        if stream is not None:
            chunks.append(stream.read() or "")

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(limit(seconds) if proc.poll() is not None else 0.5)
    return "".join(c if isinstance(c, str) else c.decode(errors="replace") for c in chunks)


def tuneforge(*args: str, seconds: float = 600, cwd: Path | None = None, env: dict | None = None,
              **kw) -> subprocess.CompletedProcess:
    """Run `python -m tuneforge ARGS` to completion within the scaled limit, output captured."""
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=limit(seconds), env={**os.environ, **env} if env else None, **kw)
