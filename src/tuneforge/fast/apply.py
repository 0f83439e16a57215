"""Every patch the fast path makes to a model about to be trained, in one call.

The order matters and is fixed here: the attention implementation and the fused kernels
first (they change what a layer keeps for its backward), then the memory plan (it measures
the fused layers), then compilation (after the plan's probe forwards, which would otherwise
compile for their own shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.fast import attention, recompute
from tuneforge.fast.compiled import compile_layers
from tuneforge.fast.path import FastPath, causal_lm, enable, plan_recompute
from tuneforge.models import probe


@dataclass(frozen=True)
class Target:
    """What the fast path needs to know about where and how the model will train."""
    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype of the matmuls, if any
    weight_share: float = 1.0  # the part of the weights each GPU keeps (< 1 when sharded)
    first_step_bytes: int = 0  # what the first optimizer step adds on each GPU
    partitioned: bool = False  # DeepSpeed ZeRO-3: a weight is whole only inside its own forward
    compile: bool = True  # compile the decoder layers on a GPU


def apply(model: Any, cfg: Config, target: Target, say: Callable[[str], None]) -> FastPath:
    """Patch MODEL (adapters already on, gradient checkpointing enabled) as CFG asks for training
    on TARGET; returns what was changed."""
    fast = FastPath()
    if cfg.fast_path and probe.runs_own_code(model):
        # its own code looks attention up in its own table and computes its own head
        say("the model runs its own code (trust_remote_code): trained through the plain path "
            "(no fused kernels, varlen attention or chunked head)")
    elif cfg.fast_path:
        varlen = target.device.type == "cuda" and attention.varlen_available()
        if varlen:
            causal_lm(model).set_attn_implementation(attention.register())
        fast = enable(model, varlen=varlen, partitioned=target.partitioned)
        for name, n in (fast.peft_layers or {}).items():
            say(f"{name}: {n} LoRA layers run peft's own forward (the fused LoRA computes plain LoRA only)")
    fast.memory = plan_memory(model, cfg, target)
    # Not ZeRO-3 (its hooks gather weights inside the layer). 4-bit layers compile too: bitsandbytes
    # (>= 0.46) defines its dequantisation as torch.library ops, so the fused LoRA function, with
    # its dequantise-in-forward-and-again-in-backward, traces into the layer's graph unchanged.
    if fast.fused and target.device.type == "cuda" and target.compile and not target.partitioned:
        fast.compiled_layers = compile_layers(recompute.decoder_layers(model))
    return fast


def plan_memory(model: Any, cfg: Config, target: Target) -> recompute.Plan | None:
    """With gradient_checkpointing='auto': on a GPU, recompute as few layers as the memory budget
    allows (returns the plan); on a CPU, none. Runs with the whole model on its device, before
    any sharding: TARGET says what each GPU will keep of it and what the first step adds."""
    if cfg.gradient_checkpointing != "auto":
        return None
    if target.device.type != "cuda":
        recompute.apply(recompute.decoder_layers(model), 0)
        return None
    return plan_recompute(model, cfg.max_length * cfg.batch_size, cfg.memory_budget_gib, target.amp,
                          target.first_step_bytes, weight_share=target.weight_share)
