"""The side-by-side benchmark: every row in its own process, so a peer that cannot run is that
row's error and the other rows still measure; rows of different engines train the same model on
the same tokens; the profile puts each kernel in the phase that launched it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from run_bench import run_bench

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_side_by_side as sbs  # noqa: E402


@pytest.mark.slow
def test_a_crashing_row_is_its_error_and_the_others_still_run(tmp_path):
    out = tmp_path / "out"
    # on this CPU-only machine Unsloth cannot run (not installed, or no accelerator): its row must fail
    rows = "hf-lora-full,unsloth-lora-full,tuneforge-lora-full"
    run_bench("bench_side_by_side.py", "--tiny", "--rows", rows, "--steps", "2", "--warmup", "1", "--out", str(out),
              "--model", str(tmp_path / "model"))
    got = {r["run"]: r for r in json.loads((out / "results.json").read_text())["side-by-side"]["rows"]}
    assert list(got) == rows.split(",")
    assert "unsloth" in got["unsloth-lora-full"]["error"].lower() or "accelerator" in got["unsloth-lora-full"]["error"]
    for name in ("hf-lora-full", "tuneforge-lora-full"):
        assert got[name]["tokens_per_s"] > 0 and len(got[name]["step_s"]) == 2
    # the same random model and the same first row: both engines start from the same loss
    assert got["hf-lora-full"]["losses"][0] == pytest.approx(got["tuneforge-lora-full"]["losses"][0], rel=1e-2)
    table = (out / "RESULTS.md").read_text()
    assert "| unsloth-lora-full | lora | full | - |" in table and "**exit 1:" in table
    assert (out / "tuneforge-lora-full.txt").is_file()  # the profiled row's operator table
    assert "===== unsloth-lora-full" in (out / "log.txt").read_text()


def test_rendering_keeps_other_benchmarks_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"runs": [{"run": "bench_train's"}]}))
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\nabove\n<!-- side-by-side:begin -->\nold\n"
                                         "<!-- side-by-side:end -->\nbelow\n")
    meta = {"date": "2026-12-01", "gpu": "G", "matmul_tflops": 800.0, "shape": "s", "seq": 4096, "warmup": 2,
            "steps": 4, "torch": "t", "transformers": "x", "peft": "p", "command": "c"}
    unsloth = {"run": "unsloth-lora-full", "engine": "unsloth", "mode": "lora", "workload": "full",
               "tokens_per_s": 10000.0, "flops_per_token": 4e10, "peak_gib": 18.0, "reserved_gib": 19.0,
               "warmup_s": [30.0], "losses": [12.0, 11.0], "note": ""}
    ours = {**unsloth, "run": "tuneforge-lora-full", "engine": "tuneforge", "tokens_per_s": 15000.0}
    failed = {"run": "liger-lora-full", "engine": "liger", "mode": "lora", "workload": "full",
              "error": "exit 1: ImportError: no | here"}
    sbs.write_results([unsloth, ours, failed], meta, tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["runs"] == [{"run": "bench_train's"}]
    by = {r["run"]: r for r in payload["side-by-side"]["rows"]}
    assert by["tuneforge-lora-full"]["vs_unsloth"] == 1.5
    assert by["tuneforge-lora-full"]["mfu"] == pytest.approx(0.75)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "above" in text and "below" in text and "old" not in text
    assert "| tuneforge-lora-full | lora | full | 15,000 | 1.5 | 18.0 / 19.0 |" in text
    assert "ImportError: no / here" in text  # a '|' in an error must not break the table


def test_the_profile_puts_each_kernel_in_the_phase_that_launched_it():
    def launch(ts, corr, tid=1):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
                "args": {"correlation": corr}}

    def kernel(name, corr, dur_us):
        return {"cat": "kernel", "name": name, "ts": 1000 + corr, "dur": dur_us, "args": {"correlation": corr}}

    events = [
        {"cat": "user_annotation", "name": "tuneforge.forward", "ts": 0, "dur": 100},
        {"cat": "user_annotation", "name": "tuneforge.backward", "ts": 100, "dur": 100},
        {"cat": "user_annotation", "name": "tuneforge.optimizer", "ts": 200, "dur": 50},
        launch(10, 1), kernel("nvjet_tst_128x256_64x4", 1, 3000),
        launch(20, 2), kernel("void pytorch_flash::flash_fwd_kernel<>", 2, 1000),
        # backward's kernels are launched from autograd's own thread: the time decides, not the thread
        launch(150, 3, tid=7), kernel("sm90_xmma_gemm_bf16bf16", 3, 5000),
        launch(160, 4, tid=7), kernel("void kDequantizeBlockwise<>", 4, 500),
        launch(210, 5), kernel("void at::native::multi_tensor_apply_kernel<>", 5, 200),
        launch(300, 6), kernel("triton_poi_fused__to_copy_0", 6, 100),  # after every phase
    ]
    got = sbs.breakdown({"traceEvents": events})
    assert got["gpu_ms"] == {"forward": {"matmul": 3.0, "attention": 1.0},
                             "backward": {"matmul": 5.0, "4-bit dequant": 0.5},
                             "optimizer": {"optimizer maths": 0.2},
                             "step": {"compiled (triton)": 0.1}}
    assert got["top_kernels"][0] == {"name": "sm90_xmma_gemm_bf16bf16", "ms": 5.0, "calls": 1, "kind": "matmul"}
