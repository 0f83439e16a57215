from __future__ import annotations

import pytest

from tuneforge.train.optim import lr_factor


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    total, ratio = 100, 0.1
    warm = [lr_factor(s, total, ratio) for s in range(10)]
    assert warm == pytest.approx([(i + 1) / 10 for i in range(10)])
    decay = [lr_factor(s, total, ratio) for s in range(10, total)]
    assert decay[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_factor(total, total, ratio) == pytest.approx(0.0)


def test_no_warmup():
    assert lr_factor(0, 10, 0.0) == pytest.approx(1.0)
