"""AdamW with linear warmup then cosine decay to zero (XTuner's LinearLR + CosineAnnealingLR)."""

from __future__ import annotations

import math
from typing import Any

import torch

from tuneforge.config.schema import Config


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Multiplier on the peak lr for optimizer step STEP (0-based)."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_ratio: float) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_ratio)
    )
