"""What every tracker module shares: the run it opens, its three methods, and how a log record
becomes scalars and text. A tracker is a sink of the records train_log.jsonl gets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

Status = Literal["finished", "failed", "killed"]


@dataclass(frozen=True)
class RunInfo:
    work_dir: Path
    config: dict[str, Any]  # the config as JSON values: the run's hyper-parameters
    start: int  # 0 for a fresh run; else the step a resumed run goes on from
    run_id: str | None  # the tracker's own run to go on with (kept in the work dir), None: a new one


@dataclass(frozen=True)
class Opened:
    run_id: str | None  # kept in the work dir, so that a resumed run goes on with this run
    where: str  # one line: where the tracker writes and how to look at it


class Tracker(Protocol):
    # The Python packages it imports (find_spec names); tuneforge[NAME] installs them.
    requires: tuple[str, ...]
    # True where a resumed run can replace what the tracker holds past its checkpoint (TensorBoard);
    # the others keep what they have and get only the steps past it.
    purges: bool

    def open(self, run: RunInfo) -> Opened: ...

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, status: Status) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (loss, lr, grad_norm, tokens_per_s, peak_gib, margin, ...), by their
    train_log.jsonl names."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)}


def answers_text(answers: list[dict[str, str]]) -> str:
    return "\n\n".join(f"Q: {a['question']}\nA: {a['answer']}" for a in answers)


def texts(record: dict[str, Any]) -> dict[str, str]:
    """The record's text: evaluation answers ("eval"), the identity guard's leaked answers, a
    skipped update's reason."""
    out = {}
    for k, v in record.items():
        if k == "eval" and isinstance(v, list):
            out[k] = answers_text(v)
        elif isinstance(v, str):
            out[k] = v
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            out[k] = "\n\n".join(v)
    return out


def plain_config(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The config as one flat level of plain values, which every tool takes as hyper-parameters
    (lists and nested settings as their JSON text)."""
    out: dict[str, str | int | float | bool] = {}
    for k, v in config.items():
        if isinstance(v, str | int | float | bool):
            out[k] = v
        else:
            out[k] = json.dumps(v, ensure_ascii=False)
    return out
