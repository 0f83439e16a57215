"""Where a training step's time goes (`tuneforge train ... --profile`).

torch.profiler records a few optimizer steps after warm-up. Each rank writes a table of its
operators and a trace for chrome://tracing or ui.perfetto.dev, and says how much of the wall time
its GPU was running any kernel at all. A GPU that is busy much less than 100% of a step waits
for the Python side (launches, syncs, the optimizer) or for data; communication kernels are
counted apart, so a slow link shows up too. The loop marks its phases (data, forward, backward,
reduce, optimizer) in the trace, and the GPU's idle time is told by the phase the CPU was in
meanwhile: that is the part of the step to make cheaper.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
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


PREFIX = "tuneforge."


def phase(name: str) -> torch.profiler.record_function:
    """A span of the training step, named in the trace (a few microseconds when no profiler runs)."""
    return torch.profiler.record_function(PREFIX + name)


def idle_spans(kernels: list[tuple[float, float]], start: float, stop: float) -> list[tuple[float, float]]:
    """The (start, stop) stretches of START..STOP when none of KERNELS (start, duration) ran."""
    idle, at = [], start
    for k0, dur in sorted(kernels):
        if k0 > at:
            idle.append((at, min(k0, stop)))
        at = max(at, k0 + dur)
        if at >= stop:
            break
    if at < stop:
        idle.append((at, stop))
    return [(a, b) for a, b in idle if b > a]


def idle_by_phase(kernels: list[tuple[float, float]], phases: list[tuple[str, float, float]]) -> dict[str, float]:
    """Microseconds of GPU idle time under each phase (name, start, duration) the CPU was in;
    idle time in no phase counts as "other". Phases are the loop's outermost spans; where they
    nest, the innermost one counts."""
    if not phases:
        return {}
    start = min(p[1] for p in phases)
    stop = max(p[1] + p[2] for p in phases)
    out: dict[str, float] = {}
    ordered = sorted(phases, key=lambda p: (p[1], -p[2]))
    for a, b in idle_spans(kernels, start, stop):
        covered = []
        for name, p0, dur in ordered:  # outer spans first: an inner one overwrites their share
            lo, hi = max(a, p0), min(b, p0 + dur)
            if hi > lo:
                covered.append((name, lo, hi))
        cuts = sorted({a, b, *(x for _, lo, hi in covered for x in (lo, hi))})
        for lo, hi in itertools.pairwise(cuts):
            owner = "other"
            for name, p0, p1 in covered:
                if p0 <= lo and hi <= p1:
                    owner = name
            out[owner] = out.get(owner, 0.0) + hi - lo
    return out


@dataclass(frozen=True)
class Busy:
    steps: int
    wall_ms: float  # per step
    gpu_ms: float  # per step, any kernel running
    comm_ms: float  # per step, a communication (NCCL) kernel running
    idle_ms: dict[str, float] = field(default_factory=dict)  # per step, GPU idle by the CPU's phase

    def describe(self) -> str:
        if self.gpu_ms == 0:
            return f"{self.wall_ms:,.0f} ms per step (no GPU)"
        text = (f"{self.wall_ms:,.0f} ms per step; GPU busy {self.gpu_ms:,.0f} ms "
                f"({100 * self.gpu_ms / self.wall_ms:.0f}%), of which communication "
                f"{self.comm_ms:,.0f} ms")
        worst = sorted(((ms, name) for name, ms in self.idle_ms.items() if ms >= 0.5), reverse=True)
        if worst:
            text += "; GPU idle during " + ", ".join(f"{name} {ms:,.0f} ms" for ms, name in worst)
        return text


def busy(trace: dict, steps: int, wall_s: float) -> Busy:
    """What a chrome trace written by torch.profiler says about the GPU's STEPS steps."""
    events = trace.get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    comm = [e for e in kernels if e.get("name", "").lower().startswith("nccl")]
    phases = [(e["name"][len(PREFIX):], e["ts"], e["dur"]) for e in events
              if e.get("cat") == "user_annotation" and e.get("name", "").startswith(PREFIX)]
    per = 1 / 1000 / max(1, steps)  # trace times are microseconds; ms per step
    spans = [(e["ts"], e["dur"]) for e in kernels]
    idle = idle_by_phase(spans, phases) if kernels else {}
    return Busy(steps, 1000 * wall_s / max(1, steps), covered_us(spans) * per,
                covered_us([(e["ts"], e["dur"]) for e in comm]) * per,
                {name: round(us * per, 2) for name, us in sorted(idle.items())})


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
