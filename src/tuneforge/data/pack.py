"""Pack encoded samples into rows of at most ``max_length`` tokens.

Each sample's ``position_ids`` restart at 0; the model derives a block-diagonal attention mask
from them, so samples packed into one row do not attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.encode import Encoded


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def single(sample: Encoded) -> Row:
    return Row(sample.input_ids, sample.labels, list(range(len(sample.input_ids))))


def pack(samples: list[Encoded], max_length: int) -> list[Row]:
    """Greedy first-fit-decreasing packing: long samples placed first, short ones fill the gaps."""
    bins: list[list[Encoded]] = []
    space: list[int] = []
    for s in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        n = len(s.input_ids)
        for i, free in enumerate(space):
            if n <= free:
                bins[i].append(s)
                space[i] -= n
                break
        else:
            bins.append([s])
            space.append(max_length - n)
    rows = []
    for group in bins:
        ids, labels, pos = [], [], []
        for s in group:
            ids += s.input_ids
            labels += s.labels
            pos += range(len(s.input_ids))
        rows.append(Row(ids, labels, pos))
    return rows


def fill_rate(rows: list[Row], max_length: int) -> float:
    return sum(len(r) for r in rows) / (len(rows) * max_length) if rows else 0.0
