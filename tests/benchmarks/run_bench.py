"""What the benchmark tests share: one of benchmarks/'s drivers run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from waits import limit

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """benchmarks/SCRIPT ARGS in a fresh interpreter with tuneforge's sources importable; fails
    the test, with the tails of what it printed, unless it exits 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=limit(timeout))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc
