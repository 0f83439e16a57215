"""How many decoder layers to recompute in backward, picked from the memory there is.

Recomputing a layer (gradient checkpointing) costs a second forward pass of it but keeps only its
input; a layer that is not recomputed keeps every tensor its backward needs. The bytes a layer
keeps per token are read off the model itself, by running a short probe forward with hooks that
count what autograd saves, so the estimate follows the model's real shapes and the fused
functions in use.
"""

from __future__ import annotations

import mmap
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

GIB = 1 << 30
PAGE = mmap.PAGESIZE


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


# The time an offloaded input costs against a recomputed layer, measured on one H200 (7B shape,
# 4096-token rows, benchmarks/RESULTS.md run 6): recomputing a layer ~4.0 ms, offloading its input
# on the side stream ~0.3-0.55 ms (copies that do not quite hide behind the compute).
OFFLOAD_COST = 1 / 8  # of one recomputed layer


def plan(n_layers: int, saved_per_token_layer: int, hidden_size: int, tokens: int,
         fixed_bytes: int, budget_bytes: int, margin_bytes: int = 0, head_bytes: int = 0,
         host_bytes: int = 0) -> Plan:
    """The cheapest plan whose estimated peak, plus MARGIN_BYTES, fits BUDGET_BYTES: how many
    layers to recompute, and whether their inputs wait in CPU memory (offload), which lets fewer
    layers be recomputed. A recomputed layer costs a second forward; an offloaded input costs
    OFFLOAD_COST of that (its copies run on a side stream, ``OffloadedCheckpoint``), so inputs are
    offloaded where that saves more recomputation than it costs, and where HOST_BYTES (the CPU
    memory the run may pin) holds them; at equal cost they stay on the GPU. If even recomputing
    every layer does not fit, their inputs are offloaded regardless. The plan's ``need_gib`` is
    the estimate itself, without the margin, so that it can be checked against the peak measured.

    FIXED_BYTES: what is allocated whatever the plan (weights, adapter, optimizer state).
    A recomputed layer keeps its input (``2 * hidden`` bytes a token), a kept one every tensor
    its backward needs. The peak is the larger of two moments: the head's backward, which comes
    first, with every layer's saved tensors and HEAD_BYTES (a chunk of logits) on top; and the
    backward of a recomputed layer, which holds one whole layer's tensors, by when the kept
    layers (the last ones, whose backward runs first) have freed theirs and the head is done;
    offloaded, it also holds the next layer's input, copied back ahead of its backward.
    """
    keep_all = saved_per_token_layer * tokens
    ckpt = 2 * hidden_size * tokens

    def need(recomputed: int, offload: bool = False) -> int:
        inputs = 2 * ckpt if offload else recomputed * ckpt  # offloaded: its own and the next one's
        at_head = (n_layers - recomputed) * keep_all + (0 if offload else inputs) + head_bytes
        in_recomputed = inputs + keep_all if recomputed else 0
        return fixed_bytes + max(at_head, in_recomputed)

    def made(recomputed: int, offload: bool = False) -> Plan:
        return Plan(n_layers, recomputed, saved_per_token_layer, budget_bytes / GIB,
                    need(recomputed, offload) / GIB, offload, fixed_bytes / GIB, margin_bytes / GIB)

    fits = [(r * (1 + OFFLOAD_COST * offload), offload, r) for r in range(n_layers + 1) for offload in (False, True)
            if (not offload or r > 0 and r * ckpt <= host_bytes) and need(r, offload) + margin_bytes <= budget_bytes]
    if not fits:
        return made(n_layers, offload=True)
    _, offload, recomputed = min(fits)
    return made(recomputed, offload)


class OffloadChain:
    """The inputs that one forward pass sent to CPU memory, by layer; the backward of layer i
    starts copying back layer i - 1's (whose backward runs next) on the side stream, so that the
    copy overlaps layer i's recomputation and backward."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.saved: dict[int, weakref.ref] = {}  # weak: a forward no backward follows frees its graph
        self.host = HostBuffers()

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def fetch(self, ctx: Any) -> torch.Tensor:
        """CTX's input on the GPU, ready for the compute stream."""
        self.saved.pop(ctx.layer, None)
        if ctx.device.type != "cuda":  # a CPU run: the saved input is the input
            return ctx.cpu.detach()
        if ctx.gpu is None:
            self.copy_back(ctx)
        compute = torch.cuda.current_stream(ctx.device)
        compute.wait_event(ctx.ready)
        x, ctx.gpu = ctx.gpu, None
        x.record_stream(compute)  # allocated on the side stream, used on this one
        ref = self.saved.get(ctx.layer - 1)
        previous = ref() if ref is not None else None
        if previous is not None and previous.gpu is None:
            self.copy_back(previous)
        return x

    def copy_back(self, ctx: Any) -> None:
        stream = self.side_stream(ctx.device)
        stream.wait_stream(torch.cuda.current_stream(ctx.device))
        with torch.cuda.stream(stream):
            ctx.gpu = ctx.cpu.to(ctx.device, non_blocking=True)
            ctx.ready = torch.cuda.Event()
            ctx.ready.record(stream)


