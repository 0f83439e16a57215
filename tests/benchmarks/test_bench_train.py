"""The training benchmark times what `tuneforge train` runs: its tuneforge runs go through the
same recipe, so on the same config and data they train the same losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from waits import tuneforge

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402


def test_the_benchmark_trains_the_losses_tuneforge_train_trains(tiny_model_dir, identity_data, tmp_path):
    run = bench_train.Run("tuneforge", "lora", "full")
    steps = 5
    step = bench_train.tuneforge(run, tiny_model_dir, 1e-2, 128, steps, data=identity_data, log=lambda s: None)
    bench = []
    for i in range(steps):
        step(i)
        bench.append(step.last_loss)

    settings = bench_train.tuneforge_settings(run, tiny_model_dir, 1e-2, 128, steps, data=identity_data)
    cfg = tmp_path / "bench_config.py"
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    proc = tuneforge("train", str(cfg), "--work-dir", str(tmp_path / "w"), "--no-progress", seconds=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    command = [r["loss"] for r in log if "loss" in r]
    assert len(command) == steps
    assert bench == pytest.approx(command, rel=1e-5, abs=1e-6)
    assert bench[-1] < bench[0]  # a run that learns, so that the comparison means something
