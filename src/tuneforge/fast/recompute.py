"""How many decoder layers to recompute in backward, picked from the memory there is.

Recomputing a layer (gradient checkpointing) costs a second forward pass of it but keeps only its
input; a layer that is not recomputed keeps every tensor its backward needs. The bytes a layer
keeps per token are read off the model itself, by running a short probe forward with hooks that
count what autograd saves, so the estimate follows the model's real shapes and the fused
functions in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

GIB = 1 << 30


@dataclass
class Plan:
    layers: int
    recomputed: int
    saved_per_token_layer: int  # bytes autograd keeps per token in one layer, not recomputed
    budget_gib: float
    need_gib: float  # the estimated peak with this plan

    def describe(self) -> str:
        kind = "off" if self.recomputed == 0 else "full" if self.recomputed == self.layers else "selective"
        return (f"recompute {kind}: {self.recomputed}/{self.layers} layers "
                f"(est. peak {self.need_gib:.1f} of {self.budget_gib:.1f} GiB budget)")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def saved_bytes_per_token(model: torch.nn.Module, layers: list[torch.nn.Module],
                          forward: Any, tokens: int) -> int:
    """Bytes autograd saves per token in the busiest decoder layer during FORWARD(), a callable
    that runs the model on TOKENS tokens. Tensors shared between ops count once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    current: list[int] = []
    seen: list[set[tuple[int, int]]] = [set() for _ in layers]
    total = [0] * len(layers)

    def pack(t: torch.Tensor) -> None:
        if current and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            i = current[-1]
            if key[0] not in params and key not in seen[i]:
                seen[i].add(key)
                total[i] += t.untyped_storage().nbytes()
        return None  # nothing is kept: the probe never runs backward

    def leave(module: Any, args: Any, output: Any) -> None:
        current.pop()  # a forward hook's return value would replace the output: return None

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.append(i)))
        handles.append(layer.register_forward_hook(leave))
    flags = [layer.gradient_checkpointing for layer in layers]
    try:
        for layer in layers:
            layer.gradient_checkpointing = False
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            forward()
    finally:
        for h in handles:
            h.remove()
        for layer, f in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = f
    return max(total) // tokens


def plan(n_layers: int, saved_per_token_layer: int, hidden_size: int, tokens: int,
         fixed_bytes: int, budget_bytes: int) -> Plan:
    """The fewest recomputed layers whose estimated peak fits BUDGET_BYTES.

    FIXED_BYTES: what is allocated whatever the plan (weights, adapter, optimizer state, one
    chunk of logits). A recomputed layer keeps its input (``2 * hidden`` bytes a token); the
    backward of a recomputed layer briefly holds one whole layer's tensors on top.
    """
    keep_all = saved_per_token_layer * tokens
    ckpt = 2 * hidden_size * tokens
    best = n_layers
    for recomputed in range(0, n_layers + 1):
        need = fixed_bytes + (n_layers - recomputed) * keep_all + recomputed * ckpt \
            + (keep_all if recomputed else 0)
        if need <= budget_bytes:
            best = recomputed
            break
    need = fixed_bytes + (n_layers - best) * keep_all + best * ckpt + (keep_all if best else 0)
    return Plan(n_layers, best, saved_per_token_layer, budget_bytes / GIB, need / GIB)


def apply(layers: list[torch.nn.Module], recomputed: int) -> None:
    """Recompute the first RECOMPUTED layers; the last ones, whose backward runs first, keep
    their tensors. Gradient checkpointing must already be enabled on the model."""
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < recomputed