class HostBuffers:
    """One page-locked CPU buffer per offloaded layer, of the size its input needs (to the page), kept
    from step to step. ``torch.empty(pin_memory=True)`` rounds every allocation up to a power of
    two: a 320k-token row's 2.5 GiB layer input takes 4 GiB there, 60% more host memory for
    every layer, and host memory is what ends a long-context run. Reuse is safe because every
    copy into or out of a buffer runs on the chain's one side stream, in order."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}
        self.registered: list[int] = []  # addresses to unregister before their memory goes
        self.pinning = True

    def get(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """Pinned CPU memory shaped and typed like LIKE, for LAYER's input."""
        need = like.numel() * like.element_size()
        buf = self.buffers.get(layer)
        if buf is None or buf.numel() < need:
            if buf is not None:
                self._release(buf)
            buf = self.buffers[layer] = self._pinned(need)
        return buf[:need].view(like.dtype).view(like.shape)

    def _pinned(self, nbytes: int) -> torch.Tensor:
        """NBYTES (rounded up to whole pages) of page-locked memory, its start page-aligned: the
        region registered is whole pages, whatever the C allocator's alignment."""
        if self.pinning:
            size = -(-nbytes // PAGE) * PAGE
            raw = torch.empty(size + PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % PAGE
            buf = raw[start:start + size]  # the view keeps RAW's memory alive
            rc = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
            if rc == 0:
                self.registered.append(buf.data_ptr())
                return buf
            self.pinning = False  # e.g. a container's locked-memory limit
            warnings.warn(f"offloaded layer inputs: cudaHostRegister refused {size} bytes (CUDA error {rc}); "
                          "using torch's pinned allocator, which rounds each buffer up to a power of two "
                          "(up to 2x the host memory)", stacklevel=2)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _release(self, buf: torch.Tensor) -> None:
        torch.cuda.synchronize()  # no copy may still read or write it
        if buf.data_ptr() in self.registered:
            self.registered.remove(buf.data_ptr())
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

    def __del__(self) -> None:
        try:
            if self.registered:
                torch.cuda.synchronize()
            for ptr in self.registered:
                torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # interpreter shutdown: the process's memory goes with it
            pass
        self.registered = []


class OffloadedCheckpoint(torch.autograd.Function):
    """Gradient checkpointing whose saved input waits in pinned CPU memory (reentrant style:
    backward copies it back, reruns the layer with autograd on, and backpropagates through it).
    Both copies run on CHAIN's side stream, the one out behind the layer's forward, the one back
    ahead of the layer's backward."""

    @staticmethod
    def forward(ctx: Any, run: Any, chain: OffloadChain, layer: int, x: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.chain, ctx.layer, ctx.device, ctx.gpu = run, chain, layer, x.device, None
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        if x.is_cuda:
            stream = chain.side_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            previous = chain.saved.get(layer)
            busy = previous is not None and previous() is not None and previous().cpu is not None
            with torch.cuda.stream(stream):
                # a second forward before the first one's backward (never in our objectives) must
                # not overwrite the layer's buffer: it gets one of its own
                ctx.cpu = torch.empty(x.shape, dtype=x.dtype, pin_memory=True) if busy \
                    else chain.host.get(layer, x)
                ctx.cpu.copy_(x, non_blocking=True)
            x.record_stream(stream)  # not reused by the compute stream before the copy is done
        else:
            ctx.cpu = x.detach().clone()
        chain.saved[layer] = weakref.ref(ctx)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[None, None, None, torch.Tensor]:
        x = ctx.chain.fetch(ctx).requires_grad_(True)
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
        ctx.cpu = None
        return None, None, None, x.grad


def offloaded(chain: OffloadChain, layer: int) -> Callable[..., torch.Tensor]:
    """The checkpoint function of decoder layer LAYER, its input offloaded through CHAIN."""
    def checkpoint(run: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if args:  # transformers passes everything but the hidden states by keyword; be safe
            return torch.utils.checkpoint.checkpoint(run, x, *args, use_reentrant=False)
        if not torch.is_grad_enabled():  # e.g. a reference forward: no backward will ask for it
            return run(x)
        return OffloadedCheckpoint.apply(run, chain, layer, x)
    return checkpoint


def apply(layers: list[torch.nn.Module], recomputed: int, offload: bool = False) -> OffloadChain:
    """Recompute the first RECOMPUTED layers; the last ones, whose backward runs first, keep
    their tensors. Gradient checkpointing must already be enabled on the model. Returns the
    chain the offloaded layers share (empty where none is)."""
    chain = OffloadChain()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < recomputed
        if offload and i < recomputed:
            layer._gradient_checkpointing_func = offloaded(chain, i)
    return chain
