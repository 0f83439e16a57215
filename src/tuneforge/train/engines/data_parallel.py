"""Data parallel: every rank holds the whole model and trains its share of each step's
micro-batches; gradients are summed over ranks before the update (parallel.sum_gradients), so N
ranks train exactly what one process with N times the accumulation trains."""

from __future__ import annotations

import torch

from tuneforge.train import parallel
from tuneforge.train.engines.base import LocalEngine


class DataParallelEngine(LocalEngine):
    name = "data parallel"

    def prepare(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        super().prepare(optimizer, params)
        parallel.broadcast_parameters(params, self.ranks)  # start every rank from rank 0's weights

    def reduce_and_clip(self, max_norm: float) -> float:
        parallel.sum_gradients(self.params, self.ranks)
        return super().reduce_and_clip(max_norm)
