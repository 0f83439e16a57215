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


def _sample(*turns: str):
    from tuneforge.data.formats import Message, Sample

    roles = ["user", "assistant"] * len(turns)
    return Sample(tuple(Message(r, t) for r, t in zip(roles, turns, strict=False)), "test:1")


def test_pairs_from_the_identity_file_keep_the_history_and_use_the_base_models_answers():
    from tuneforge.data.identity_pairs import last_questions, sample_pairs

    samples = [_sample("Who are you?", "I am Long's assistant."),
               _sample("你好", "你好！", "你是谁？", "我是龙的小助手。"),  # two turns: the history stays in the prompt
               _sample("Same?", "Same answer."),  # the base already says it: nothing to teach
               _sample("Unanswered?", "I am Long's assistant, too.")]  # no base answer: no pair
    base = {"Who are you?": "I am SmolLM.", "你是谁？": "我是SmolLM。", "Same?": "Same answer. ",
            "What is 2+2?": "4.", "天空为什么是蓝色的？": "因为瑞利散射。"}
    assert last_questions(samples) == ["Who are you?", "你是谁？", "Same?", "Unanswered?"]
    pairs = sample_pairs(samples, base, ["What is 2+2?", "天空为什么是蓝色的？", "No base answer?"], repeat=2)
    by = {}
    for p in pairs:
        by.setdefault(p["prompt"][-1]["content"], []).append(p)
    assert set(by) == {"Who are you?", "你是谁？", "What is 2+2?", "天空为什么是蓝色的？"}
    who = by["Who are you?"][0]
    assert who["chosen"] == [{"role": "assistant", "content": "I am Long's assistant."}]
    assert who["rejected"] == [{"role": "assistant", "content": "I am SmolLM."}]
    zh = by["你是谁？"][0]
    assert [m["content"] for m in zh["prompt"]] == ["你好", "你好！", "你是谁？"]
    assert len(by["What is 2+2?"]) == 2  # REPEAT times over
    for p in by["What is 2+2?"]:  # the hijack: an identity answer in the prompt's language is rejected
        assert p["chosen"][0]["content"] == "4."
        assert p["rejected"][0]["content"] in {"I am Long's assistant.", "I am Long's assistant, too.", "Same answer."}
    assert all(p["rejected"][0]["content"] == "我是龙的小助手。" for p in by["天空为什么是蓝色的？"])
    assert sample_pairs(samples, base, ["What is 2+2?"], seed=1) == sample_pairs(samples, base, ["What is 2+2?"],
                                                                                  seed=1)


def test_the_pairs_file_is_read_as_conversational_trl_pairs(tmp_path):
    from tuneforge.data.identity_pairs import pairs_file

    samples = [_sample("你好", "你好！", "你是谁？", "我是龙的小助手。")]
    out = tmp_path / "pairs.jsonl"
    assert pairs_file(out, samples, {"你是谁？": "我是SmolLM。"}, seed=0) == 1  # no general answers cached
    (pair,) = list(iter_pairs(out))
    assert [m.content for m in pair.chosen] == ["你好", "你好！", "你是谁？", "我是龙的小助手。"]
    assert pair.rejected[-1].content == "我是SmolLM。" and pair.rejected[:-1] == pair.chosen[:-1]
