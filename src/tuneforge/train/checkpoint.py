"""Checkpoints: what one holds (``Checkpoint``), and ``iter_N.pth`` files written atomically
with ``last_checkpoint`` naming the newest.

A checkpoint holds what resuming needs (trainable weights, optimizer, scheduler, RNG states, the
step) and what converting needs (the config, the LoRA settings, the prompt template), always in
the one-process format whatever engine wrote it. On disk it is a plain dict (``to_dict``), so
any torch can read it; ``FORMAT_VERSION`` 1 is the dict written before this class existed
(the same keys, ``world_size`` optional), and still loads.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge import __version__
from tuneforge.data.templates import Template
from tuneforge.errors import UserError
from tuneforge.files import atomic_write

LAST = "last_checkpoint"
FORMAT_VERSION = 2
_ITER = re.compile(r"iter_(\d+)\.pth$")
_REQUIRED = ("step", "state_dict", "optimizer", "scheduler", "rng", "config", "method", "template")


@dataclass
class Checkpoint:
    step: int  # optimizer steps done
    state_dict: dict[str, torch.Tensor]  # the trainable weights, whole, by their peft/HF names
    optimizer: dict[str, Any]  # the torch optimizer's state_dict, whole
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # python, torch and CUDA generator states
    config: dict[str, Any]  # the Config it trained with, as JSON
    method: str  # lora | qlora | full
    template: Template
    peft_config: dict[str, Any] | None = None  # the LoRA settings (None for a full fine-tune)
    world_size: int = 1  # ranks that trained it
    # PiSSA, OLoRA, LoftQ: the LoRA weights as the variant started them (models/lora.py), which
    # converting subtracts so that the adapter applies to the original base
    initial_adapter: dict[str, torch.Tensor] | None = None
    tuneforge_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer tuneforge wrote

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "step": self.step, "state_dict": self.state_dict,
                "optimizer": self.optimizer, "scheduler": self.scheduler, "rng": self.rng,
                "config": self.config, "method": self.method, "peft_config": self.peft_config,
                "template": self.template.to_dict(), "tuneforge_version": self.tuneforge_version,
                "world_size": self.world_size, **self.extra,
                **({"initial_adapter": self.initial_adapter} if self.initial_adapter is not None else {})}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Checkpoint:
        if not isinstance(data, dict) or "state_dict" not in data:
            raise UserError(f"'{where}' is not a tuneforge checkpoint")
        absent = [k for k in _REQUIRED if k not in data]
        if absent:
            raise UserError(f"checkpoint '{where}' lacks {', '.join(absent)}; was it written by tuneforge?")
        version = int(data.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise UserError(f"checkpoint '{where}' has format {version}, newer than this tuneforge "
                            f"({__version__}, format {FORMAT_VERSION}) reads; upgrade tuneforge")
        known = {*_REQUIRED, "peft_config", "world_size", "tuneforge_version", "format_version",
                 "initial_adapter"}
        return cls(step=int(data["step"]), state_dict=data["state_dict"], optimizer=data["optimizer"],
                   scheduler=data["scheduler"], rng=data["rng"], config=data["config"],
                   method=data["method"], template=Template.from_dict(data["template"]),
                   peft_config=data.get("peft_config"), world_size=int(data.get("world_size", 1)),
                   initial_adapter=data.get("initial_adapter"),
                   tuneforge_version=data.get("tuneforge_version", "?"), format_version=version,
                   extra={k: v for k, v in data.items() if k not in known})

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches one optimizer step trained (ranks x accumulative_counts)."""
        return self.world_size * int(self.config["accumulative_counts"])

    def check_fits(self, trainable: set[str], method: str) -> None:
        """Resuming needs the same method and every trainable tensor of this run."""
        missing = trainable - set(self.state_dict)
        if missing or self.method != method:
            raise UserError(
                f"--resume: the checkpoint was written by a {self.method} run that does not match "
                f"this config ({method}, {len(missing)} trainable tensors missing); resume with "
                "the config it was trained with"
            )


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


def save_checkpoint(work_dir: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write ``iter_STEP.pth`` (flushed to disk, then renamed into place), point
    ``last_checkpoint`` at it, prune old ones beyond KEEP (0 or less: keep all). A kill or a
    full disk midway leaves the previous checkpoint and ``last_checkpoint`` as they were."""
    path = work_dir / f"iter_{ckpt.step}.pth"
    try:
        with atomic_write(path, "wb", durable=True) as f:
            torch.save(ckpt.to_dict(), f)
        with atomic_write(work_dir / LAST) as f:
            f.write(str(path.resolve()))
    except OSError as err:
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
    newest = newest_checkpoint(work_dir)
    if newest is None:
        raise UserError(f"--resume: no checkpoint in '{work_dir}' (no last_checkpoint, no iter_*.pth)")
    return newest


def newest_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint ``last_checkpoint`` names, else the newest ``iter_*.pth`` (a marker lost or
    naming a pruned file must not hide the checkpoints that are there)."""
    marker = work_dir / LAST
    if marker.is_file():
        path = Path(marker.read_text().strip())
        if path.is_file():
            return path
    found = list_checkpoints(work_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file, or a work dir's newest (as ``--resume`` picks it)."""
    path = Path(path)
    if path.is_dir():
        newest = newest_checkpoint(path)
        if newest is None:
            raise UserError(f"'{path}' is a directory without checkpoints (no last_checkpoint, no iter_*.pth); "
                            "pass iter_N.pth")
        path = newest
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(err).__name__}); is it complete?") from err
    return Checkpoint.from_dict(data, str(path))
