"""Where a training step's time goes (`tuneforge train ... --profile`).

torch.profiler records a few optimizer steps after warm-up. Each rank writes a table of its
operators and a trace for chrome://tracing or ui.perfetto.dev, and says how much of the wall time
its GPU was running any kernel at all. A GPU that is busy much less than 100% of a step waits
for the Python side (launches, syncs, the optimizer) or for data; communication kernels are
counted apart, so a slow link shows up too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def covered_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, duration) spans: overlapping kernels (compute beside
    communication on another stream) count once."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(spans):
        stop = start + dur
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


@dataclass(frozen=True)
class Busy:
    steps: int
    wall_ms: float  # per step
    gpu_ms: float  # per step, any kernel running
    comm_ms: float  # per step, a communication (NCCL) kernel running

    def describe(self) -> str:
        if self.gpu_ms == 0:
            return f"{self.wall_ms:,.0f} ms per step (no GPU)"
        return (f"{self.wall_ms:,.0f} ms per step; GPU busy {self.gpu_ms:,.0f} ms "
                f"({100 * self.gpu_ms / self.wall_ms:.0f}%), of which communication "
                f"{self.comm_ms:,.0f} ms")


def busy(trace: dict, steps: int, wall_s: float) -> Busy:
    """What a chrome trace written by torch.profiler says about the GPU's STEPS steps."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    comm = [e for e in kernels if e.get("name", "").lower().startswith("nccl")]
    per = 1 / 1000 / max(1, steps)  # trace times are microseconds; ms per step
    return Busy(steps, 1000 * wall_s / max(1, steps),
                covered_us([(e["ts"], e["dur"]) for e in kernels]) * per,
                covered_us([(e["ts"], e["dur"]) for e in comm]) * per)


class StepProfiler:
    """Records steps FIRST .. FIRST+COUNT-1 (0-based); call before() and after() around each step."""

    def __init__(self, out: Path, first: int, count: int, rank: int) -> None:
        self.out, self.first, self.last, self.rank = out, first, first + count - 1, rank
        self.prof: torch.profiler.profile | None = None
        self.t0 = 0.0

    def before(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()
        self.t0 = time.time()

    def after(self, step: int) -> Busy | None:
        """The summary, on the last recorded step; files are written then."""
        if step != self.last or self.prof is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.time() - self.t0
        self.prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=40)
        (self.out / f"rank{self.rank}.txt").write_text(table + "\n")
        trace = self.out / f"rank{self.rank}.trace.json"
        self.prof.export_chrome_trace(str(trace))
        summary = busy(json.loads(trace.read_text()), self.last - self.first + 1, wall)
        self.prof = None
        return summary
