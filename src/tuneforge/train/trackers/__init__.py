"""Experiment trackers (config ``report_to``) as sinks of the training log: every record that
train_log.jsonl gets, each tracker gets too, on rank 0 only (log.py). One module per tracker, each
with the interface in base.py; TRACKERS below is the one place that maps the config's names to them.
Nothing here imports torch or a tracker's package: the CLI checks report_to before any rank starts."""

from __future__ import annotations

import importlib.util

from tuneforge.config.schema import TrackerName
from tuneforge.errors import UserError
from tuneforge.train.trackers.base import Tracker
from tuneforge.train.trackers.mlflow import MLflow
from tuneforge.train.trackers.swanlab import SwanLab
from tuneforge.train.trackers.tensorboard import TensorBoard
from tuneforge.train.trackers.wandb import WandB

TRACKERS: dict[TrackerName, type[Tracker]] = {
    "tensorboard": TensorBoard, "wandb": WandB, "swanlab": SwanLab, "mlflow": MLflow}


def chosen(report_to: list[TrackerName] | None) -> list[TrackerName]:
    """The trackers a run reports to: the config's, or by default TensorBoard where it is installed
    (decided now, not when tuneforge was imported)."""
    if report_to is not None:
        return list(report_to)
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


def check(names: list[TrackerName]) -> None:
    """Each named tracker's packages are installed; else one line with the command that installs
    them (before the model loads: a missing extra should not cost the loading time)."""
    for name in names:
        missing = [p for p in TRACKERS[name].requires if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"report_to names {name}, but {missing[0]} is not installed; install it with "
                            f"pip install 'tuneforge[{name}]' (or remove {name} from report_to)")
