"""The preference losses against the papers' formulas written out here, one pair at a time, and
against TRL's own implementation where it can be imported."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

from tuneforge.data.encode import IGNORE
from tuneforge.train import preference

VOCAB = 11


def _batch(seed: int = 0):
    """Two rows, three pairs: row 0 holds pairs 0 and 1, row 1 pair 2 (plus padding)."""
    g = torch.Generator().manual_seed(seed)
    # per sequence: (row, start, length, answer tokens at the end)
    layout = [(0, 0, 6, 3), (0, 6, 5, 2), (0, 11, 4, 1), (0, 15, 7, 4), (1, 0, 8, 5), (1, 8, 6, 2)]
    width = 24
    labels = torch.full((2, width), IGNORE)
    seq = torch.full((2, width), -1)
    for k, (row, start, length, answer) in enumerate(layout):
        seq[row, start:start + length] = k
        labels[row, start + length - answer:start + length] = torch.randint(0, VOCAB, (answer,), generator=g)
    logits = torch.randn(2, width, VOCAB, generator=g, dtype=torch.float64)
    return logits, labels, seq, layout


def ours(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor, n: int):
    targets, s = labels[:, 1:], seq[:, 1:]
    mask = targets != IGNORE
    return preference.sequence_logps(logits[:, :-1][mask], targets[mask], s[mask], n)


def direct_logps(logits: torch.Tensor, labels: torch.Tensor, layout, average: bool = False) -> list:
    """Each sequence on its own: sum (or mean) of log softmax at its answer tokens."""
    out = []
    for row, start, length, _ in layout:
        total, count = 0.0, 0
        for t in range(start + 1, start + length):
            if labels[row, t] != IGNORE:
                total = total + torch.log_softmax(logits[row, t - 1], -1)[labels[row, t]]
                count += 1
        out.append(total / count if average else total)
    return out


def test_summed_log_probs_match_a_token_by_token_sum():
    logits, labels, seq, layout = _batch()
    sums, counts = ours(logits, labels, seq, 6)
    expected = direct_logps(logits, labels, layout)
    assert torch.allclose(sums.flatten(), torch.stack(expected), atol=1e-10)
    assert counts.flatten().tolist() == [a for *_, a in layout]


def _one(policy, reference, counts, beta, kind):
    """DPO/IPO/hinge for one pair, straight from the papers."""
    pc, pr = policy
    rc, rr = reference
    if kind == "ipo":
        d = (pc - rc) / counts[0] - (pr - rr) / counts[1]
        return (d - 1 / (2 * beta)) ** 2
    h = beta * ((pc - rc) - (pr - rr))
    return -torch.log(torch.sigmoid(h)) if kind == "sigmoid" else torch.clamp(1 - h, min=0)


def _orpo_one(policy, counts, lam):
    ac, ar = policy[0] / counts[0], policy[1] / counts[1]
    odds = lambda a: torch.exp(a) / (1 - torch.exp(a))  # noqa: E731
    return -ac - lam * torch.log(torch.sigmoid(torch.log(odds(ac) / odds(ar))))


def _simpo_one(policy, counts, beta, gamma):
    return -torch.log(torch.sigmoid(beta * (policy[0] / counts[0] - policy[1] / counts[1]) - gamma))


VARIANTS = [("dpo", "sigmoid"), ("dpo", "ipo"), ("dpo", "hinge"), ("orpo", None), ("simpo", None)]


def _ours_loss(kind, sub, sums, ref, counts):
    if kind == "dpo":
        return preference.dpo(sums, ref, counts, 0.3, sub).loss
    if kind == "orpo":
        return preference.orpo(sums, counts, 0.25).loss
    return preference.simpo(sums, counts, 2.0, 0.5).loss


def _direct_loss(kind, sub, pol, ref, cnt):
    if kind == "dpo":
        return _one(pol, ref, cnt, 0.3, sub)
    if kind == "orpo":
        return _orpo_one(pol, cnt, 0.25)
    return _simpo_one(pol, cnt, 2.0, 0.5)


@pytest.mark.parametrize(("kind", "sub"), VARIANTS)
def test_loss_and_its_gradient_match_a_direct_implementation(kind, sub):
    logits, labels, seq, layout = _batch(1)
    ref_logits = logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    ref, _ = ours(ref_logits, labels, seq, 6)
    mine = logits.clone().requires_grad_(True)
    sums, counts = ours(mine, labels, seq, 6)
    loss = _ours_loss(kind, sub, sums, ref, counts).sum()
    loss.backward()

    theirs = logits.clone().requires_grad_(True)
    pol = direct_logps(theirs, labels, layout)
    refs = [float(x) for x in direct_logps(ref_logits, labels, layout)]
    cnt = [a for *_, a in layout]
    direct = sum(_direct_loss(kind, sub, pol[2 * k:2 * k + 2], refs[2 * k:2 * k + 2], cnt[2 * k:2 * k + 2])
                 for k in range(3))
    direct.backward()
    assert math.isclose(float(loss), float(direct), rel_tol=1e-9)
    assert torch.allclose(mine.grad, theirs.grad, atol=1e-10)
    assert mine.grad.abs().sum() > 0


@pytest.mark.parametrize(("sub", "expected"), [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 1 / (4 * 0.1 ** 2))])
def test_dpo_with_the_reference_equal_to_the_policy(sub, expected):
    policy = torch.tensor([[-12.0, -7.0], [-3.0, -30.0]])
    out = preference.dpo(policy, policy.clone(), torch.tensor([[4.0, 3.0], [2.0, 9.0]]), 0.1, sub)
    assert torch.allclose(out.loss, torch.full((2,), expected))
    assert (out.chosen == 0).all() and (out.rejected == 0).all()


def test_orpo_stays_finite_for_an_answer_the_model_is_sure_of():
    policy = torch.tensor([[0.0, -5.0]], requires_grad=True)
    loss = preference.orpo(policy, torch.tensor([[3.0, 3.0]]), 0.1).loss.sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.grad).all()


# ---- TRL's own implementation (in the test extra, so never skipped: `make test` installs it)

def _trl(module: str):
    return importlib.import_module(module)


def _trainer_self(**kw):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), label_smoothing=0.0, alpha=0.0, **kw)


def test_log_probs_match_trls_get_batch_logps():
    orpo = _trl("trl.experimental.orpo.orpo_trainer")
    logits, labels, seq, layout = _batch(2)
    # TRL's batches hold one sequence per row: lay each of ours out on its own row
    rows_logits = [logits[row, start:start + n] for row, start, n, _ in layout]
    rows_labels = [labels[row, start:start + n] for row, start, n, _ in layout]
    width = max(len(x) for x in rows_labels)
    lg = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, width - len(x))) for x in rows_logits])
    lb = torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=IGNORE) for x in rows_labels])
    sums, counts = ours(logits, labels, seq, 6)
    theirs = orpo.ORPOTrainer.get_batch_logps(lg, lb, average_log_prob=False)
    assert torch.allclose(sums.flatten(), theirs, atol=1e-10)
    theirs_avg = orpo.ORPOTrainer.get_batch_logps(lg, lb, average_log_prob=True)
    assert torch.allclose((sums / counts).flatten(), theirs_avg, atol=1e-10)


def test_orpo_odds_ratio_term_matches_trl():
    orpo = _trl("trl.experimental.orpo.orpo_trainer")
    avg = torch.tensor([[-0.2, -1.5], [-2.0, -0.7], [-0.01, -3.0]], dtype=torch.float64)
    counts = torch.ones_like(avg)
    lam = 0.25
    ratio_loss, chosen_r, rejected_r, *_ = orpo.ORPOTrainer.odds_ratio_loss(_trainer_self(beta=lam), avg[:, 0], avg[:, 1])
    # TRL: loss = NLL(chosen) - mean(beta * log sigmoid(log odds)); ours per pair: -avg_c - lam * log sigmoid
    ours_ = preference.orpo(avg, counts, lam)
    assert torch.allclose(ours_.loss + avg[:, 0], -ratio_loss.double(), atol=1e-6)
    assert torch.allclose(ours_.chosen, chosen_r.double()) and torch.allclose(ours_.rejected, rejected_r.double())


def test_simpo_matches_trls_cpo_simpo_loss():
    cpo = _trl("trl.experimental.cpo.cpo_trainer")
    avg = torch.tensor([[-0.2, -1.5], [-2.0, -0.7], [-0.9, -1.0]], dtype=torch.float64)
    me = _trainer_self(beta=2.0, simpo_gamma=0.5, loss_type="simpo")
    theirs, chosen_r, rejected_r = cpo.CPOTrainer.cpo_loss(me, avg[:, 0], avg[:, 1])
    ours_ = preference.simpo(avg, torch.ones_like(avg), 2.0, 0.5)
    assert torch.allclose(ours_.loss, theirs, atol=1e-10)
    assert torch.allclose(ours_.chosen, chosen_r) and torch.allclose(ours_.rejected, rejected_r)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_trls_cpo_losses_with_a_zero_reference(kind):
    """TRL's DPO loss lives inside its trainer's step; CPO's sigmoid/hinge/IPO are the same formulas
    with no reference, so a zero reference (and, for IPO, unit counts) compares ours with TRL's."""
    cpo = _trl("trl.experimental.cpo.cpo_trainer")
    policy = torch.tensor([[-3.0, -4.5], [-8.0, -2.0], [-1.0, -1.1]], dtype=torch.float64)
    theirs, *_ = cpo.CPOTrainer.cpo_loss(_trainer_self(beta=0.3, simpo_gamma=0.0, loss_type=kind),
                                         policy[:, 0], policy[:, 1])
    ours_ = preference.dpo(policy, torch.zeros_like(policy), torch.ones_like(policy), 0.3, kind)
    assert torch.allclose(ours_.loss, theirs, atol=1e-10)
