"""Segments of text -> token ids and labels (``-100`` where no loss is taken)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode(segments: list[tuple[str, bool]], tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize each segment on its own, as chat tokenizes the prompt apart from the answer.

    Tokenizing segment by segment (not the whole text at once) keeps a token from straddling the
    prompt/answer cut, so the labels line up exactly with what the model generates at chat time.
    """
    texts = [text for text, _ in segments]
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, (_, trained) in zip(pieces, segments, strict=True):
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    truncated = len(input_ids) > max_length
    if labels:
        labels[0] = IGNORE  # the first token is never predicted; keeps packed samples apart
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)
