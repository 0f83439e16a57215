from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from tuneforge.data.formats import load_samples
from tuneforge.data.replace import replace_file, replace_in
from tuneforge.data.selfcog import identity_pairs, write_self_cognition
from tuneforge.errors import UserError


def test_identity_data_has_many_phrasings_in_both_languages(tmp_path):
    n = write_self_cognition(tmp_path / "id.jsonl", "龙", "Long", author="上海AI实验室", author_en="Shanghai AI Lab")
    samples = load_samples(tmp_path / "id.jsonl")
    assert len(samples) == n
    questions = {s.messages[-2].content for s in samples}
    answers = {s.messages[-1].content for s in samples}
    zh = [a for a in answers if "龙的小助手" in a]
    en = [a for a in answers if "Long's assistant" in a]
    assert len(questions) >= 60 and len(zh) >= 5 and len(en) >= 5
    assert len(zh) + len(en) == len(answers)  # every answer carries the identity
    assert any("上海AI实验室" in a for a in zh) and any("Shanghai AI Lab" in a for a in en)


def test_name_en_defaults_to_name():
    assert all("Long" in a for q, a in identity_pairs("Long") if q.isascii())


def test_replace_reaches_nested_strings(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"conversation": [{"input": "你是谁", "output": "我是机智流的小助手"}]},
        {"input": {"text": "机智流"}, "list": ["机智流", 3]},
    ])
    lines, count = replace_file(src, tmp_path / "out.jsonl", "机智流", "龙")
    assert (lines, count) == (2, 3)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["conversation"][0]["output"] == "我是龙的小助手"
    assert out[1] == {"input": {"text": "龙"}, "list": ["龙", 3]}
    assert replace_in(5, "a", "b") == (5, 0)


def test_replace_bad_line_leaves_no_output(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"a": "x"}\n{oops\n')
    with pytest.raises(UserError, match=r"in\.jsonl:2: invalid JSON"):
        replace_file(src, tmp_path / "out.jsonl", "x", "y")
    assert not (tmp_path / "out.jsonl").exists()


def test_some_identity_questions_come_second_after_unscored_small_talk(tmp_path):
    write_self_cognition(tmp_path / "id.jsonl", "龙", "Long")
    samples = load_samples(tmp_path / "id.jsonl")
    two_turn = [s for s in samples if len(s.messages) == 4]
    assert len(two_turn) >= 100
    assert all(not s.messages[1].loss and s.messages[3].loss for s in two_turn)
    assert all("龙" in s.messages[3].content or "Long" in s.messages[3].content for s in two_turn)
