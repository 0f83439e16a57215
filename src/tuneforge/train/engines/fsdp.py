"""PyTorch FSDP2 (``--fsdp``): trainable weights, gradients and optimizer state sharded over
ranks (parallel.shard says which and why); checkpoints gathered whole."""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.fast import recompute
from tuneforge.train import parallel
from tuneforge.train.engines.base import LocalEngine, LossFn, Shares, _whole


class FSDPEngine(LocalEngine):
    name = "FSDP2 (weights sharded)"
    evaluates = False  # every forward is a collective: rank 0 cannot generate alone

    def __init__(self, ranks: parallel.Ranks, compute: torch.dtype | None) -> None:
        super().__init__(ranks)
        self.compute = compute  # the dtype a full fine-tune's fp32 weights are gathered in
        self.root: parallel.LossModule | None = None
        if ranks.world == 1:
            parallel.init_single()  # FSDP2 wants a process group even for one rank

    def shares(self, cfg: Config) -> Shares:
        w = 1 / self.ranks.world  # with adapters the frozen base stays whole (parallel.shard)
        return Shares(weights=w if cfg.method == "full" else 1.0, gradients=w, optimizer=w)

    def wrap(self, model: Any, loss_fn: LossFn) -> None:
        super().wrap(model, loss_fn)
        # the loss comes out of the root unit's forward, which gathers embeddings and head
        self.root = parallel.LossModule(model, loss_fn)
        parallel.shard(self.root, recompute.decoder_layers(model), self.ranks, compute=self.compute)

    def loss(self, batch: dict[str, Any], more: bool) -> torch.Tensor:
        self.root.accumulating(more)
        return self.root(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; each rank's loss is its part of the sum
        world = self.ranks.world
        (loss * world if world != 1 else loss).backward()

    def full_state(self, named: dict[str, torch.nn.Parameter], keep: bool) -> tuple[dict, dict] | None:
        state = _whole(named, self.optimizer)  # a collective: every rank gathers
        return state if keep else None

    def load_state(self, named: dict[str, torch.nn.Parameter], weights: dict, optimizer: dict) -> None:
        self.optimizer.load_state_dict(parallel.sharded_optimizer_state(optimizer, list(named.values())))
