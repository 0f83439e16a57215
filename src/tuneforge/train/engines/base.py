"""The interface every engine implements, and the one-process engine that defines it.

An engine owns how the model, its gradients and the optimizer state are laid out over ranks:
it wraps the model, runs the backward, reduces and clips the gradients, steps the optimizer,
and gathers a full state for a checkpoint (always in the one-process format, so that a
checkpoint resumes on any number of ranks, with any engine). What is trained, the loss and the
data order stay with the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.train import parallel

LossFn = Callable[[Any, dict], torch.Tensor]  # (model, batch) -> summed loss


@dataclass(frozen=True)
class Shares:
    """The part of the weights, gradients and optimizer state (moments, and DeepSpeed's fp32
    master copy of 16-bit weights) that each GPU holds under an engine."""
    weights: float = 1.0
    gradients: float = 1.0
    optimizer: float = 1.0
    fp32_master: bool = False


class LocalEngine:
    """One process: the model as it is, torch's backward, clip, step."""

    name = "one process"
    partitioned = False  # weights whole only inside their own module's forward (ZeRO-3)
    evaluates = True  # rank 0 can generate alone (not with sharded weights)
    master_weights_elsewhere = False  # the engine keeps fp32 masters of 16-bit weights itself

    def __init__(self, ranks: parallel.Ranks) -> None:
        self.ranks = ranks
        self.model: Any = None
        self.loss_fn: LossFn | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []

    def shares(self, cfg: Config) -> Shares:
        return Shares()

    def wrap(self, model: Any, loss_fn: LossFn) -> None:
        """Take the model (adapters and fast path on) and the loss; before the optimizer exists."""
        self.model, self.loss_fn = model, loss_fn

    def prepare(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        """Take the optimizer over PARAMS, the trainable parameters as wrap left them."""
        self.optimizer, self.params = optimizer, params

    def loss(self, batch: dict[str, Any], more: bool) -> torch.Tensor:
        """The summed loss of one micro-batch; MORE: others follow in this optimizer step."""
        return self.loss_fn(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_and_clip(self, max_norm: float) -> float:
        """Gradients complete on this rank, clipped to MAX_NORM; returns their norm before clipping."""
        return parallel.full(torch.nn.utils.clip_grad_norm_(self.params, max_norm)).item()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def full_state(self, named: dict[str, torch.nn.Parameter], keep: bool) -> tuple[dict, dict] | None:
        """The trainable weights and the optimizer state, whole, on the CPU, where KEEP; every
        rank calls it (gathering shards is a collective)."""
        if not keep:
            return None
        return _whole(named, self.optimizer)

    def load_state(self, named: dict[str, torch.nn.Parameter], weights: dict, optimizer: dict) -> None:
        """A checkpoint's optimizer state (its weights are in the model already, loaded whole
        before wrapping)."""
        self.optimizer.load_state_dict(optimizer)


def _whole(named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    weights = {n: parallel.full(p.detach()).cpu().clone() for n, p in named.items()}
    return weights, parallel.full_optimizer_state(optimizer)
