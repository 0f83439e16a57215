"""How many decoder layers to recompute in backward, picked from the memory there is.

Recomputing a layer (gradient checkpointing) costs a second forward pass of it but keeps only its
input; a layer that is not recomputed keeps every tensor its backward needs. The bytes a layer
keeps per token are read off the model itself, by running a short probe forward with hooks that
count what autograd saves, so the estimate follows the model's real shapes and the fused
functions in use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

GIB = 1 << 30


@dataclass
class Plan:
    layers: int
    recomputed: int
    saved_per_token_layer: int  # bytes autograd keeps per token in one layer, not recomputed
    budget_gib: float
    need_gib: float  # the estimated peak with this plan
    offload: bool = False  # recomputed layers keep their input in CPU memory, not on the GPU
    fixed_gib: float = 0.0  # the part of the peak no plan changes (weights, optimizer state)
    margin_gib: float = 0.0  # kept free of the budget for what no estimate sees (fragmentation)

    def describe(self) -> str:
        kind = "off" if self.recomputed == 0 else "full" if self.recomputed == self.layers else "selective"
        return (f"recompute {kind}: {self.recomputed}/{self.layers} layers"
                f"{', inputs offloaded to CPU' if self.offload else ''} "
                f"(est. peak {self.need_gib:.1f} of {self.budget_gib:.1f} GiB budget)")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def saved_bytes(model: torch.nn.Module, layers: list[torch.nn.Module], forward: Any) -> int:
    """Bytes autograd saves in the busiest decoder layer during FORWARD(), a callable that runs
    the model. Tensors shared between ops count once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    current: list[int] = []
    seen: list[set[tuple[int, int]]] = [set() for _ in layers]
    total = [0] * len(layers)

    kept: list[torch.Tensor] = []  # alive until the end, so no two tensors share an address

    def pack(t: torch.Tensor) -> None:
        kept.append(t)
        if current and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            i = current[-1]
            if key[0] not in params and key not in seen[i]:
                seen[i].add(key)
                total[i] += t.untyped_storage().nbytes()
        return None  # the probe never runs backward

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
        kept.clear()
        for h in handles:
            h.remove()
        for layer, f in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = f
    return max(total)


def saved_bytes_per_token(model: torch.nn.Module, layers: list[torch.nn.Module],
                          forward: Any, tokens: int) -> int:
    """saved_bytes of a FORWARD() on TOKENS tokens, per token (weights' copies included)."""
    return saved_bytes(model, layers, forward) // tokens


def bytes_per_token(model: torch.nn.Module, layers: list[torch.nn.Module],
                    forward: Callable[[int], None], tokens: int) -> int:
    """What the busiest layer saves for each further token: FORWARD(n) runs the model on n tokens,
    here TOKENS and half as many, and the difference is divided out. A probe this short also
    saves what does not grow with the sequence, most of all the bf16 copies autocast makes of
    fp32 weights (a full fine-tune with fp32 master weights): on a 7B model that is 15 GB, which
    divided by 128 tokens made recomputation look necessary where it was not."""
    half = tokens // 2
    if half < 8:
        return saved_bytes_per_token(model, layers, lambda: forward(tokens), tokens)
    more = saved_bytes(model, layers, lambda: forward(tokens))
    fewer = saved_bytes(model, layers, lambda: forward(half))
    return max(0, more - fewer) // (tokens - half)


def plan(n_layers: int, saved_per_token_layer: int, hidden_size: int, tokens: int,
         fixed_bytes: int, budget_bytes: int, margin_bytes: int = 0, head_bytes: int = 0) -> Plan:
    """The fewest recomputed layers whose estimated peak, plus MARGIN_BYTES, fits BUDGET_BYTES;
    if even recomputing every layer does not fit, their inputs go to CPU memory as well. The
    plan's ``need_gib`` is the estimate itself, without the margin, so that it can be checked
    against the peak measured.

    FIXED_BYTES: what is allocated whatever the plan (weights, adapter, optimizer state).
    A recomputed layer keeps its input (``2 * hidden`` bytes a token), a kept one every tensor
    its backward needs. The peak is the larger of two moments: the head's backward, which comes
    first, with every layer's saved tensors and HEAD_BYTES (a chunk of logits) on top; and the
    backward of a recomputed layer, which holds one whole layer's tensors, by when the kept
    layers (the last ones, whose backward runs first) have freed theirs and the head is done.
    """
    keep_all = saved_per_token_layer * tokens
    ckpt = 2 * hidden_size * tokens

    def need(recomputed: int, offload: bool = False) -> int:
        inputs = 0 if offload else recomputed * ckpt
        at_head = (n_layers - recomputed) * keep_all + inputs + head_bytes
        in_recomputed = inputs + keep_all if recomputed else 0
        return fixed_bytes + max(at_head, in_recomputed)

    def made(recomputed: int, offload: bool = False) -> Plan:
        return Plan(n_layers, recomputed, saved_per_token_layer, budget_bytes / GIB,
                    need(recomputed, offload) / GIB, offload, fixed_bytes / GIB, margin_bytes / GIB)

    for recomputed in range(0, n_layers + 1):
        if need(recomputed) + margin_bytes <= budget_bytes:
            return made(recomputed)
    return made(n_layers, offload=True)


class OffloadedCheckpoint(torch.autograd.Function):
    """Gradient checkpointing whose saved input waits in pinned CPU memory (reentrant style:
    backward copies it back, reruns the layer with autograd on, and backpropagates through it)."""

    @staticmethod
    def forward(ctx: Any, run: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.device = x.device
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.cpu = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        ctx.cpu.copy_(x, non_blocking=True)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[None, torch.Tensor]:
        x = ctx.cpu.to(ctx.device, non_blocking=True).requires_grad_(True)
        cpu_rng, gpu_rng = torch.get_rng_state(), torch.cuda.get_rng_state(ctx.device) if x.is_cuda else None
        torch.set_rng_state(ctx.rng[0])
        if ctx.rng[1] is not None:
            torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
        try:
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=ctx.autocast[1],
                                                     enabled=ctx.autocast[0]):
                out = ctx.run(x)
            torch.autograd.backward(out, dy)
        finally:
            torch.set_rng_state(cpu_rng)
            if gpu_rng is not None:
                torch.cuda.set_rng_state(gpu_rng, ctx.device)
        return None, x.grad


def offloaded_checkpoint(run: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
    if args:  # transformers passes everything but the hidden states by keyword; be safe
        return torch.utils.checkpoint.checkpoint(run, x, *args, use_reentrant=False)
    return OffloadedCheckpoint.apply(run, x)


def apply(layers: list[torch.nn.Module], recomputed: int, offload: bool = False) -> None:
    """Recompute the first RECOMPUTED layers; the last ones, whose backward runs first, keep
    their tensors. Gradient checkpointing must already be enabled on the model."""
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < recomputed
        if offload and i < recomputed:
            layer._gradient_checkpointing_func = offloaded_checkpoint
