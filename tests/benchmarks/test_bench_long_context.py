"""The long-context benchmark: each row climbs its ladder of lengths in its own process and
reports what it measured even when it stops early; the straight-line prediction is made only
from lengths that trained, and never where memory already ran out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from run_bench import run_bench

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_long_context as lc  # noqa: E402

K = 1024


def test_the_prediction_extends_the_line_through_the_last_two_peaks():
    steps = [{"seq": 64 * K, "step_s": 1.0, "peak_gib": 30.0}, {"seq": 128 * K, "step_s": 3.0, "peak_gib": 50.0},
             {"seq": 256 * K, "skipped": "would take ~12 s, 5 s left"}]
    got = lc.summarise({}, steps, capacity_gib=90.0)
    assert got["longest"] == 128 * K and got["oom_at"] is None
    assert got["predicted_longest"] == 256 * K  # 20 GiB per 64k tokens: 40 GiB more is 128k more
    assert got["kib_per_token"] == pytest.approx(20 * (1 << 20) / (64 * K), rel=1e-3)
    ran_out = lc.summarise({}, steps[:2] + [{"seq": 256 * K, "oom": "CUDA out of memory"}], capacity_gib=90.0)
    assert ran_out["oom_at"] == 256 * K and "predicted_longest" not in ran_out
    table = lc.render_table([{"run": "r", "note": "n", **ran_out}], {
        "date": "d", "gpu": "G", "gpu_total_gib": 90.0, "shape": "s", "row_seconds": 60, "torch": "t",
        "transformers": "x", "peft": "p", "command": "c"})
    assert "| r | 128k | 256k | 50.0 / - |" in table and "| memory |" in table


@pytest.mark.slow
def test_rows_climb_their_ladder_and_a_missing_peer_is_its_error(tmp_path):
    out = tmp_path / "out"
    rows = "tuneforge-lora,unsloth-lora,hf-lora,tuneforge-lora-packed"
    run_bench("bench_long_context.py", "--tiny", "--rows", rows, "--out", str(out), "--model", str(tmp_path / "model"))
    got = {r["run"]: r for r in json.loads((out / "results.json").read_text())["long-context"]["rows"]}
    assert list(got) == rows.split(",")
    assert "unsloth" in got["unsloth-lora"]["error"].lower() or "accelerator" in got["unsloth-lora"]["error"]
    for name in ("tuneforge-lora", "hf-lora", "tuneforge-lora-packed"):
        ladder = got[name]["ladder"]
        assert [s["seq"] for s in ladder] == [64, 128, 256, 512], ladder
        assert all(s["tokens"] == s["seq"] for s in ladder)  # every token of the row trained
        assert all(10 > s["loss"] > 0 for s in ladder)  # random tokens of the tiny 1000-word vocabulary
    # the same random model and the same tokens: the engines start from the same loss
    assert got["hf-lora"]["ladder"][0]["loss"] == pytest.approx(got["tuneforge-lora"]["ladder"][0]["loss"], rel=2e-2)
    assert "| tuneforge-lora-packed | 512 |" in (out / "RESULTS.md").read_text()
