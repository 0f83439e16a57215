"""The gated MLP's activation, silu(gate) * up, as one autograd function: it keeps gate and up for
backward and recomputes silu there, where autograd would also keep silu(gate)."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from tuneforge.fast.compiled import on_gpu


@on_gpu
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@on_gpu
def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = gate.float()
    sig = torch.sigmoid(g)
    dy32 = dy.float()
    d_up = (dy32 * g * sig).to(up.dtype)
    d_gate = (dy32 * up.float() * sig * (1 + g * (1 - sig))).to(gate.dtype)
    return d_gate, d_up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu(gate, up)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Route MODEL's gate/up/down SiLU MLPs (Llama, Qwen, Mistral...) through the fused
    activation; returns how many."""
    n = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if not all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) \
                or not isinstance(act, torch.nn.SiLU) and type(act).__name__ != "SiLUActivation":
            continue
        module.forward = types.MethodType(_forward, module)
        n += 1
    return n
