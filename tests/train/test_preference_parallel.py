"""DPO on two ranks (torchrun, gloo on CPU) trains what one process with twice the accumulation
trains: the loss is a mean over all ranks' pairs, and the rewards are summed over ranks too.

The ranks run with fewer threads each, so their matmuls round differently; a full fine-tune at
lr 1e-2 turned that into 1e-4 of the rewards after two steps (AdamW's first steps scale rounding-
sized gradients up to full-size updates), hence lr 1e-3 there. LoRA matched to the log's 6 decimals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl
from waits import limit

from tuneforge.train.parallel import free_port


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _config(tmp_path: Path, model: Path, data: Path, accumulation: int, method: str) -> Path:
    cfg = tmp_path / f"dpo_acc{accumulation}_{method}.py"
    settings = dict(pretrained_model_name_or_path=str(model), data_files=str(data), method=method, lora_r=8,
                    lora_alpha=16, lora_dropout=0.0, max_length=96, batch_size=1, accumulative_counts=accumulation,
                    max_steps=4, save_steps=100, lr=1e-2 if method == "lora" else 1e-3, warmup_ratio=0.0, dtype="float32", replay_general=False,
                    identity_guard=False, objective="dpo")
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return cfg


def _train(cfg: Path, work: Path, nproc: int, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": str(nproc), "PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg), "--work-dir", str(work),
                           "--no-progress", *extra], capture_output=True, text=True, env=env, timeout=limit(900))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("engine", [
    pytest.param([], id="data-parallel"),
    pytest.param(["--fsdp"], id="fsdp2"),
    pytest.param(["--deepspeed", "deepspeed_zero2"], id="zero2",
                 marks=pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed")),
])
def test_two_ranks_of_dpo_match_one_process(tiny_model_dir, tmp_path, engine, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"a bad {i}"} for i in range(8)])
    one = _train(_config(tmp_path, tiny_model_dir, data, 2, method), tmp_path / "one", 1)
    two = _train(_config(tmp_path, tiny_model_dir, data, 1, method), tmp_path / "two", 2, *engine)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "margin", "accuracy", "reward_chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (key, one, two)
    assert one[-1]["margin"] > one[0]["margin"]
