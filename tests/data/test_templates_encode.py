"""The labelled tokens are exactly the assistant answers plus their end-of-turn markers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.data.encode import IGNORE, encode
from tuneforge.data.formats import Message
from tuneforge.data.templates import (
    NAMED_TEMPLATES,
    get_template,
    load_template,
    render,
    save_template,
    split_for_training,
    stop_token_ids,
)
from tuneforge.errors import UserError

END = {"auto": "<|im_end|>", "internlm2_chat": "<|im_end|>", "qwen_chat": "<|im_end|>",
       "chatml": "<|im_end|>", "llama3_chat": "<|eot_id|>", "default": "<|im_end|>"}  # default: eos
TEMPLATES = ["auto", *NAMED_TEMPLATES]

text = st.text(alphabet=st.sampled_from(list("abc xyz龙的助手?!.,\n")), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s)


def labelled_text(tokenizer, enc) -> str:
    return tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE])


@pytest.mark.parametrize("name", TEMPLATES)
def test_split_keeps_the_whole_rendering(tokenizer, name):
    t = get_template(name, tokenizer)
    msgs = [Message("system", "S"), Message("user", "q1"), Message("assistant", "a1"),
            Message("user", "q2"), Message("assistant", "a2")]
    segments = split_for_training(t, tokenizer, msgs)
    assert "".join(s for s, _ in segments) == render(t, tokenizer, msgs, add_generation_prompt=False)
    assert [s for s, trained in segments if trained] == [f"a1{END[name]}", f"a2{END[name]}"]


@pytest.mark.parametrize("name", TEMPLATES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(text, text, st.booleans(), st.booleans()), min_size=1, max_size=3),
       system=st.one_of(st.none(), text))
def test_labels_decode_to_exactly_the_trained_answers(tokenizer, name, turns, system):
    """Every trained answer, with its end marker unless the answer is marked truncated."""
    t = get_template(name, tokenizer)
    msgs = [Message("system", system)] if system else []
    for q, a, loss, cut in turns:
        msgs += [Message("user", q), Message("assistant", a, loss, cut)]
    enc = encode(split_for_training(t, tokenizer, msgs), tokenizer, max_length=10_000)
    expected = "".join(a + ("" if cut else END[name]) for _, a, loss, cut in turns if loss)
    assert labelled_text(tokenizer, enc) == expected
    # what chat would feed the model for the first answer is a prefix of the training tokens
    first = next(i for i, m in enumerate(msgs) if m.role == "assistant")
    prompt = render(t, tokenizer, msgs[:first], add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids


def test_truncation_is_reported(tokenizer):
    t = get_template("auto", tokenizer)
    enc = encode(split_for_training(t, tokenizer, [Message("user", "q"), Message("assistant", "a " * 100)]),
                 tokenizer, max_length=32)
    assert enc.truncated and len(enc.input_ids) == 32


def test_unknown_template_lists_the_valid_ones(tokenizer):
    with pytest.raises(UserError, match="internlm2_chat"):
        get_template("internlm2", tokenizer)


def test_template_round_trips_through_a_directory(tokenizer, tmp_path):
    t = get_template("llama3_chat", tokenizer)
    save_template(tmp_path, t)
    assert load_template(tmp_path) == t
    assert load_template(tmp_path / "missing") is None


def test_stop_ids_include_end_of_turn(tokenizer):
    ids = stop_token_ids(get_template("auto", tokenizer), tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
