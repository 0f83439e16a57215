"""Weights & Biases: offline under WORK_DIR/wandb unless WANDB_MODE or WANDB_API_KEY is set."""

from __future__ import annotations

import os
from typing import Any

from tuneforge.train.trackers.base import Opened, RunInfo, Status, scalars, texts


class WandB:
    requires = ("wandb",)
    purges = False

    def open(self, run: RunInfo) -> Opened:
        import wandb

        # No key and no mode: a machine that may have no network; `wandb sync` uploads the run later.
        offline = not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tuneforge"), name=run.work_dir.name, dir=str(run.work_dir),
            config=None if run.run_id else run.config, id=run.run_id, resume="allow" if run.run_id else None,
            mode="offline" if offline else None, reinit="create_new",
            # console="off": tuneforge's own output stays as it is (no wrapped stdout)
            settings=wandb.Settings(console="off", quiet=True))
        if self.run.offline:  # a resumed run is one more folder of the same run; wandb sync takes them in order
            folder = os.path.dirname(self.run.dir)  # .../wandb/offline-run-TIME-ID/files
            every = os.path.join(os.path.dirname(folder), f"offline-run-*-{self.run.id}")
            return Opened(self.run.id, f"offline run {self.run.id} in {folder}; upload: wandb sync {every}")
        return Opened(self.run.id, f"run {self.run.url}")

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if step is None:
            return
        data: dict[str, Any] = {**scalars(record), **texts(record)}
        if "eval" in record:  # a table of question and answer, one per evaluation
            data["eval"] = self.wandb.Table(columns=["question", "answer"],
                                            data=[[a["question"], a["answer"]] for a in record["eval"]])
        if data:
            self.run.log(data, step=step)

    def close(self, status: Status) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
