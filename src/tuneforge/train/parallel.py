"""Data parallelism across ranks: each rank takes its share of every optimizer step's
micro-batches and the gradients are summed across ranks before the update, so N ranks train
exactly what one process with N times the accumulation trains."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Ranks:
    """Join the process group torchrun/Slurm set up (NCCL on GPUs, gloo on CPUs), or return a
    world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend())
    return ranks


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single() -> None:
    """A process group of one, for engines that want one even then (FSDP2, DeepSpeed). Without
    rank variables DeepSpeed would go looking for MPI (XTuner's "No module named 'mpi4py'")."""
    if dist.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    dist.init_process_group(backend())


class LossModule(torch.nn.Module):
    """The model with the loss as its output. FSDP gathers the root unit's weights (embeddings,
    head) in the root's forward, and DeepSpeed hooks its backward bookkeeping onto what its
    engine's forward returns: either way the loss must come out of the wrapped module, whichever
    path (chunked head, varlen attention) computes it."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, dict], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.sync_last_only = False  # FSDP with adapters: see accumulating()

    def forward(self, **batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def accumulating(self, more: bool) -> None:
        """FSDP with adapters, before each micro-batch (MORE: others follow in this step): keep
        the gathered adapters and their unreduced gradients until the last one, so a step does
        one all-gather and one reduce-scatter, not one per micro-batch."""
        if self.sync_last_only:
            self.set_requires_gradient_sync(not more)
            self.set_reshard_after_backward(not more)


def device(ranks: Ranks) -> torch.device:
    return torch.device(f"cuda:{ranks.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def total(value: float, ranks: Ranks) -> float:
    """VALUE summed over ranks."""
    if ranks.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def sum_tensor(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """T (on the CPU) summed over ranks, elementwise."""
    if ranks.world == 1:
        return t
    out = t.to(_comm_device())
    dist.all_reduce(out)
    return out.cpu()


def anyone(flag: bool, ranks: Ranks) -> bool:
    """True on every rank if FLAG is true on any (a stop request must stop all of them)."""
    return total(float(flag), ranks) > 0


def broadcast_parameters(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Start every rank from rank 0's weights."""
    if ranks.world > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, 0)


def sum_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Sum the gradients over ranks, as one flat buffer per dtype (one collective, not one per
    tensor)."""
    if ranks.world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def shutdown(ranks: Ranks) -> None:
    if dist.is_initialized():  # (one process under DeepSpeed has a group too)
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- FSDP2: weights sharded too

def shard(root: LossModule, layers: list[torch.nn.Module], ranks: Ranks,
          compute: torch.dtype | None = None) -> None:
    """PyTorch FSDP2: each decoder layer is one unit (gathered for its forward and backward), the
    rest (embeddings, final norm, head) is the root unit.

    A full fine-tune shards everything and reshards after each forward. Its fp32 master weights
    (see models.load.training_dtypes) are gathered in COMPUTE (bf16) when that is given, which
    halves the traffic, and its gradients are reduced in fp32.

    With adapters (LoRA), the frozen base stays whole on every rank: it has no gradients or
    optimizer state to shard, and gathering it twice per micro-batch costs more bandwidth than
    training saves (measured on two H200s: 1.44x the one-GPU speed instead of ~2x). Only the
    adapters, their gradients and AdamW's state are sharded; they stay gathered through all
    micro-batches of a step (see LossModule.accumulating), and their gradients are reduced once
    per optimizer step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (ranks.world,))
    adapters = any(not p.requires_grad for p in root.parameters())
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) \
        if compute is not None and not adapters else MixedPrecisionPolicy()
    for unit in [*layers, root]:
        frozen = {p for p in unit.parameters() if not p.requires_grad} if adapters else None
        fully_shard(unit, mesh=mesh, reshard_after_forward=not adapters, ignored_params=frozen,
                    mp_policy=policy)
    root.sync_last_only = adapters


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it), or T itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded tensor gathered whole: the one-process format,
    so that the checkpoint resumes on any number of ranks."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: full(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def sharded_optimizer_state(sd: dict, params: list[torch.nn.Parameter]) -> dict:
    """A one-process optimizer state with each per-parameter tensor cut to this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {}
        for k, v in st.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape:
                v = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            state[i][k] = v
    return {"state": state, "param_groups": sd["param_groups"]}
