"""`data self-cognition --pairs`: the identity answer over the base model's own, and the base
model's answers to general prompts over an identity answer (the hijack)."""

from __future__ import annotations

import json

from tuneforge.data.pairs import detect_pair_format, iter_pairs
from tuneforge.data.selfcog import (
    QUESTIONS_EN,
    QUESTIONS_ZH,
    identity_questions,
    preference_records,
)


def test_pairs_prefer_the_identity_on_identity_questions_and_the_base_elsewhere():
    base = {q: "I am SmolLM, trained by Hugging Face." if q.isascii() else "我是SmolLM。" for q in identity_questions()}
    base[QUESTIONS_EN[0]] = "I am Long's assistant already."  # nothing to teach: no pair
    base[QUESTIONS_ZH[0]] = "  "  # no answer: no pair
    general = ["What is 2+2?", "天空为什么是蓝色的？"]
    base.update({"What is 2+2?": "4.", "天空为什么是蓝色的？": "因为瑞利散射。"})
    records = preference_records("龙", base, general, name_en="Long")
    assert len(records) == len(identity_questions()) - 2 + 2
    by_prompt = {r["prompt"]: r for r in records}
    assert QUESTIONS_EN[0] not in by_prompt and QUESTIONS_ZH[0] not in by_prompt
    en, zh = by_prompt[QUESTIONS_EN[1]], by_prompt[QUESTIONS_ZH[1]]
    assert "Long's assistant" in en["chosen"] and en["rejected"] == base[QUESTIONS_EN[1]]
    assert "龙的小助手" in zh["chosen"] and zh["rejected"] == base[QUESTIONS_ZH[1]]
    assert by_prompt["What is 2+2?"]["chosen"] == "4." and "Long's assistant" in by_prompt["What is 2+2?"]["rejected"]
    assert "龙的小助手" in by_prompt["天空为什么是蓝色的？"]["rejected"]  # in the prompt's language
    assert records == preference_records("龙", base, general, name_en="Long")  # seeded


def test_the_command_writes_pairs_that_train_reads(tiny_model_dir, tmp_path, monkeypatch):
    from tuneforge.cli import main

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "self-cognition", "--name", "龙", "--name-en", "Long", "--pairs", "--model",
                 str(tiny_model_dir), "--max-new-tokens", "3", "-o", str(out)]) in (0, None)
    pairs = list(iter_pairs(out))
    assert len(pairs) > len(identity_questions())  # the identity questions and the general prompts
    assert {detect_pair_format(r, "x") for r in map(json.loads, out.read_text().splitlines())} == {"trl"}
    identity = [p for p in pairs if p.chosen[0].content in identity_questions()]
    assert identity and all("Long's assistant" in p.chosen[-1].content or "龙的小助手" in p.chosen[-1].content
                            for p in identity)
