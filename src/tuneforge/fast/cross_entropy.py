"""Cross-entropy of a linear head without materialising all the logits.

With a 92k-word vocabulary a 4096-token row has 1.5 GB of fp32 logits, plus their gradient. Here
the logits are made a chunk of tokens at a time; each chunk's gradient with respect to the hidden
states (and the head, when it trains) is worked out right away, during the forward pass, and
only that gradient is kept for backward: one chunk of logits is alive at any moment.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.data.encode import IGNORE
from tuneforge.fast.lora import base_weight, compute_dtype

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MiB in fp32


class LinearCrossEntropyFunction(torch.autograd.Function):
    """LOW and UP (optional) are a LoRA head's low-rank path: logits = h W^T + s LOW UP^T, where
    LOW = dropout(h) A^T is (n, r), computed by autograd outside, and UP is B (vocab, r)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype, low: torch.Tensor | None = None, up: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        w = base_weight(weight, dtype)
        chunk = max(1, CHUNK_ELEMENTS // w.shape[0])
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=dtype)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if weight.requires_grad else None
        lora = low is not None and up is not None
        upc = up.to(dtype) if lora else None
        grad_low = torch.empty(low.shape, device=low.device, dtype=dtype) if lora else None
        grad_up = torch.zeros(up.shape, device=up.device, dtype=torch.float32) if lora else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            t = targets[start:start + chunk]
            valid = t != IGNORE
            t = t.clamp(min=0)
            if lora:
                lo = low[start:start + chunk].to(dtype)
                logits = torch.addmm(h @ w.t(), lo, upc.t(), alpha=scale).float()
            else:
                logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            loss += ((lse - picked) * valid).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot, on labelled rows only
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1
            g = g.mul_(valid[:, None]).to(dtype)
            grad_h[start:start + chunk] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), h.float())
            if lora:
                grad_low[start:start + chunk] = (g @ upc).mul_(scale)
                grad_up.addmm_(g.t().float(), lo.float(), alpha=scale)
        ctx.save_for_backward(grad_h, grad_w, grad_low, grad_up)
        ctx.dtypes = (hidden.dtype, weight.dtype, low.dtype if lora else None, up.dtype if lora else None)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            grads.append((saved * grad_loss).to(dtype) if saved is not None else None)
        dh, dw, dlow, dup = grads
        return dh, dw, None, None, dlow, dup, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against TARGETS (IGNORE rows count nothing).

    HIDDEN is (n, h), WEIGHT (vocab, h), TARGETS (n,). LORA: (dropout(hidden) @ A.T, B, scaling)
    of a LoRA on the head, whose update joins the logits. Only for training: the gradient is
    computed in the forward pass whether or not backward runs.
    """
    low, up, scale = lora if lora is not None else (None, None, 1.0)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, compute_dtype(hidden), low, up, scale)


class LinearTokenLogpsFunction(torch.autograd.Function):
    """Per-token log p(target) of ``h W^T (+ s LOW UP^T)``, a chunk of tokens at a time. The
    preference losses weigh each answer's tokens by that answer's own upstream gradient, which
    exists only after the forward pass: so, unlike the summed cross-entropy above, the gradient is
    not made during the forward; backward makes each chunk's logits again (one more head matmul
    per chunk, a few percent of a step) and only one chunk of logits is alive in either pass."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype, low: torch.Tensor | None = None, up: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        for start, logits, t in _chunk_logits(hidden, weight, targets, dtype, low, up, scale):
            out[start:start + len(t)] = logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, targets, low, up)
        ctx.weight, ctx.dtype, ctx.scale = weight, dtype, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, targets, low, up = ctx.saved_tensors
        weight, dtype, scale = ctx.weight, ctx.dtype, ctx.scale
        w = base_weight(weight, dtype)
        lora = low is not None and up is not None
        upc = up.to(dtype) if lora else None
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=dtype)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if ctx.needs_input_grad[1] else None
        grad_low = torch.empty(low.shape, device=low.device, dtype=dtype) if lora else None
        grad_up = torch.zeros(up.shape, device=up.device, dtype=torch.float32) if lora else None
        for start, logits, t in _chunk_logits(hidden, weight, targets, dtype, low, up, scale):
            end = start + len(t)
            # d log p(t) / d logits = one_hot(t) - softmax, times each token's upstream gradient
            g = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_().neg_()
            g[torch.arange(len(t), device=g.device), t] += 1
            g = g.mul_(grad_out[start:end, None].float()).to(dtype)
            grad_h[start:end] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), hidden[start:end].float())
            if lora:
                lo = low[start:end].to(dtype)
                grad_low[start:end] = (g @ upc).mul_(scale)
                grad_up.addmm_(g.t().float(), lo.float(), alpha=scale)
        return (grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype), None, None,
                None if grad_low is None else grad_low.to(low.dtype),
                None if grad_up is None else grad_up.to(up.dtype), None)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                  low: torch.Tensor | None, up: torch.Tensor | None, scale: float):
    """(start, fp32 logits, targets) of each chunk of HIDDEN's rows."""
    w = base_weight(weight, dtype)
    chunk = max(1, CHUNK_ELEMENTS // w.shape[0])
    upc = up.to(dtype) if low is not None and up is not None else None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk].to(dtype)
        if upc is not None:
            logits = torch.addmm(h @ w.t(), low[start:start + chunk].to(dtype), upc.t(), alpha=scale)
        else:
            logits = h @ w.t()
        yield start, logits.float(), targets[start:start + chunk]


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """log p(target) per row of ``hidden @ weight.T`` (fp32, (n,)), without the (n, vocab) logits.

    HIDDEN (n, h), WEIGHT (vocab, h), TARGETS (n,), all labelled (no IGNORE rows); LORA as for
    ``linear_cross_entropy``."""
    low, up, scale = lora if lora is not None else (None, None, 1.0)
    return LinearTokenLogpsFunction.apply(hidden, weight, targets, compute_dtype(hidden), low, up, scale)
