"""How to run a training (not what to train, which is the config): the command line's flags as
one typed object, built by the CLI and read by the recipe."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    resume: str | bool | None = None  # True: the work dir's last checkpoint; a path: that one
    deepspeed: str | None = None  # a shipped preset name or a DeepSpeed JSON file
    fsdp: bool = False  # PyTorch FSDP2 instead of data parallel
    profile: bool = False  # record a few steps with torch.profiler (train/profile.py)
    progress: bool = True  # a live bar on a terminal, a line per tenth of the run in a log
    compile: bool = True  # compile the decoder layers on a GPU
