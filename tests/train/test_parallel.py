"""Two ranks (torchrun, gloo on CPU) train what one process with twice the accumulation trains,
and their checkpoint resumes on one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.train.launch import first_host, torchrun_command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, model: Path, data: Path, accumulation: int) -> Path:
    cfg = tmp_path / f"acc{accumulation}.py"
    cfg.write_text(
        f"pretrained_model_name_or_path = {str(model)!r}\n"
        f"data_files = {str(data)!r}\n"
        "lora_r = 8\nlora_alpha = 16\nlora_dropout = 0.0\nmax_length = 128\nbatch_size = 1\n"
        f"accumulative_counts = {accumulation}\nmax_steps = 10\nsave_steps = 5\nsave_total_limit = -1\n"
        "lr = 1e-3\nwarmup_ratio = 0.0\ndtype = 'float32'\nreplay_general = False\nidentity_guard = False\n")
    return cfg


def _train(cfg: Path, work: Path, nproc: int, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": str(nproc), "PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work),
                           "--no-progress", *extra], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    return [r for r in log if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("engine", [[], ["--fsdp"]], ids=["data-parallel", "fsdp2"])
def test_two_ranks_match_one_process_and_resume_on_one(bundled_path, identity_data, tmp_path, engine):
    two = _train(_config(tmp_path, bundled_path, identity_data, 1), tmp_path / "two", 2, *engine)
    one = _train(_config(tmp_path, bundled_path, identity_data, 2), tmp_path / "one", 1)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 11))
    assert one[-1]["loss"] < one[0]["loss"]
    for a, b in zip(two, one, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * b["grad_norm"] + 1e-4, (a, b)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]

    # the 2-rank checkpoint of step 5 goes on in one process (twice the accumulation)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "iter_5.pth").write_bytes((tmp_path / "two" / "iter_5.pth").read_bytes())
    after = _train(_config(tmp_path, bundled_path, identity_data, 2), resumed, 1,
                   "--resume", str(resumed / "iter_5.pth"))
    assert [r["step"] for r in after] == list(range(6, 11))
    for a, b in zip(after, two[5:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)

    # and the other way: the one-process checkpoint goes on with 2 ranks
    again = tmp_path / "again"
    again.mkdir()
    (again / "iter_5.pth").write_bytes((tmp_path / "one" / "iter_5.pth").read_bytes())
    after = _train(_config(tmp_path, bundled_path, identity_data, 1), again, 2, *engine,
                   "--resume", str(again / "iter_5.pth"))
    for a, b in zip(after, one[5:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)


def test_torchrun_only_when_asked(monkeypatch):
    for name in ("NPROC_PER_NODE", "NNODES", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_command(["train", "c.py"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.0.0.7")
    cmd = torchrun_command(["train", "c.py"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.7"} <= set(cmd)
    assert cmd[-4:] == ["-m", "tuneforge", "train", "c.py"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a rank: no second launch
    assert torchrun_command(["train", "c.py"]) is None


def test_bad_launch_variables_are_one_clear_line(tmp_path):
    env = {**os.environ, "NPROC_PER_NODE": "two"}
    cfg = tmp_path / "c.py"
    cfg.write_text("pretrained_model_name_or_path = 'x'\ndata_files = 'd.jsonl'\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["tuneforge: error: NPROC_PER_NODE='two': expected a whole number"]


def test_slurm_first_host():
    assert first_host("gpu[03-05,09],cpu1") == "gpu03"
    assert first_host("node7") == "node7"
    assert first_host("a,b") == "a"
