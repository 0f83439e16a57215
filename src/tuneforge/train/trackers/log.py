"""The training log with the trackers as its sinks: one write goes to train_log.jsonl and to each
tracker, stamped with the same time."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.config.schema import TrackerName
from tuneforge.errors import UserError
from tuneforge.files import atomic_write
from tuneforge.train.hooks import JsonlLog
from tuneforge.train.stop import TrainingStopped
from tuneforge.train.trackers import TRACKERS
from tuneforge.train.trackers.base import RunInfo, Status, Tracker

RUN_IDS = "trackers.json"  # in the work dir: each tracker's run, which a resumed run goes on with


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def _status(error: BaseException | None) -> Status:
    if error is None:
        return "finished"
    return "killed" if isinstance(error, KeyboardInterrupt | TrainingStopped) else "failed"


class TrackedLog(JsonlLog):
    """train_log.jsonl, with each tracker as a sink of the same records (stamped with the same
    time). ``open`` at the start of training, ``close`` at its end, also when it fails."""

    def __init__(self, path: Path, names: list[TrackerName], say: Callable[[str], None]) -> None:
        super().__init__(path)
        self.names, self.say = names, say
        self.trackers: dict[str, Tracker] = {}
        self.floor: dict[str, int] = {}  # per tracker: the records up to this step it already has
        self.seen = 0  # the last step train_log.jsonl had before a resume cut it back

    def resume_at(self, step: int) -> None:
        self.seen = max((r.get("step", 0) for r in self.read()), default=0)
        super().resume_at(step)

    def open(self, config: dict[str, Any], start: int) -> None:
        ids_file = self.path.parent / RUN_IDS
        try:
            kept = json.loads(ids_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet (or not readable): every tracker starts a new run
            kept = {}
        ids = dict(kept)
        for name in self.names:
            before = kept.get(name) if start else None
            tracker = TRACKERS[name]()
            try:
                opened = tracker.open(RunInfo(self.path.parent, config, start, before))
            except ImportError as err:
                self.close(err)
                raise UserError(f"report_to {name}: importing it failed ({err}); reinstall it with "
                                f"pip install 'tuneforge[{name}]'") from err
            except Exception as err:
                self.close(err)
                raise UserError(f"report_to {name}: starting its run failed ({_first_line(err)}); "
                                f"remove {name} from report_to to train without it") from err
            self.trackers[name] = tracker
            # A tool that cannot drop what it holds past the checkpoint gets only the steps past
            # what train_log.jsonl had: no step twice, none out of order.
            going_on = before is not None and opened.run_id == before
            self.floor[name] = self.seen if going_on and not tracker.purges else -1
            ids[name] = opened.run_id
            self.say(f"{name}: {opened.where}")
        if ids != kept:
            with atomic_write(ids_file) as f:
                json.dump(ids, f, indent=1)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        stamped = super().write(record)
        step = stamped.get("step")
        for name, tracker in list(self.trackers.items()):
            if step is not None and step <= self.floor[name]:
                continue
            try:
                tracker.write(stamped)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not stop the training
                self.say(f"warning: {name} failed ({_first_line(err)}); it gets nothing more, "
                         f"train_log.jsonl has every record")
                del self.trackers[name]
                with contextlib.suppress(Exception):
                    tracker.close("failed")
        return stamped

    def close(self, error: BaseException | None = None) -> None:
        """Flush and close every tracker, marking its run finished, failed or killed."""
        status = _status(error)
        for name, tracker in self.trackers.items():
            try:
                tracker.close(status)
            except Exception as err:  # noqa: BLE001 - close the others all the same
                self.say(f"warning: closing {name} failed ({_first_line(err)})")
        self.trackers = {}
