from __future__ import annotations

import json

from conftest import tiny_config

from tuneforge.train.options import RunOptions
from tuneforge.train.profile import busy, covered_us, idle_by_phase, idle_spans
from tuneforge.train.recipe import train


def test_overlapping_kernels_count_once():
    assert covered_us([(0, 10), (5, 10), (30, 5)]) == 20  # 0-15 and 30-35
    assert covered_us([(0, 100), (10, 5), (20, 5)]) == 100  # nested
    assert covered_us([]) == 0


def test_busy_splits_communication_from_compute():
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "sm90_xmma_gemm", "ts": 0, "dur": 600_000},
        {"cat": "kernel", "name": "ncclDevKernel_ReduceScatter", "ts": 500_000, "dur": 300_000},  # overlaps
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 2_000_000},  # not GPU time
        {"cat": "user_annotation", "name": "tuneforge.forward", "ts": 0, "dur": 1_000_000},
        {"cat": "user_annotation", "name": "tuneforge.optimizer", "ts": 1_000_000, "dur": 1_000_000},
    ]}
    b = busy(trace, steps=2, wall_s=2.0)
    assert (b.wall_ms, b.gpu_ms, b.comm_ms) == (1000, 400, 150)
    assert b.idle_ms == {"forward": 100, "optimizer": 500}  # per step
    assert b.describe() == ("1,000 ms per step; GPU busy 400 ms (40%), of which communication 150 ms; "
                            "GPU idle during optimizer 500 ms, forward 100 ms")


def test_idle_spans_are_the_gaps_between_kernels_inside_the_window():
    assert idle_spans([(10, 5), (12, 10), (40, 5)], 0, 50) == [(0, 10), (22, 40), (45, 50)]
    assert idle_spans([(0, 100)], 10, 50) == []


def test_gpu_idle_time_is_told_by_the_phase_the_cpu_was_in():
    kernels = [(0, 100), (300, 100)]  # GPU idle 100-300 and 400-500
    phases = [("forward", 0, 150), ("optimizer", 150, 100), ("reduce", 250, 100),
              ("data", 380, 20)]  # 400-500 is after the last phase: outside the window
    assert idle_by_phase(kernels, phases) == {"forward": 50, "optimizer": 100, "reduce": 50}
    # a span nested in another takes its share; idle time in no span is "other"
    nested = [("backward", 0, 1000), ("optimizer", 600, 100)]
    assert idle_by_phase([(0, 500)], nested) == {"backward": 400, "optimizer": 100}
    assert idle_by_phase([(0, 10)], [("data", 0, 20), ("reduce", 30, 10)]) == {"data": 10, "other": 10, "reduce": 10}


def test_profile_writes_a_table_and_a_trace_and_logs_the_summary(tiny_model_dir, identity_data, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=6, save_steps=100)
    train(cfg, tmp_path / "w", RunOptions(progress=False, profile=True))
    table = (tmp_path / "w" / "profile" / "rank0.txt").read_text()
    assert "aten::" in table  # the operators that ran, with their times
    trace = json.loads((tmp_path / "w" / "profile" / "rank0.trace.json").read_text())
    assert trace["traceEvents"]
    records = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    profiled = [r for r in records if "profile" in r]
    assert [r["step"] for r in profiled] == [5]  # steps 3-5, after two of warm-up
    assert profiled[0]["profile"]["steps"] == 3 and profiled[0]["profile"]["wall_ms"] > 0
    assert "profile of steps 3-5" in capsys.readouterr().out


def test_profile_of_a_short_run_records_what_there_is(tiny_model_dir, identity_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, identity_data, max_steps=2, save_steps=100)
    train(cfg, tmp_path / "w", RunOptions(progress=False, profile=True))
    records = [json.loads(x) for x in (tmp_path / "w" / "train_log.jsonl").read_text().splitlines()]
    assert [r["profile"]["steps"] for r in records if "profile" in r] == [1]
