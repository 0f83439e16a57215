"""Checks and warnings a run makes before its first step: settings that cannot work stop it
with one line, settings that work badly get a warning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tuneforge.config.schema import Config
from tuneforge.data.batching import steps_per_epoch
from tuneforge.errors import UserError
from tuneforge.train import parallel
from tuneforge.train.checkpoint import check_space, checkpoint_bytes

Say = Callable[[str], None]


def total_steps(n_rows: int, cfg: Config, world: int = 1) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return steps_per_epoch(n_rows, cfg.batch_size, cfg.accumulative_counts, world) * cfg.max_epochs


def checkpoints_kept(cfg: Config, steps: int) -> int:
    """How many checkpoints a run of STEPS steps will have on disk at once: the newest
    save_total_limit of those it writes, or all of them for -1 (or 0), which keeps every one."""
    written = steps // cfg.save_steps + (cfg.save_last and steps % cfg.save_steps != 0)
    return written if cfg.save_total_limit <= 0 else min(written, cfg.save_total_limit)


def check_deepspeed(cfg: Config, partitioned: bool) -> None:
    if cfg.optim_type != "AdamW":
        raise UserError(f"--deepspeed with optim_type='{cfg.optim_type}': DeepSpeed partitions AdamW's "
                        "state itself; use optim_type='AdamW'")
    if partitioned and cfg.method == "qlora":
        raise UserError("--deepspeed ZeRO-3 with method='qlora': 4-bit weights cannot be partitioned; "
                        "use deepspeed_zero2 (what XTuner's QLoRA recipes use)")


def warn_few_steps(n_rows: int, cfg: Config, world: int, say: Say) -> None:
    per_epoch = steps_per_epoch(n_rows, cfg.batch_size, cfg.accumulative_counts, world)
    if per_epoch < 20 and not cfg.max_steps:
        say(f"warning: only {per_epoch} optimizer step(s) per epoch ({n_rows} rows of up to "
            f"{cfg.max_length} tokens, {cfg.batch_size}x{cfg.accumulative_counts} rows per step): "
            "too few to learn from; lower max_length or accumulative_counts, or set max_steps")


def warn_lost_updates(cfg: Config, dtype: torch.dtype, deepspeed: bool, say: Say) -> None:
    """dtype='bfloat16' asks a full fine-tune to update bf16 weights: less memory, but most of
    AdamW's updates round away (models.load.training_dtypes; measured on the 7B-shaped model, 6
    steps: loss 12.3 -> 9.1 with bf16 weights under FSDP2, 12.3 -> 4.0 under ZeRO-3's fp32
    master weights)."""
    if cfg.method == "full" and dtype == torch.bfloat16 and not deepspeed:
        say(f"warning: full fine-tune of bf16 weights: AdamW updates of about lr={cfg.lr:g} are below "
            "bf16's precision for most weights and round away, so it learns slowly; dtype='auto' keeps "
            "fp32 master weights (bf16 compute), as does --deepspeed")


def check_room(work_dir: Path, params: list[torch.nn.Parameter], cfg: Config, steps: int,
               ranks: parallel.Ranks) -> None:
    """Room on disk for the checkpoints this run keeps. Rank 0 checks, every rank stops: an error
    on one rank alone leaves the others waiting forever in their next collective."""
    room = None
    if ranks.main:
        try:
            check_space(work_dir, checkpoint_bytes(params), checkpoints_kept(cfg, steps))
        except UserError as err:
            room = err
    if parallel.anyone(room is not None, ranks):
        raise room or UserError("rank 0 found no room for the checkpoints (its error is above)")
