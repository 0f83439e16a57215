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
from tuneforge.fast.lora import compute_dtype

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MiB in fp32


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        w = weight.to(dtype)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=dtype)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            t = targets[start:start + chunk]
            valid = t != IGNORE
            t = t.clamp(min=0)
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
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_loss).to(ctx.hidden_dtype)
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against TARGETS (IGNORE rows count nothing).

    HIDDEN is (n, h), WEIGHT (vocab, h), TARGETS (n,). Only for training: the gradient is computed
    in the forward pass whether or not backward runs.
    """
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, compute_dtype(hidden))
