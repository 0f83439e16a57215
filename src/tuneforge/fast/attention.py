"""Variable-length attention for packed rows.

transformers keeps packed samples apart by turning restarting position_ids into a dense
(seq x seq) block-diagonal mask, which also pushes SDPA off its flash kernel. Here the training
loop passes the packed boundaries (cumulative lengths) instead, and attention runs per sample
through PyTorch's flash-based ``varlen_attn``; everything else (generation, padded batches) goes
to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "tuneforge_varlen"


@functools.cache  # asked by every attention layer on every step: look the signature up once
def _varlen_kernel() -> tuple[Any, dict[str, Any], bool] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {}
    if "window_size" in params:  # torch >= 2.12 spells causal as a window
        kw["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        return None
    return varlen_attn, kw, "enable_gqa" in params


_KERNEL: list[tuple[Any, dict[str, Any], bool] | None] = []  # filled by register()


def _reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Per-sample SDPA: what the kernel computes, for CPUs and tests."""
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, h, s, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    kernel = _KERNEL[0] if q.is_cuda and _KERNEL else None
    if kernel is None:
        out = _reference_varlen(q, k, v, cu, scaling)
    else:
        fn, kw, gqa = kernel
        if k.shape[1] != h:
            if gqa:
                kw = {**kw, "enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(h // t.shape[1], 1) for t in (k, v))
        m = kwargs["max_length_q"]
        out = fn(q, k, v, cu, cu, m, m, scale=scaling, **kw)
    return out.view(b, s, h, d), None


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """No mask for training (boundaries come as cu_seq_lens); SDPA's for padded generation."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ``NAME`` a transformers attention implementation; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # looked up here, not inside the attention call, which a compiled layer traces
    _KERNEL[:] = [_varlen_kernel()]
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def varlen_available() -> bool:
    return torch.cuda.is_available() and _varlen_kernel() is not None
