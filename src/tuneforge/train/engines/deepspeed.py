"""DeepSpeed ZeRO (``--deepspeed deepspeed_zero2``, a preset or a user's JSON): DeepSpeed takes
the model and tuneforge's AdamW and partitions optimizer state (ZeRO-1), gradients (ZeRO-2) and
weights (ZeRO-3); train/zero.py holds the config handling and the state gathering."""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.train import parallel, zero
from tuneforge.train.engines.base import LocalEngine, Shares
from tuneforge.train.profile import phase


class DeepSpeedEngine(LocalEngine):
    master_weights_elsewhere = True  # DeepSpeed keeps fp32 masters of bf16 weights

    def __init__(self, ranks: parallel.Ranks, ds: dict[str, Any]) -> None:
        super().__init__(ranks)
        self.ds = ds
        self.stage = zero.stage(ds)
        self.name = f"DeepSpeed ZeRO-{self.stage}"
        self.partitioned = self.stage == 3
        self.evaluates = not self.partitioned
        self.engine: Any = None
        if ranks.world == 1:
            parallel.init_single()  # without rank variables DeepSpeed would look for MPI

    def shares(self, cfg: Config) -> Shares:
        w = 1 / self.ranks.world
        return Shares(weights=w if self.stage == 3 else 1.0, gradients=w if self.stage >= 2 else 1.0,
                      optimizer=0.0 if zero.offloads_optimizer(self.ds) else w, fp32_master=True)

    def prepare(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        super().prepare(optimizer, params)
        # how many parameters each group holds (LoRA+ has two), before DeepSpeed flattens them
        self.group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        # DeepSpeed broadcasts rank 0's weights itself
        self.engine = zero.wrap(self.model, self.loss_fn, optimizer, self.ds)

    def loss(self, batch: dict[str, Any], more: bool) -> torch.Tensor:
        return self.engine(**batch)  # its backward bookkeeping hooks onto what its forward returns

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks (each rank's loss is its part of the sum), and
        # our loss is already a mean over the step, not over micro-batches
        self.engine.backward(loss * self.ranks.world, scale_wrt_gas=False)
        with phase("optimizer"):
            self.engine.step()  # counts micro-batches; after the step's last one it steps AdamW

    def reduce_and_clip(self, max_norm: float) -> float:
        # it reduced, clipped and stepped already (or skipped a non-finite step)
        return float(self.engine.get_global_grad_norm() or 0.0)

    def step(self) -> None:
        pass  # done at the step's last micro-batch

    def zero_grad(self) -> None:
        pass  # DeepSpeed's own step zeroes its gradient partitions

    def full_state(self, named: dict[str, torch.nn.Parameter], keep: bool) -> tuple[dict, dict] | None:
        return zero.full_state(self.engine, named, keep, self.group_sizes)

    def load_state(self, named: dict[str, torch.nn.Parameter], weights: dict, optimizer: dict) -> None:
        zero.load_full_state(self.engine, named, weights, optimizer)
