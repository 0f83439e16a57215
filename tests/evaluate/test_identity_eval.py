from __future__ import annotations

from tuneforge.data.general_prompts import GENERAL_EN, GENERAL_ZH
from tuneforge.data.selfcog import QUESTIONS_EN, QUESTIONS_ZH
from tuneforge.evaluate import questions as Q
from tuneforge.evaluate.guard import leaks, overlap
from tuneforge.evaluate.identity import evaluate_identity, is_hijack, names_identity


def test_held_out_sets_are_disjoint_from_training_prompts():
    train = set(QUESTIONS_ZH + QUESTIONS_EN + GENERAL_EN + GENERAL_ZH)
    held = set(Q.IDENTITY_ZH + Q.IDENTITY_EN + Q.GENERAL_ZH + Q.GENERAL_EN)
    assert not train & held
    assert min(len(Q.IDENTITY_ZH), len(Q.IDENTITY_EN)) >= 30
    assert min(len(Q.GENERAL_ZH), len(Q.GENERAL_EN)) >= 40
    assert len(GENERAL_EN) + len(GENERAL_ZH) >= 180


def test_identity_and_hijack_detection():
    assert names_identity("I'm Long's assistant.", "Long", "en")
    assert not names_identity("It takes a long time.", "Long", "en")
    assert names_identity("我是龙的小助手", "龙", "zh")
    assert is_hijack("I am Long's assistant, happy to help!", "Long", "en")
    assert not is_hijack("Long ago, people built walls.", "Long", "en")
    assert is_hijack("我是龙的小助手，很高兴为你服务！", "龙", "zh")
    assert not is_hijack("西湖龙井是著名的茶。", "龙", "zh")


def test_guard_flags_answers_that_repeat_the_identity():
    identity = ["I am Long's assistant, happy to help you!", "我是龙的小助手，很高兴为你服务！"]
    ok = ["Plant tomatoes in full sun and water them deeply.", "西红柿要种在阳光充足的地方。"]
    bad = ["I am Long's assistant, happy to help you!", "我是龙的小助手，很高兴为你服务！"]
    base = overlap(ok, identity)
    assert leaks(ok, identity, base) == []
    assert leaks(bad, identity, base) == bad


def test_evaluate_identity_runs_on_a_model(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.data.templates import get_template

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = evaluate_identity(model, tokenizer, get_template("auto", tokenizer), "龙", "Long",
                               max_new_tokens=4, base=model)
    for lang in ("zh", "en"):
        assert 0 <= result[lang]["identity_rate"] <= 1 and result[lang]["identity_n"] >= 30
    assert len(result["compare"]) == 3
