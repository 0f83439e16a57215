from __future__ import annotations

import numpy as np
import torch

from tuneforge.data.batching import collate
from tuneforge.data.encode import IGNORE, Encoded
from tuneforge.data.pack import fill_rate, pack, pack_lengths
from tuneforge.train.loss import loss_sum


def fake(n: int, start: int) -> Encoded:
    ids = list(range(start, start + n))
    return Encoded(ids, [IGNORE] + ids[1:])


def test_rows_fit_and_positions_restart_per_sample():
    samples = [fake(n, 10 * i) for i, n in enumerate([5, 9, 3, 7, 2, 6])]
    rows = pack(samples, max_length=12)
    assert all(len(r) <= 12 for r in rows)
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for s in samples for t in s.input_ids)
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert starts[0] == 0 and all(r.labels[i] == IGNORE for i in starts)
    assert fill_rate([len(r) for r in rows], 12) == sum(len(s.input_ids) for s in samples) / (len(rows) * 12)


def test_fill_rate_on_an_alpaca_like_length_mix():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(mean=np.log(300), sigma=0.8, size=20_000).astype(int) + 8, 2048)
    groups = pack_lengths(lengths.tolist(), 2048)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    row_lengths = [int(lengths[g].sum()) for g in groups]
    assert max(row_lengths) <= 2048
    assert fill_rate(row_lengths, 2048) >= 0.98


def test_packed_row_loss_equals_the_sum_of_its_samples(tiny_model_dir):
    """Samples packed into one row must not see each other (fp32, tolerance 1e-5)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (7, 12, 5):
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        samples.append(Encoded(ids, [IGNORE] + ids[1:]))
    rows = pack(samples, max_length=64)
    assert len(rows) == 1
    with torch.no_grad():
        packed = loss_sum(model, collate(rows, 0)).item()
        separate = sum(loss_sum(model, collate(pack([s], 64), 0)).item() for s in samples)
    assert abs(packed - separate) <= 1e-5 * abs(separate)
