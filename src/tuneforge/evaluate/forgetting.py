"""How far a tuned model moved from its base on ordinary questions: a measure of forgetting.

On the base model's own answers to held-out general questions (teacher-forced, so both models see
exactly the same tokens), at every answer token:
- KL: ``KL(tuned || base)`` of the next-token distributions, in nats, averaged over the tokens;
- top-1 agreement: the share of those tokens where both models rank the same token first.
A model that forgot nothing scores 0 and 100%. Hijack rates count answers that went wrong; these
figures see the drift before it changes an answer, and on every token rather than on a keyword.

Computed in the model's own dtype with autocast off (fp32 on a CPU), so that the adapter switched
off gives exactly 0 and 100%, not bf16 rounding noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.data.encode import IGNORE, encode
from tuneforge.data.formats import Message
from tuneforge.data.templates import Template, split_for_training

# A model, or a factory of contexts under which MODEL itself is the base (peft's disable_adapter).
Base = Any


def base_of(model: Any, base: Base) -> tuple[Any, Callable[[], AbstractContextManager]]:
    """The model that answers as the base, and the context it answers in."""
    if hasattr(base, "generate"):  # a model of its own
        return base, nullcontext
    return model, base


@dataclass(frozen=True)
class Forgetting:
    kl: float  # mean per answer token, nats
    top1_agreement: float  # share of answer tokens
    tokens: int  # answer tokens measured


@dataclass(frozen=True)
class Answered:
    question: str
    answer: str  # the base model's own answer
    finished: bool  # it ended with a stop token (else its end-of-turn marker is not scored)


def _encoded(tokenizer: Any, template: Template, item: Answered, max_length: int) -> tuple[list[int], list[int]]:
    messages = [Message("user", item.question), Message("assistant", item.answer, truncated=not item.finished)]
    enc = encode(split_for_training(template, tokenizer, messages), tokenizer, max_length)
    return enc.input_ids, enc.labels


def _batches(rows: list[tuple[list[int], list[int]]], size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Right-padded batches of similar length: input ids, attention mask, and where the loss-bearing
    positions are (position t predicts token t+1)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), size):
        chunk = [rows[i] for i in order[start:start + size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (row_ids, labels) in enumerate(chunk):
            ids[r, :len(row_ids)] = torch.tensor(row_ids)
            mask[r, :len(row_ids)] = 1
            scored[r, :len(labels) - 1] = torch.tensor([lab != IGNORE for lab in labels[1:]])
        yield ids, mask, scored


def _log_probs(model: Any, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return torch.log_softmax(logits[scored.to(device)].float(), dim=-1)


def measure_forgetting(model: Any, base: Base, tokenizer: Any, template: Template, answered: list[Answered],
                       batch_size: int = 8, max_length: int = 1024) -> Forgetting:
    """KL and top-1 agreement of MODEL against BASE on the base model's ANSWERED questions."""
    base_model, off = base_of(model, base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [_encoded(tokenizer, template, a, max_length) for a in answered]
    was_training = (model.training, base_model.training)
    model.eval()
    base_model.eval()
    kl_sum, agree, tokens = 0.0, 0, 0
    try:
        for ids, mask, scored in _batches(rows, batch_size, pad):
            with off():
                before = _log_probs(base_model, ids, mask, scored)
            after = _log_probs(model, ids, mask, scored)
            kl_sum += float((after.exp() * (after - before)).sum())
            agree += int((after.argmax(-1) == before.argmax(-1)).sum())
            tokens += before.shape[0]
    finally:
        model.train(was_training[0])
        base_model.train(was_training[1])
    if tokens == 0:
        return Forgetting(0.0, 1.0, 0)
    return Forgetting(max(kl_sum / tokens, 0.0), agree / tokens, tokens)
