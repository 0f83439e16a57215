"""TensorBoard: event files in WORK_DIR/tensorboard, written through torch's SummaryWriter."""

from __future__ import annotations

from typing import Any

from tuneforge.train.trackers.base import Opened, RunInfo, Status, plain_config, scalars, texts


def _markdown(key: str, record: dict[str, Any], text: str) -> str:
    """TensorBoard shows text as Markdown: one question and answer per paragraph."""
    if key == "eval":
        return "\n\n".join(f"**Q:** {a['question']}  \n**A:** {a['answer']}" for a in record["eval"])
    return text


class TensorBoard:
    requires = ("tensorboard",)
    purges = True

    def open(self, run: RunInfo) -> Opened:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = run.work_dir / "tensorboard"
        # Each opening writes a SessionLog START at the first step it will log. TensorBoard takes a
        # START after the first as a restart and drops the events at and past its step that earlier
        # files hold: a resumed run's steps replace what the run before it logged past the
        # checkpoint, and a fresh run in the same work dir replaces the earlier run (step 0).
        self.writer = SummaryWriter(str(self.dir), purge_step=run.start + 1 if run.start else 0, flush_secs=10)
        if not run.start:  # a resumed run keeps the first one's hyper-parameters
            for summary in hparams(plain_config(run.config), {"loss": 0.0}):
                self.writer.file_writer.add_summary(summary)
        return Opened(None, f"event files in {self.dir}; view: tensorboard --logdir {self.dir}")

    def write(self, record: dict[str, Any]) -> None:
        step, when = record.get("step"), record.get("time")
        if step is None:
            return
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step, walltime=when)
        for key, text in texts(record).items():
            self.writer.add_text(key, _markdown(key, record, text), step, walltime=when)

    def close(self, status: Status) -> None:
        self.writer.close()
