"""Checkpoints: ``iter_N.pth`` files written atomically, ``last_checkpoint`` naming the newest.

A checkpoint holds what resuming needs (trainable weights, optimizer, scheduler, RNG states, the
step) and what converting needs (the config, the LoRA settings, the prompt template).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import UserError

LAST = "last_checkpoint"
_ITER = re.compile(r"iter_(\d+)\.pth$")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(work_dir: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``iter_STEP.pth`` (tmp file, flushed to disk, then renamed), point
    ``last_checkpoint`` at it, prune old ones. A kill or a full disk midway leaves the previous
    checkpoint and ``last_checkpoint`` as they were."""
    path = work_dir / f"iter_{step}.pth"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _atomic_write_text(work_dir / LAST, str(path.resolve()))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        previous = list_checkpoints(work_dir)
        raise UserError(f"could not write checkpoint {path}: {err.strerror or err}; the last good "
                        f"checkpoint is {previous[-1] if previous else 'none yet'}: free space, then "
                        "run the same command with --resume") from err
    if keep > 0:
        for old in list_checkpoints(work_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def checkpoint_bytes(trainable: list[torch.nn.Parameter]) -> int:
    """About what one checkpoint takes: the trainable weights and AdamW's two moments, in fp32."""
    return sum(p.numel() for p in trainable) * 4 * 3


def check_space(work_dir: Path, each: int, kept: int) -> None:
    """Fail before training, not hours in, when WORK_DIR cannot hold the KEPT checkpoints that
    will be on disk together."""
    if not os.access(work_dir, os.W_OK):
        raise UserError(f"work dir '{work_dir}' is not writable; pick another with --work-dir")
    if kept == 0:
        return
    free = shutil.disk_usage(work_dir).free
    need = each * (kept + 1)  # the kept ones, and the next one being written
    if free < need:
        raise UserError(f"work dir '{work_dir}' has {free / 2**30:.2f} GiB free; checkpoints take "
                        f"{each / 2**30:.2f} GiB each and {kept} are kept (save_total_limit), so "
                        f"about {need / 2**30:.2f} GiB is needed: free space or use another --work-dir")


def list_checkpoints(work_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in work_dir.glob("iter_*.pth") if (m := _ITER.search(p.name))]
    return [p for _, p in sorted(found)]


def find_resume(work_dir: Path, requested: str | None) -> Path:
    """The checkpoint to resume from: REQUESTED, or the one ``last_checkpoint`` names."""
    if requested:
        path = Path(requested)
        if not path.is_file():
            raise UserError(f"--resume: checkpoint '{path}' not found")
        return path
    marker = work_dir / LAST
    if marker.is_file():
        path = Path(marker.read_text().strip())
        if path.is_file():
            return path
    found = list_checkpoints(work_dir)
    if found:
        return found[-1]
    raise UserError(f"--resume: no checkpoint in '{work_dir}' (no last_checkpoint, no iter_*.pth)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        marker = path / LAST
        if not marker.is_file():
            raise UserError(f"'{path}' is a directory without a last_checkpoint file; pass iter_N.pth")
        path = Path(marker.read_text().strip())
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(err).__name__}); is it complete?") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"'{path}' is not a tuneforge checkpoint")
    return ckpt
