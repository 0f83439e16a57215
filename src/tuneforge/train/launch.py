"""Start the ranks of a multi-process run, the way XTuner users launch one.

``NPROC_PER_NODE=N tuneforge train ...`` re-runs the same command under torchrun with N ranks on
this machine; ``NNODES``, ``NODE_RANK``, ``ADDR`` and ``PORT`` spread it over several machines
(run the same command on each). ``--launcher slurm`` instead reads the rank layout Slurm gives
each task started by ``srun``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tuneforge.errors import UserError


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected a whole number") from None
    if value < (0 if name == "NODE_RANK" else 1):
        raise UserError(f"{name}={value}: out of range")
    return value


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command that starts this run's ranks, or None when one process will do
    (also inside a rank that torchrun or Slurm already started)."""
    if "LOCAL_RANK" in os.environ:
        return None
    nproc, nnodes = _int_env("NPROC_PER_NODE", 1), _int_env("NNODES", 1)
    if nproc == 1 and nnodes == 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--nnodes={nnodes}", f"--node_rank={_int_env('NODE_RANK', 0)}",
            f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
            f"--master_port={_int_env('PORT', 29500)}", "-m", "tuneforge", *argv]


def launch(argv: list[str]) -> int | None:
    """Run ARGV under torchrun when NPROC_PER_NODE/NNODES ask for ranks; returns its exit code,
    or None if this process should train by itself."""
    cmd = torchrun_command(argv)
    if cmd is None:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not m:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the first host; set ADDR")
    return m.group(1) + (m.group(2) or "")


def slurm_environment() -> None:
    """Turn the Slurm task's variables into the ones torch.distributed reads."""
    try:
        rank, world = os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"]
        local = os.environ["SLURM_LOCALID"]
    except KeyError as err:
        raise UserError(f"--launcher slurm: {err.args[0]} is not set; start the command with srun") from None
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local)
    os.environ.setdefault("MASTER_ADDR", os.environ.get("ADDR") or first_host(os.environ.get("SLURM_JOB_NODELIST", "")))
    os.environ.setdefault("MASTER_PORT", os.environ.get("PORT", "29500"))
