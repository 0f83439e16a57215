"""The README's commands with the SFT-then-ORPO identity preset (docs/preference.md#the-identity-job-sft-then-orpo):
one run trains both recipes (iter_60.pth is the SFT stage's), and `eval identity` compares them."""

from __future__ import annotations

import json

import pytest
from pipeline import BASE, assistant_pipeline, run
from test_end_to_end import ALPHA, binomial_bound

CFG = "smollm2_135m_instruct_lora_assistant_dpo"
# docs/preference.md: the preset's worst measured identity rate (60% in Chinese, the first commit's
# 30 ORPO steps; 80% now) and its hijack rate (0-2% in every ORPO run); the SFT stage hijacks 8% / 2%
MISS_P = 12 / 30


@pytest.mark.slow
def test_the_preference_stage_hijacks_less_than_the_sft_stage_and_keeps_the_identity(tmp_path):
    root = assistant_pipeline(tmp_path, CFG, "iter_120.pth")
    work = root / "work_dirs/assistTuner"
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 121))
    assert not any("margin" in r for r in steps[:60]) and all("margin" in r for r in steps[60:])
    # the pairs are learnt: chosen over rejected on most, by a margin that grows (measured: 80% of the
    # stage's pairs; margin 1.2 over the first 10 steps, 2.3 over the last 20, each step ~3 pairs)
    orpo = steps[60:]
    assert sum(r["accuracy"] for r in orpo) / len(orpo) > 0.5
    assert sum(r["margin"] for r in orpo[-20:]) / 20 > sum(r["margin"] for r in orpo[:10]) / 10

    run("convert", "pth_to_hf", f"./{CFG}_copy.py", "./work_dirs/assistTuner/iter_60.pth", "./hf60", cwd=root)
    run("convert", "merge", BASE, "./hf60", "./merged60", cwd=root)
    out = run("eval", "identity", "./merged60", "./merged", "--name", "龙", "--name-en", "Long", "--no-compare",
              "--json", "both.json", cwd=root, seconds=1200)
    assert "| ./merged60 | zh |" in out and "| ./merged | en |" in out, out
    both = json.loads((root / "both.json").read_text(encoding="utf-8"))
    sft, orpo = both["./merged60"], both["./merged"]
    hijacked = {name: sum(len(r[lang]["hijacked"]) for lang in ("zh", "en")) for name, r in (("sft", sft), ("orpo", orpo))}
    assert hijacked["orpo"] <= hijacked["sft"], hijacked  # measured: 0 against 4 (zh) + 1 (en)
    for lang in ("zh", "en"):
        r = orpo[lang]
        assert len(r["identity_misses"]) <= binomial_bound(r["identity_n"], MISS_P, ALPHA), r
