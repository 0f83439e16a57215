"""AdamW (or bitsandbytes' 8-bit AdamW, whose moments take a quarter of the memory) with linear
warmup then cosine decay to zero (XTuner's LinearLR + CosineAnnealingLR); with LoRA+ the B side
of each adapter in a second parameter group at ratio x lr."""

from __future__ import annotations

import math
from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import UserError


def learns_faster(name: str, param: torch.nn.Parameter) -> bool:
    """LoRA+'s B side, picked as peft's create_loraplus_optimizer picks it: the B matrices, and
    trainable vectors (DoRA's magnitudes)."""
    return "lora_B" in name or param.ndim == 1


def in_group_order(named: dict[str, torch.nn.Parameter], cfg: Config) -> dict[str, torch.nn.Parameter]:
    """NAMED as the optimizer's groups hold them, one group after the other: the optimizer state's
    parameter numbers then follow NAMED's order, which every engine's checkpoint code assumes."""
    if cfg.lora_plus_ratio is None:
        return named
    slow = {n: p for n, p in named.items() if not learns_faster(n, p)}
    return slow | {n: p for n, p in named.items() if n not in slow}


def param_groups(named: dict[str, torch.nn.Parameter], cfg: Config) -> list[dict[str, Any]]:
    """One group at lr; with lora_plus_ratio, the A side at lr and the B side at ratio x lr
    (the scheduler scales both alike)."""
    if cfg.lora_plus_ratio is None:
        return [{"params": list(named.values())}]
    named = in_group_order(named, cfg)
    fast = [p for n, p in named.items() if learns_faster(n, p)]
    slow = [p for n, p in named.items() if not learns_faster(n, p)]
    groups = [{"params": slow, "lr": cfg.lr}, {"params": fast, "lr": cfg.lr * cfg.lora_plus_ratio}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: list[torch.nn.Parameter] | dict[str, torch.nn.Parameter],
                    cfg: Config) -> torch.optim.Optimizer:
    """The optimizer over PARAMS; by name (a dict, in_group_order's order) for LoRA+."""
    if not isinstance(params, dict):
        if cfg.lora_plus_ratio is not None:
            raise ValueError("LoRA+ needs the parameters by name")
        params = {str(i): p for i, p in enumerate(params)}
    groups = param_groups(params, cfg)
    params = list(params.values())
    if cfg.optim_type == "AdamW8bit":
        if not all(p.is_cuda for p in params):
            raise UserError("optim_type='AdamW8bit' needs a CUDA GPU; use optim_type='AdamW' on CPU")
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError as err:
            raise UserError("optim_type='AdamW8bit' needs bitsandbytes: pip install bitsandbytes") from err
        return AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def moment_bytes(params: list[torch.nn.Parameter], cfg: Config) -> int:
    """What the optimizer's two moments will take once the first step has run."""
    return sum(p.numel() for p in params) * (2 if cfg.optim_type == "AdamW8bit" else 2 * 4)


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


def first_step_bytes(params: list[torch.nn.Parameter], cfg: Config, part: Any = None) -> int:
    """What the first optimizer step adds on each GPU: gradients, AdamW's moments and, under
    DeepSpeed, the fp32 master copy of 16-bit weights, each cut to PART (an engine's Shares;
    None: one GPU holds everything)."""
    grads = sum(p.numel() * p.element_size() for p in params)
    optimizer = moment_bytes(params, cfg)
    if part is None:
        return grads + optimizer
    if part.fp32_master:
        optimizer += sum(p.numel() * 4 for p in params if p.element_size() < 4)
    return int(grads * part.gradients + optimizer * part.optimizer)
