"""The DPO benchmark: both rows train DPO (a first loss of log 2, since the reference is the
policy) on the same pairs at the same steps; tuneforge's rows are what its DPO objective reads,
and TRL's text is exactly the pairs' ids."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from run_bench import run_bench

from tuneforge.data.batching import collate, micro_batches
from tuneforge.data.encode import IGNORE
from tuneforge.train.preference import per_sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_dpo  # noqa: E402
import bench_train  # noqa: E402


def trl_importable() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


@pytest.mark.slow  # a minute on a loaded 2-core machine: a model, two processes, TRL's import
def test_both_rows_train_dpo_from_log_2_on_the_same_pairs(tmp_path):
    out = tmp_path / "out"
    rows = ["tuneforge-dpo"] + (["trl-dpo"] if trl_importable() else [])
    run_bench("bench_dpo.py", "--tiny", "--rows", ",".join(rows), "--out", str(out), "--model", str(tmp_path / "model"))
    got = {r["run"]: r for r in json.loads((out / "results.json").read_text())["dpo"]["rows"]}
    assert list(got) == rows
    for name, r in got.items():
        assert "error" not in r, f"{name}: {r['error']} (log: {(out / 'log.txt').read_text()[-3000:]})"
        assert r["tokens_per_s"] > 0 and len(r["step_s"]) == 1
        assert len(r["losses"]) == 2 and r["losses"][0] == pytest.approx(math.log(2), abs=1e-2)
    assert len({json.dumps(r["pair_tokens"]) for r in got.values()}) == 1  # the same pairs, step by step
    table = (out / "RESULTS.md").read_text()
    assert all(f"| {name} | " in table for name in rows)


@pytest.mark.parametrize("per_step", [1, 2])
def test_the_recipe_trains_each_steps_pairs_at_that_step_with_labels_on_the_answers(per_step):
    steps = bench_dpo.by_step(bench_dpo.make_pairs(4 * per_step, 8, 20, vocab=1000), per_step)
    rows = bench_dpo.pair_rows(steps)
    for s, pairs in enumerate(steps):
        (row,) = micro_batches(rows, 1, 1, bench_dpo.TUNEFORGE_DPO["seed"], s)[0]  # what Recipe.step(s) trains
        assert row.input_ids == [t for p in pairs for a in (p.chosen, p.rejected) for t in p.prompt + a]
        assert row.pairs == len(pairs)
        # the answer tokens per sequence, as tuneforge's DPO objective counts them from a batch
        batch = collate([row], pad_id=0)
        targets, seq = batch["labels"][:, 1:], batch["sequence_ids"][:, 1:]
        trained = targets != IGNORE
        counts = per_sequence(torch.ones(int(trained.sum())), seq[trained], 2 * batch["pairs"])
        assert counts.tolist() == [[len(p.chosen), len(p.rejected)] for p in pairs]
        assert sum(p.tokens for p in pairs) == len(row) - sum(len(p.prompt) for p in pairs)


def test_trls_text_is_exactly_the_pairs_ids():
    """TRL tokenizes the prompt and the prompt + answer strings; both must give the pairs' ids."""
    tokenizer = bench_train.make_tokenizer(1000)
    for p in bench_dpo.make_pairs(3, 8, 20, vocab=1000):
        prompt = bench_dpo.as_text(p.prompt) + " "
        assert tokenizer(text=prompt)["input_ids"] == p.prompt
        for answer in (p.chosen, p.rejected):
            assert answer[-1] == tokenizer.eos_token_id  # so TRL appends no EOS of its own
            assert tokenizer(text=prompt + bench_dpo.as_text(answer))["input_ids"] == p.prompt + answer


def test_the_table_compares_with_trl_and_keeps_other_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"side-by-side": {"rows": []}}))
    meta = {"date": "2026-12-02", "gpu": "G", "shape": "s", "prompt": 256, "answer": 2048, "pairs": 1, "warmup": 2,
            "steps": 8, "lr": 5e-6, "torch": "t", "transformers": "x", "peft": "p", "command": "c"}
    trl = {"run": "trl-dpo", "engine": "trl", "note": "", "tokens_per_s": 5000.0, "peak_gib": 40.0,
           "reserved_gib": 42.0, "losses": [0.6931, 0.69], "positions": [4800], "warmup_s": [3.0],
           "versions": {"trl": "1.15.0"}}
    ours = {**trl, "run": "tuneforge-dpo", "engine": "tuneforge", "tokens_per_s": 12500.0, "peak_gib": 30.0,
            "versions": {}}
    failed = {"run": "x", "engine": "trl", "note": "", "error": "exit 1: OutOfMemoryError: a | b"}
    bench_dpo.write_results([ours, trl, failed], meta, tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert "side-by-side" in payload
    by = {r["run"]: r for r in payload["dpo"]["rows"]}
    assert (by["tuneforge-dpo"]["vs_trl"], by["tuneforge-dpo"]["memory_vs_trl"]) == (2.5, 0.75)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| tuneforge-dpo | 12,500 | 2.5 | 30.0 / 42.0 | 0.75 | 0.6931 -> 0.6900 | 4800 |" in text
    assert "trl 1.15.0" in text and "OutOfMemoryError: a / b" in text
