"""LoRA linear layers as one autograd function: y = x W^T + s (x A^T) B^T.

peft's layer casts the input to the adapter's fp32 dtype, runs three separate modules and lets
autograd save a copy of the input per layer. Here the adapter runs in the compute dtype, the input
is saved once (q/k/v and gate/up share it) and a 4-bit base weight is dequantised on the fly in
forward and again in backward, so no full-precision copy of it ever stays alive. The peft module
tree and parameter names are left as they are, so checkpoints and adapters keep their layout.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on X run in: autocast's when it is on, else X's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# While generating on a CPU (the evaluation hook), each weight is dequantised (and merged with its
# adapter) once and kept, not once per layer call: 600 new tokens made the hook take minutes otherwise.
_dense_cache: dict[tuple[int, torch.dtype], torch.Tensor] | None = None


@contextlib.contextmanager
def dense_4bit_weights() -> Iterator[None]:
    """Within this block, ``base_weight`` dequantises each 4-bit weight once (no grad needed)."""
    global _dense_cache
    outer, _dense_cache = _dense_cache, {}
    try:
        yield
    finally:
        _dense_cache = outer


def _dequantized(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W dense in DTYPE, made afresh (4-bit weights dequantised)."""
    quant_state = getattr(w, "quant_state", None)
    if quant_state is None:
        return w.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, quant_state).to(dtype)


def base_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A base layer's weight W as a dense (out, in) tensor in DTYPE; a 4-bit weight is
    dequantised, once per ``dense_4bit_weights`` block."""
    if getattr(w, "quant_state", None) is None or _dense_cache is None:
        return _dequantized(w, dtype)
    key = (id(w), dtype)
    if key not in _dense_cache:
        _dense_cache[key] = _dequantized(w, dtype)
    return _dense_cache[key]


class LoraLinearFunction(torch.autograd.Function):
    """A training step of a 7B model launches ~30k kernels, a few microseconds of CPU each, and
    the GPU waits whenever Python falls behind: this function keeps its own count down. The
    adapters are cast to the compute dtype once per micro-batch (the casts are saved for backward)
    and the LoRA scaling rides on the GEMMs' alpha instead of separate multiplies."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, scaling: float, dropout: float, dtype: torch.dtype) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(dtype)
        keep = torch.rand_like(x) >= dropout if dropout else None
        xd = x * keep / (1 - dropout) if dropout else x
        w = base_weight(weight, dtype)
        ac, bc = a.to(dtype), b.to(dtype)  # (r x in and out x r: small next to the saved input)
        xa = xd @ ac.t()
        y = torch.addmm(x @ w.t(), xa, bc.t(), alpha=scaling)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(xd, xa, ac, bc, keep)
        ctx.weight, ctx.scaling, ctx.dtype, ctx.shape, ctx.dropout = weight, scaling, dtype, shape, dropout
        ctx.grad_dtypes = (a.dtype, b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd, xa, ac, bc, keep = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        dy = dy.reshape(-1, dy.shape[-1]).to(dtype)
        dyb = dy @ bc  # (n, r)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        # addmm with beta=0 never reads its first argument (any tensor of the right shape): the
        # product times s in one kernel
        grad_a = torch.addmm(ac, dyb.t(), xd, beta=0, alpha=s).to(ctx.grad_dtypes[0]) if need_a else None
        grad_b = torch.addmm(bc, dy.t(), xa, beta=0, alpha=s).to(ctx.grad_dtypes[1]) if need_b else None
        dx = None
        if need_x:
            w = base_weight(ctx.weight, dtype)
            if keep is None:
                dx = torch.addmm(dy @ w, dyb, ac, alpha=s)
            else:
                lora_dx = (dyb @ ac).mul_(keep).mul_(s / (1 - ctx.dropout))
                dx = torch.addmm(lora_dx, dy, w)
            dx = dx.view(ctx.shape)
        return dx, grad_a, grad_b, None, None, None, None, None


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """W + s B A in DTYPE, made once per ``dense_4bit_weights`` block: generating, a LoRA layer is
    then one matmul, as a merged model's is (the separate low-rank products made the evaluation
    hook's 600-token answers 2.5x slower per token than the base model's, on 2 CPU cores)."""
    key = (id(weight), dtype, "merged")
    if key not in _dense_cache:
        w = _dequantized(weight, dtype)
        _dense_cache[key] = torch.addmm(w, b.to(dtype), a.to(dtype), alpha=scaling)
    return _dense_cache[key]


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = [n for n in self.active_adapters if n in self.lora_A]
    if self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1 \
            or adapters[0] in getattr(self, "lora_variant", {}):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
    base = self.base_layer
    if _dense_cache is not None and not torch.is_grad_enabled() and not p:
        dtype = compute_dtype(x)
        w = merged_weight(base.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], dtype)
        return torch.nn.functional.linear(x.to(dtype), w, None if base.bias is None else base.bias.to(dtype))
    return LoraLinearFunction.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base.weight,
                                    base.bias, self.scaling[name], p, compute_dtype(x))


def fuse_lora(model: torch.nn.Module) -> int:
    """Route every plain peft LoRA linear layer of MODEL through the fused function; returns how
    many. Plain covers rsLoRA (only its scaling differs, and peft's module.scaling holds it) and
    PiSSA, OLoRA and LoftQ (they only start A, B and W elsewhere). Other layer kinds keep peft's
    own forward: DoRA and peft's other variants (``variant_layers``), conv, embeddings."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A") or getattr(module, "lora_variant", None):
            continue
        base = module.get_base_layer()
        dense = type(base) is torch.nn.Linear
        four_bit = type(base).__name__ == "Linear4bit"
        if dense or four_bit:
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def variant_layers(model: torch.nn.Module) -> dict[str, int]:
    """peft LoRA layers that compute something other than plain LoRA (DoRA's magnitude and
    direction), by variant: their forward stays peft's."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for variant in getattr(module, "lora_variant", {}).values():
                name = type(variant).__name__.removesuffix("Variant").removesuffix("Linear")  # DoraLinearVariant
                name = {"Dora": "DoRA"}.get(name, name)
                out[name] = out.get(name, 0) + 1
    return out
