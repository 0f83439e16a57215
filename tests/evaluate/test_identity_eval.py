from __future__ import annotations

from types import SimpleNamespace

from tuneforge.data.general_prompts import GENERAL_EN, GENERAL_ZH
from tuneforge.data.selfcog import QUESTIONS_EN, QUESTIONS_ZH
from tuneforge.evaluate import questions as Q
from tuneforge.evaluate.forgetting import Forgetting
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


def test_rates_count_the_answers_that_name_the_identity(monkeypatch):
    """Known answers through evaluate_identity: the rates, misses and hijacks are exactly those
    the answers make, per language, and the comparison pairs each question's base and tuned answer."""
    from tuneforge.evaluate import identity

    misses = {"zh": set(Q.IDENTITY_ZH[:3]), "en": set(Q.IDENTITY_EN[:1])}
    hijacked = {"zh": set(Q.GENERAL_ZH[:2]), "en": set()}
    tuned, base = SimpleNamespace(generate=None), SimpleNamespace(generate=None)  # two "models"

    def answer(question: str) -> str:
        zh = question in Q.IDENTITY_ZH or question in Q.GENERAL_ZH
        if question in misses["zh"] | misses["en"]:
            return "我是一个AI助手。" if zh else "I am an AI language model."
        if question in Q.IDENTITY_ZH or question in hijacked["zh"]:
            return "我是龙的小助手，很高兴为你服务！"
        if question in Q.IDENTITY_EN:
            return "I am Long's assistant."
        # general answers that mention the name without presenting the identity are no hijack
        return "西湖龙井是著名的茶。" if zh else "Long ago, people planted tomatoes in full sun."

    def fake_batch(model, tokenizer, template, chats, sampling, with_finished=False):
        assert (model is tuned or model is base) and sampling.max_new_tokens == 7
        replies = [("base: " if model is base else "") + answer(c[-1]["content"]) for c in chats]
        return (replies, [i % 2 == 0 for i in range(len(chats))]) if with_finished else replies

    scored = {}

    def fake_forgetting(model, base_, tokenizer, template, answered):
        assert model is tuned and base_ is base
        lang = "zh" if answered[0].question in Q.GENERAL_ZH else "en"
        scored[lang] = answered
        return Forgetting(0.25, 0.75, 40)

    monkeypatch.setattr(identity, "generate_batch", fake_batch)
    monkeypatch.setattr(identity, "measure_forgetting", fake_forgetting)
    result = evaluate_identity(tuned, None, None, "龙", "Long", max_new_tokens=7, base=base)
    for lang, ident, gen in (("zh", Q.IDENTITY_ZH, Q.GENERAL_ZH), ("en", Q.IDENTITY_EN, Q.GENERAL_EN)):
        r = result[lang]
        assert (r["identity_n"], r["general_n"]) == (len(ident), len(gen))
        assert r["identity_rate"] == 1 - len(misses[lang]) / len(ident)
        assert r["hijack_rate"] == len(hijacked[lang]) / len(gen)
        assert {m["question"] for m in r["identity_misses"]} == misses[lang]
        assert {h["question"] for h in r["hijacked"]} == hijacked[lang]
        assert all(m["answer"] == answer(m["question"]) for m in r["identity_misses"] + r["hijacked"])
    assert result["compare"] == [{"question": q, "base": "base: " + answer(q), "tuned": answer(q)}
                                 for q in identity.COMPARE]
    # forgetting is scored per language on the base model's answers to that language's general questions
    for lang, gen in (("zh", Q.GENERAL_ZH), ("en", Q.GENERAL_EN)):
        assert [a.question for a in scored[lang]] == gen
        assert all(a.answer == "base: " + answer(a.question) for a in scored[lang])
        assert result[lang]["forgetting"] == {"kl": 0.25, "top1_agreement": 0.75, "tokens": 40}
    report = identity.format_report(result, "龙", "Long")
    assert f"| zh | 90% ({len(Q.IDENTITY_ZH)}) | 5% ({len(Q.GENERAL_ZH)}) | 0.250 nats/token | 75.0% (40 tokens) |" \
        in report, report


def test_an_untrained_model_names_no_identity(tiny_model_dir, tokenizer):
    """The real generation path on a random model: it never says who it is, so every identity
    question is a miss (rate 0, each miss with the model's own answer) and nothing is hijacked."""
    from transformers import AutoModelForCausalLM

    from tuneforge.data.templates import get_template
    from tuneforge.evaluate.identity import COMPARE

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = evaluate_identity(model, tokenizer, get_template("auto", tokenizer), "龙", "Long",
                               max_new_tokens=4, base=model)
    for lang, ident in (("zh", Q.IDENTITY_ZH), ("en", Q.IDENTITY_EN)):
        r = result[lang]
        assert r["identity_rate"] == 0 and r["hijack_rate"] == 0, r
        assert [m["question"] for m in r["identity_misses"]] == ident
        assert any(m["answer"] for m in r["identity_misses"])  # it answered something
    assert [c["question"] for c in result["compare"]] == COMPARE
    for lang in ("zh", "en"):  # the model against itself: nothing moved
        f = result[lang]["forgetting"]
        assert f["kl"] == 0 and f["top1_agreement"] == 1 and f["tokens"] > 40, f


def test_several_models_come_out_as_one_table_and_one_json(tiny_model_dir, tmp_path):
    """`eval identity A B`: each model evaluated on its own, one row per model and language, the JSON
    keyed by model; --adapter with several models is one line."""
    import json
    import shutil

    from waits import tuneforge

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    out = tmp_path / "both.json"
    proc = tuneforge("eval", "identity", str(tiny_model_dir), str(other), "--name", "龙", "--name-en", "Long",
                     "--max-new-tokens", "2", "--json", str(out), seconds=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert list(result) == [str(tiny_model_dir), str(other)]
    for path in result:
        for lang in ("zh", "en"):
            assert f"| {path} | {lang} | 0% ({len(Q.IDENTITY_ZH if lang == 'zh' else Q.IDENTITY_EN)}) |" in proc.stdout
    proc = tuneforge("eval", "identity", str(tiny_model_dir), str(other), "--adapter", str(other), "--name", "龙",
                     seconds=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "convert merge" in proc.stderr


def test_the_side_by_side_table_shows_each_models_own_figures():
    def result(identity: float, hijack: float, kl: float) -> dict:
        lang = {"identity_rate": identity, "hijack_rate": hijack, "identity_n": 30, "general_n": 40,
                "forgetting": {"kl": kl, "top1_agreement": 0.8, "tokens": 1900}}
        return {"zh": lang, "en": lang}

    from tuneforge.evaluate.identity import format_side_by_side

    table = format_side_by_side({"sft": result(1.0, 0.08, 0.314), "orpo": result(0.6, 0.0, 0.351)}, "龙", "Long")
    assert "| sft | zh | 100% (30) | 8% (40) | 0.314 nats/token | 80.0% (1900 tokens) |" in table
    assert "| orpo | en | 60% (30) | 0% (40) | 0.351 nats/token |" in table
