"""A run with ``sft_steps`` is two recipes in one work dir: SFT on the identity conversations
(with replay) for ``sft_steps``, then the preference objective from its last checkpoint up to
``max_steps`` (its weights carry over, the optimizer and schedule start afresh). The step
numbers run on, so the last checkpoint is ``iter_{max_steps}.pth`` as for a one-stage run, and
``--resume`` picks the stage from the checkpoint it resumes."""

from __future__ import annotations

import re
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.train.checkpoint import find_resume, newest_checkpoint
from tuneforge.train.options import RunOptions

_STEP = re.compile(r"iter_(\d+)\.pth$")


def sft_stage(cfg: Config) -> Config:
    """CFG's first stage: SFT on its data_files for sft_steps, ending on a checkpoint."""
    return cfg.model_copy(update={
        "objective": "sft", "identity_pairs": False, "sft_steps": None, "max_steps": cfg.sft_steps,
        "lr": cfg.sft_lr or cfg.lr, "sft_lr": None, "save_last": True, "dpo_loss": None, "beta": None, "simpo_gamma": None, "orpo_lambda": None})


def sft_stage_done(cfg: Config, work_dir: Path, options: RunOptions) -> bool:
    """Whether the checkpoint --resume goes on from is past the SFT stage (or there is none to
    run: no sft_steps)."""
    if not cfg.sft_steps:
        return True
    if not options.resume or newest_checkpoint(work_dir) is None and not isinstance(options.resume, str):
        return False
    path = find_resume(work_dir, options.resume if isinstance(options.resume, str) else None)
    m = _STEP.search(path.name)
    return m is not None and int(m.group(1)) >= cfg.sft_steps
