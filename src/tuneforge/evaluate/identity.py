"""`tuneforge eval identity`: is the new identity named where asked, and only there?

- identity rate: held-out identity questions whose answer names the assistant's NAME;
- hijack rate: held-out general questions whose answer presents the identity (the name together
  with the word assistant/助手) instead of answering.
Both per language, greedy decoding. The questions (evaluate/questions.py) are disjoint from the
self-cognition generator's and from the replay prompts. Given the base model too, also how far the
tuned model moved from it on the general questions (evaluate/forgetting.py: KL and top-1 agreement
on the base model's own answers), and a few base and tuned answers side by side.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.templates import Template
from tuneforge.evaluate import questions as Q
from tuneforge.evaluate.forgetting import Answered, base_of, measure_forgetting
from tuneforge.models.generate import Sampling, generate_batch

COMPARE = [Q.GENERAL_ZH[0], Q.GENERAL_EN[0], Q.GENERAL_EN[2]]


def names_identity(answer: str, name: str, lang: str) -> bool:
    if lang == "en" and name.isascii():
        return re.search(rf"\b{re.escape(name)}\b", answer) is not None
    return name in answer


def is_hijack(answer: str, name: str, lang: str) -> bool:
    word = "助手" if lang == "zh" else "assistant"
    return names_identity(answer, name, lang) and word in answer.lower()


@dataclass
class LanguageResult:
    identity_rate: float
    hijack_rate: float
    identity_n: int
    general_n: int
    identity_misses: list[dict[str, str]] = field(default_factory=list)
    hijacked: list[dict[str, str]] = field(default_factory=list)


def _ask(model: Any, tokenizer: Any, template: Template, questions: list[str], max_new_tokens: int,
         with_finished: bool = False) -> Any:
    chats = [[{"role": "user", "content": q}] for q in questions]
    return generate_batch(model, tokenizer, template, chats, Sampling(max_new_tokens=max_new_tokens),
                          with_finished=with_finished)


def _against_base(model: Any, tokenizer: Any, template: Template, base: Any, sets: dict, answers: dict,
                  max_new_tokens: int, result: dict[str, Any]) -> None:
    """The base model answers the general questions; the tuned model is scored on those answers
    (forgetting, per language) and a few are shown next to the tuned model's."""
    base_model, off = base_of(model, base)
    general = [q for _, gen, _ in sets.values() for q in gen]
    with off():
        before, finished = _ask(base_model, tokenizer, template, general, max_new_tokens, with_finished=True)
    by_question = {q: Answered(q, b, f) for q, b, f in zip(general, before, finished, strict=True)}
    for lang, (_, gen, _) in sets.items():
        result[lang]["forgetting"] = asdict(measure_forgetting(model, base, tokenizer, template,
                                                               [by_question[q] for q in gen]))
    result["compare"] = [{"question": q, "base": by_question[q].answer, "tuned": answers[q]} for q in COMPARE]


def evaluate_identity(model: Any, tokenizer: Any, template: Template, name: str, name_en: str | None = None,
                      max_new_tokens: int = 48, base: Any = None) -> dict[str, Any]:
    """Rates per language, plus forgetting and base-vs-tuned answers when BASE (a model or a
    context manager factory that switches the adapter off) is given."""
    name_en = name_en or name
    sets = {"zh": (Q.IDENTITY_ZH, Q.GENERAL_ZH, name), "en": (Q.IDENTITY_EN, Q.GENERAL_EN, name_en)}
    all_q = [q for ident, gen, _ in sets.values() for q in ident + gen]
    answers = dict(zip(all_q, _ask(model, tokenizer, template, all_q, max_new_tokens), strict=True))
    result: dict[str, Any] = {}
    for lang, (ident, gen, nm) in sets.items():
        misses = [{"question": q, "answer": answers[q]} for q in ident if not names_identity(answers[q], nm, lang)]
        hijacked = [{"question": q, "answer": answers[q]} for q in gen if is_hijack(answers[q], nm, lang)]
        result[lang] = asdict(LanguageResult(1 - len(misses) / len(ident), len(hijacked) / len(gen),
                                             len(ident), len(gen), misses, hijacked))
    if base is not None:
        _against_base(model, tokenizer, template, base, sets, answers, max_new_tokens, result)
    return result


def _title(name: str, name_en: str | None) -> str:
    return f"identity: {name}" + (f" / {name_en}" if name_en and name_en != name else "")


def _head(first: str, forgetting: bool) -> list[str]:
    """The table's header and rule: FIRST, the leading columns ('| language |'), then the figures'."""
    head = first + " identity named (held-out) | general questions hijacked |"
    rule = "|---" * (first.count("|") - 1) + "|---|---|"
    return [head + (" KL from base (general) | top-1 agreement |" if forgetting else ""),
            rule + ("---|---|" if forgetting else "")]


def _cells(r: dict[str, Any], forgetting: bool) -> str:
    """One language's figures as table cells, after its leading columns."""
    row = f" {r['identity_rate']:.0%} ({r['identity_n']}) | {r['hijack_rate']:.0%} ({r['general_n']}) |"
    if forgetting:
        f = r["forgetting"]
        row += f" {f['kl']:.3f} nats/token | {f['top1_agreement']:.1%} ({f['tokens']} tokens) |"
    return row


def format_report(result: dict[str, Any], name: str, name_en: str | None) -> str:
    forgetting = "forgetting" in result["zh"]
    lines = [_title(name, name_en), "", *_head("| language |", forgetting)]
    lines += [f"| {lang} |" + _cells(result[lang], forgetting) for lang in ("zh", "en")]
    if forgetting:
        lines += ["", "KL and agreement: the tuned model against the base on the base model's own answers "
                      "to the general questions (0 and 100% = nothing moved)"]
    for lang in ("zh", "en"):
        for m in result[lang]["identity_misses"][:3]:
            lines.append(f"  miss [{lang}] {m['question']} -> {m['answer'][:80]!r}")
        for h in result[lang]["hijacked"][:3]:
            lines.append(f"  hijack [{lang}] {h['question']} -> {h['answer'][:80]!r}")
    for c in result.get("compare", []):
        lines += ["", f"Q: {c['question']}", f"  base:  {c['base'][:160]!r}", f"  tuned: {c['tuned'][:160]!r}"]
    return "\n".join(lines)


def format_side_by_side(results: dict[str, dict[str, Any]], name: str, name_en: str | None) -> str:
    """Several models' reports as one table (one row per model and language), e.g. two recipes."""
    forgetting = all("forgetting" in r["zh"] for r in results.values())
    lines = [_title(name, name_en), "", *_head("| model | language |", forgetting)]
    lines += [f"| {label} | {lang} |" + _cells(result[lang], forgetting)
              for label, result in results.items() for lang in ("zh", "en")]
    return "\n".join(lines)


def save_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
