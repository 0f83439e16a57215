"""The labelled tokens are exactly the assistant answers plus their end-of-turn markers."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.data.cache import EncodeSettings, encode_sample
from tuneforge.data.encode import IGNORE, encode
from tuneforge.data.formats import Message, Sample, to_messages
from tuneforge.data.templates import (
    NAMED_TEMPLATES,
    Template,
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


# A ChatML template with tool support in the manner of Qwen2.5's: tools in the system turn, calls
# as <tool_call> in the assistant turn, results as a user turn.
TOOL_JINJA = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n"
    "{% endif %}# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{% if m.role == 'system' %}"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLY = Template("tooly", TOOL_JINJA, ("<|im_end|>",))
AREA = {"name": "area", "description": "Area of a shape",
        "parameters": {"type": "object", "properties": {"side": {"type": "number"}}}}
TOOL_EXPECTED = (
    '<|im_start|>system\n# Tools\n{"type": "function", "function": {"name": "area", "description": '
    '"Area of a shape", "parameters": {"type": "object", "properties": {"side": {"type": "number"}}}}}\n'
    "<|im_end|>\n<|im_start|>user\nArea of a 7 square?<|im_end|>\n<|im_start|>assistant\n"
    '⟦<tool_call>{"name": "area", "arguments": {"side": 7}}</tool_call><|im_end|>⟧\n'
    '<|im_start|>user\n<tool_response>{"area": 49}</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n⟦It is 49.<|im_end|>⟧\n")


def marked(tokenizer, template, messages) -> str:
    return "".join(f"⟦{t}⟧" if trained else t for t, trained in split_for_training(template, tokenizer, messages))


def test_sharegpt_tool_use_trains_calls_and_answers_not_observations(tokenizer):
    """LLaMA-Factory's glaive_toolcall shape: function_call / observation turns, tools as a JSON string."""
    rec = {"conversations": [
        {"from": "human", "value": "Area of a 7 square?"},
        {"from": "function_call", "value": json.dumps({"name": "area", "arguments": {"side": 7}})},
        {"from": "observation", "value": '{"area": 49}'},
        {"from": "gpt", "value": "It is 49."}], "tools": json.dumps([AREA])}
    assert marked(tokenizer, TOOLY, to_messages(rec, "auto", "f:1")) == TOOL_EXPECTED


def test_openai_tool_calls_and_tool_messages_render_the_same(tokenizer):
    rec = {"messages": [
        {"role": "user", "content": "Area of a 7 square?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "area", "arguments": '{"side": 7}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"area": 49}'},
        {"role": "assistant", "content": "It is 49."}],
        "tools": [{"type": "function", "function": AREA}]}
    messages = to_messages(rec, "auto", "f:1")
    assert marked(tokenizer, TOOLY, messages) == TOOL_EXPECTED
    enc = encode(split_for_training(TOOLY, tokenizer, messages), tokenizer, max_length=10_000)
    assert labelled_text(tokenizer, enc) == (
        '<tool_call>{"name": "area", "arguments": {"side": 7}}</tool_call><|im_end|>It is 49.<|im_end|>')


def test_tool_use_with_a_template_without_tool_support_is_refused(tokenizer):
    rec = {"conversations": [{"from": "human", "value": "q"},
                             {"from": "function_call", "value": '{"name": "area", "arguments": {}}'},
                             {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]}
    sample = Sample(tuple(to_messages(rec, "auto", "d.jsonl:3")), "d.jsonl:3")
    with pytest.raises(UserError) as err:
        encode_sample(sample, tokenizer, EncodeSettings(get_template("auto", tokenizer), "", 1000, "auto", False))
    assert str(err.value) == (
        "d.jsonl:3: tools: prompt_template 'auto' has no tool support (its chat template never renders "
        "tools or tool calls), so tool calls and results cannot be trained as the model will see them; "
        "use a model whose chat template renders tools, or drop the tool-use records")


@pytest.mark.parametrize("turn, expected", [
    ({"from": "function_call", "value": "{not json"},
     "f:1: conversations[1].value: expected a function call (as JSON), got invalid JSON"),
    ({"from": "function_call", "value": '{"arguments": {}}'},
     'f:1: conversations[1].value: expected a function call {"name": ..., "arguments": {...}}'),
    ({"from": "function_call", "value": '{"name": "f", "arguments": [1]}'},
     "f:1: conversations[1].value.arguments: expected an object, got a list"),
])
def test_bad_function_calls_are_named(turn, expected):
    rec = {"conversations": [{"from": "human", "value": "q"}, turn, {"from": "gpt", "value": "a"}]}
    with pytest.raises(UserError) as err:
        to_messages(rec, "auto", "f:1")
    assert str(err.value).startswith(expected)
