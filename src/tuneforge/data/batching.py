"""From packed rows to what one optimizer step trains: epoch order, micro-batches, collation,
and the varlen arguments that carry packed boundaries to attention.

Rows are shuffled per epoch from ``seed + epoch``, so the data position is just the optimizer
step: resuming at step N trains exactly the micro-batches step N would have trained.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tuneforge.data.encode import IGNORE
from tuneforge.data.pack import Row

# the keyword arguments varlen attention reads (transformers' names for them)
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def labelled(rows: list[Row]) -> int:
    """How many tokens of ROWS count in the loss (labels shift by one)."""
    return sum(sum(1 for t in r.labels[1:] if t != IGNORE) for r in rows)


def padded_tokens(batches: list[list[Row]]) -> int:
    """Tokens the model runs over for BATCHES, as collate pads them."""
    return sum(len(b) * max(map(len, b)) for b in batches)


def collate(rows: list[Row], pad_id: int) -> dict[str, Any]:
    """Right-pad rows to one length. Padding gets its own restarting positions, so it forms a
    separate block that no real token attends to, and labels of -100, so it costs no loss."""
    width = max(len(r) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        pad = width - len(r)
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE] * pad)
        pos.append(r.position_ids + list(range(pad)))
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}
    if rows[0].sequence_ids is not None:
        batch.update(pair_tensors(rows, width))
    return batch


def pair_tensors(rows: list[Row], width: int) -> dict[str, Any]:
    """Preference rows: each token's sequence number over the whole micro-batch (2k chosen, 2k + 1
    rejected of its k-th pair; -1 for padding), the number of pairs (a plain int: no device sync
    to read it), and each pair's number in the data set, where the rows carry them."""
    seq, ids, base = [], [], 0
    for r in rows:
        seq.append([base + s for s in r.sequence_ids] + [-1] * (width - len(r)))
        base += 2 * r.pairs
        ids += r.pair_ids or []
    out: dict[str, Any] = {"sequence_ids": torch.tensor(seq), "pairs": base // 2}
    if rows[0].pair_ids is not None:
        out["pair_ids"] = torch.tensor(ids, dtype=torch.long)
    return out


def pairs_in(rows: list[Row]) -> int:
    return sum(r.pairs for r in rows)


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def micro_batches(rows: Any, batch_size: int, accumulation: int, seed: int, step: int,
                  world: int = 1) -> list[list[Row]]:
    """All micro-batches of optimizer step STEP (0-based): ACCUMULATION per rank. Rank r trains
    those at positions r, r + world, ...; so world W with accumulation k trains exactly what one
    process with accumulation W * k trains."""
    per_epoch = math.ceil(len(rows) / batch_size)
    per_step = accumulation * world
    out = []
    for k in range(per_step):
        g = step * per_step + k
        epoch, index = divmod(g, per_epoch)
        order = epoch_order(len(rows), seed, epoch)
        out.append([rows[i] for i in order[index * batch_size:(index + 1) * batch_size]])
    return out


def steps_per_epoch(n_rows: int, batch_size: int, accumulation: int, world: int = 1) -> int:
    return math.ceil(math.ceil(n_rows / batch_size) / (accumulation * world))


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths over the flattened (batch * seq) tokens, and the longest sample.
    A sample starts wherever the position does not follow on from the one before it."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().squeeze(-1)
    cu = torch.cat([idx, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments that carry packed boundaries through the model to attention."""
    cu, longest = cu_seqlens(position_ids)
    return dict(zip(VARLEN_KEYS, (cu, cu, longest, longest), strict=True))


def model_inputs(batch: dict[str, Any], varlen: bool, device: torch.device) -> dict[str, Any]:
    """BATCH on DEVICE, with the varlen arguments where attention is the varlen one."""
    if varlen:
        batch = {**batch, **varlen_kwargs(batch["position_ids"])}
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def varlen_arguments(batch: dict[str, Any]) -> dict[str, Any]:
    """The varlen arguments BATCH carries (none for a batch built without them)."""
    return {k: batch[k] for k in VARLEN_KEYS if k in batch}
