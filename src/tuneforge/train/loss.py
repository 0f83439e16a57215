"""The training loss: summed next-token cross-entropy over the labelled tokens of a batch.

One function for every engine and both paths. The recipe divides the sum by the labelled
tokens of the whole optimizer step (all micro-batches, all ranks), so that accumulation and
data parallelism give the gradient one big batch would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tuneforge.data.batching import varlen_arguments
from tuneforge.data.encode import IGNORE
from tuneforge.fast.cross_entropy import linear_cross_entropy
from tuneforge.fast.path import FastPath, causal_lm, head_for_linear_ce
from tuneforge.models import probe


def loss_sum(model: Any, batch: dict[str, Any], fast: FastPath | None = None) -> torch.Tensor:
    """Summed cross-entropy of BATCH's labelled next tokens, through what FAST patched (None:
    the model's plain forward). No attention_mask: transformers then derives a block-diagonal
    causal mask from the restarting position_ids, which keeps packed samples apart (or the
    packed boundaries go to varlen attention, when it is on)."""
    fast = fast or FastPath()
    extra = varlen_arguments(batch) if fast.varlen else {}
    targets = batch["labels"][:, 1:]
    if fast.linear_ce:  # decoder, then the head in chunks: the logits never exist whole
        hidden = causal_lm(model).get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                                use_cache=False, **extra).last_hidden_state
        labelled = targets != IGNORE
        head = head_for_linear_ce(model)
        h = hidden[:, :-1][labelled]
        return linear_cross_entropy(h, head.weight, targets[labelled], head.low_rank(h))
    # Project to the vocabulary only where some row has a label: prompts are most of the tokens,
    # and the vocab projection is the largest matmul of a small model.
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    if probe.accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False, **extra).logits
    if "logits_to_keep" not in extra:  # remote code without it: all positions, then the kept ones
        logits = logits[:, :-1][:, keep]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                           targets[:, keep].reshape(-1), ignore_index=IGNORE, reduction="sum")
