"""SwanLab: offline under WORK_DIR/swanlog unless SWANLAB_MODE or SWANLAB_API_KEY is set."""

from __future__ import annotations

import os
from typing import Any

from tuneforge.train.trackers.base import Opened, RunInfo, Status, scalars, texts

STATES = {"finished": "success", "failed": "crashed", "killed": "aborted"}


class SwanLab:
    requires = ("swanlab",)
    purges = False

    def open(self, run: RunInfo) -> Opened:
        import swanlab

        # No key and no mode: a machine that may have no network; `swanlab sync` uploads the run later.
        offline = not (os.environ.get("SWANLAB_MODE") or os.environ.get("SWANLAB_API_KEY"))
        self.swanlab = swanlab
        self.run = swanlab.init(
            project=os.environ.get("SWANLAB_PROJ_NAME", "tuneforge"), name=run.work_dir.name,
            log_dir=str(run.work_dir / "swanlog"), config=None if run.run_id else run.config,
            id=run.run_id, resume="allow" if run.run_id else None, mode="offline" if offline else None,
            # tuneforge's own output stays as it is (SwanLab would otherwise wrap stdout and stderr)
            settings=swanlab.Settings(terminal={"proxy_type": "none"}))
        if self.run.mode == "offline":  # a resumed run is one more folder of the same run: sync each with --id
            return Opened(self.run.id, f"offline run {self.run.id} in {self.run.dir}; upload: swanlab sync "
                                       f"{self.run.dir} --id {self.run.id}")
        return Opened(self.run.id, f"run {self.run.url or self.run.dir}")

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if step is None:
            return
        data: dict[str, Any] = dict(scalars(record))
        data.update({k: self.swanlab.Text(v) for k, v in texts(record).items()})
        if data:
            self.run.log(data, step=step)

    def close(self, status: Status) -> None:
        self.run.finish(state=STATES[status], error=None if status == "finished" else f"training {status}")
