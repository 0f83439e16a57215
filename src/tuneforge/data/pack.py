"""Pack encoded samples into rows of at most ``max_length`` tokens.

Packing works on lengths only and returns groups of sample indices, so millions of samples can
be planned without holding their tokens. Each sample's ``position_ids`` restart at 0; the model
derives a block-diagonal attention mask from them, so packed samples do not attend to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuneforge.data.encode import Encoded


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    # Preference rows only: per token, which of the row's sequences it belongs to (2k: pair k's
    # chosen answer, 2k + 1: its rejected one), and per pair its number in the data set (where a
    # full fine-tune's reference log-probabilities are looked up: an integer survives the engines'
    # casts of floating-point inputs to bf16, which would round a log-probability of -500 by 2).
    sequence_ids: list[int] | None = None
    pair_ids: list[int] | None = None

    @property
    def pairs(self) -> int:
        return (self.sequence_ids[-1] + 1) // 2 if self.sequence_ids else 0

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: place each sample, longest first, in the open row it fills most tightly.

    Rows are bucketed by free space, so a placement looks at most ``max_length`` buckets: fast
    enough for millions of samples, and it fills rows to ~99% on typical SFT length mixes.
    """
    by_space: list[list[int]] = [[] for _ in range(max_length + 1)]  # free space -> row ids
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        row = None
        for space in range(n, max_length + 1):
            if by_space[space]:
                row = by_space[space].pop()
                free = space - n
                break
        if row is None:
            row, free = len(groups), max_length - n
            groups.append([])
        groups[row].append(i)
        by_space[free].append(row)
    return groups


def assemble(samples: Sequence[Encoded]) -> Row:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for s in samples:
        ids += s.input_ids
        labels += s.labels
        pos += range(len(s.input_ids))
    return Row(ids, labels, pos)


def assemble_pairs(sides: Sequence[Encoded], pair_ids: Sequence[int] | None = None) -> Row:
    """SIDES: chosen, rejected, chosen, rejected, ... Each is its own packed sample (positions
    restart), so the rejected answer never sees the chosen one, and varlen attention applies."""
    row = assemble(sides)
    seq = [k for k, s in enumerate(sides) for _ in s.input_ids]
    return Row(row.input_ids, row.labels, row.position_ids, seq, list(pair_ids) if pair_ids is not None else None)


def pack(samples: list[Encoded], max_length: int) -> list[Row]:
    groups = pack_lengths([len(s.input_ids) for s in samples], max_length)
    return [assemble([samples[i] for i in g]) for g in groups]


def fill_rate(row_lengths: Sequence[int], max_length: int) -> float:
    return sum(row_lengths) / (len(row_lengths) * max_length) if row_lengths else 0.0
