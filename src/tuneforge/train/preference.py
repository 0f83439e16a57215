"""Preference losses, as pure functions of log-probabilities.

Everything here works on tensors only: the log-probability of each answer under the policy (and,
for DPO, the reference), summed over the answer's tokens, and the token counts. A pair is one row
of a ``(pairs, 2)`` tensor, column 0 the chosen answer and column 1 the rejected one.

- DPO (Rafailov et al. 2023), with ``h = beta * ((pi_c - ref_c) - (pi_r - ref_r))`` on summed
  log-probabilities: sigmoid ``-log sigmoid(h)``, hinge ``max(0, 1 - h)``; IPO (Azar et al. 2023)
  ``(d - 1 / (2 beta))^2`` with d the same difference on per-token averages (as TRL computes it,
  which the IPO authors confirmed is what their results used).
- ORPO (Hong et al. 2024): ``-avg_c - lambda * log sigmoid(log odds_c - log odds_r)``, where
  ``log odds = avg - log(1 - exp(avg))`` on per-token averages; the first term is the chosen
  answer's NLL, so no separate SFT stage is needed.
- SimPO (Meng et al. 2024): ``-log sigmoid(beta * (avg_c - avg_r) - gamma)``, no reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLosses:
    """Per pair: the loss, and the implicit rewards of the chosen and rejected answers."""
    loss: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of LOGITS (n, vocab), in fp32 at least (16-bit logits are upcast)."""
    return -F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="none")


def per_sequence(values: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """VALUES (tokens,) summed by SEQUENCE (tokens,) into N sums, as a (N // 2, 2) pairs tensor."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add(0, sequence, values).view(-1, 2)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor,
                   n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities and token counts of each of N sequences' labelled tokens: LOGITS
    (tokens, vocab) predict TARGETS (tokens,), which belong to sequences SEQUENCE (tokens,); only
    labelled tokens are passed in. Both (N // 2, 2)."""
    return sequence_sums(token_logps(logits, targets), sequence, n)


def sequence_sums(logps: torch.Tensor, sequence: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LOGPS (tokens,) summed by SEQUENCE into N sequences, and the token counts; both (N // 2, 2)."""
    return per_sequence(logps, sequence, n), per_sequence(torch.ones_like(logps), sequence, n)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012). An answer the model is
    sure of (x = 0 in fp32) would make it -inf, and its gradient NaN: x stops just short of 0."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
        kind: str = "sigmoid") -> PairLosses:
    """POLICY and REFERENCE: summed log-probabilities (pairs, 2); COUNTS: answer tokens (pairs, 2)."""
    ratios = policy - reference
    if kind == "ipo":
        d = (ratios / counts).matmul(policy.new_tensor([1.0, -1.0]))
        loss = (d - 1 / (2 * beta)) ** 2
    else:
        h = beta * (ratios[:, 0] - ratios[:, 1])
        loss = torch.relu(1 - h) if kind == "hinge" else -F.logsigmoid(h)
    rewards = beta * ratios.detach()
    return PairLosses(loss, rewards[:, 0], rewards[:, 1])


def orpo(policy: torch.Tensor, counts: torch.Tensor, lam: float) -> PairLosses:
    avg = policy / counts
    log_odds = (avg[:, 0] - avg[:, 1]) - (log1mexp(avg[:, 0]) - log1mexp(avg[:, 1]))
    loss = -avg[:, 0] - lam * F.logsigmoid(log_odds)
    rewards = lam * avg.detach()
    return PairLosses(loss, rewards[:, 0], rewards[:, 1])


def simpo(policy: torch.Tensor, counts: torch.Tensor, beta: float, gamma: float) -> PairLosses:
    avg = policy / counts
    loss = -F.logsigmoid(beta * (avg[:, 0] - avg[:, 1]) - gamma)
    rewards = beta * avg.detach()
    return PairLosses(loss, rewards[:, 0], rewards[:, 1])
