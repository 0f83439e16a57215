from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from tuneforge.data.formats import Message, load_samples, to_messages
from tuneforge.data.templates import get_template, split_for_training
from tuneforge.errors import UserError

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def marked(tokenizer, record, fmt="auto") -> str:
    """The record rendered with the bundled model's own template, trained text between ⟦ and ⟧."""
    segments = split_for_training(get_template("auto", tokenizer), tokenizer, to_messages(record, fmt, "f:1"))
    return "".join(f"⟦{t}⟧" if trained else t for t, trained in segments)


def refusal(tmp_path, record, name="d.jsonl") -> str:
    """The one-line error for RECORD as line 2 of a file (line 1 is fine)."""
    path = write_jsonl(tmp_path / name, [{"instruction": "ok", "output": "ok"}, record])
    with pytest.raises(UserError) as err:
        load_samples(path)
    message = str(err.value)
    assert "\n" not in message
    return message.replace(str(tmp_path) + "/", "")


def test_conversation_format_multi_turn_with_system_and_loss_flag():
    rec = {"conversation": [
        {"system": "S", "input": "q1", "output": "a1", "output_with_loss": False},
        {"input": "q2", "output": "a2"}]}
    assert to_messages(rec, "auto", "f:1") == [
        Message("system", "S"), Message("user", "q1"), Message("assistant", "a1", False),
        Message("user", "q2"), Message("assistant", "a2")]


def test_alpaca_joins_instruction_and_input_and_keeps_history():
    rec = {"instruction": "Translate", "input": "hi", "output": "你好", "system": "S",
           "history": [["q0", "a0"]]}
    assert to_messages(rec, "auto", "f:1") == [
        Message("system", "S"), Message("user", "q0"), Message("assistant", "a0"),
        Message("user", "Translate\nhi"), Message("assistant", "你好")]


def test_openai_messages_and_sharegpt():
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "loss": False}]}
    assert to_messages(rec, "auto", "f:1")[1] == Message("assistant", "a", False)
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert to_messages(rec, "auto", "f:1") == [Message("user", "q"), Message("assistant", "a")]


@pytest.mark.parametrize("line, expected", [
    ('{"conversation": [{"input": "q", "output": "a"}', "f.jsonl:2: invalid JSON"),
    ('{"conversation": [{"input": {"text": "q"}, "output": "a"}]}',
     "f.jsonl:2: conversation[0].input: expected a string, got an object with keys 'text'; "
     'write the text itself: "input": "q"'),
    ('{"conversation": [{"input": {"role": "user", "content": "q"}, "output": "a"}]}',
     "conversation[0].input: expected a string, got an object with keys 'role', 'content'; "
     'write the text itself as a string: "input": "..."'),
    ('{"conversation": [{"input": "q", "output": "  "}]}', "f.jsonl:2: conversation[0].output: empty answer"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "f.jsonl:2: messages[0].role: unknown role 'bot'"),
    ('{"question": "q"}', "f.jsonl:2: unknown record format"),
])
def test_bad_lines_are_named_by_file_line_and_field(tmp_path, line, expected):
    path = tmp_path / "f.jsonl"
    path.write_text('{"conversation": [{"input": "ok", "output": "ok"}]}\n' + line + "\n")
    with pytest.raises(UserError) as err:
        load_samples(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_json_list_file_and_blank_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "q", "output": "a"}]')
    assert len(load_samples(path)) == 1
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    path.write_text(path.read_text() + "\n\n")
    assert [s.where for s in load_samples(path)] == [f"{path}:1", f"{path}:2"]


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_samples(tmp_path / "e.jsonl")


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    """What datasets.load_dataset('json') accepts: a .json file with one object per line."""
    path = write_jsonl(tmp_path / "assistant.json", [{"instruction": "q1", "output": "a1"},
                                                     {"instruction": "q2", "output": "a2"}])
    samples = load_samples(path)
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:2"]
    assert samples[1].messages == (Message("user", "q2"), Message("assistant", "a2"))
    path.write_text(path.read_text() + '{"instruction": "q3"\n')
    with pytest.raises(UserError, match=r"assistant\.json:3: invalid JSON"):
        load_samples(path)
    bad: list[str] = []
    assert len(load_samples(path, bad=bad)) == 2 and bad[0].startswith(f"{path}:3: invalid JSON")


def test_json_list_still_read_as_a_list_and_a_spread_object_is_named(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n  [\n {"instruction": "q", "output": "a"},\n {"instruction": "q2", "output": "b"}]\n')
    assert [s.where for s in load_samples(path)] == [f"{path}:[0]", f"{path}:[1]"]
    path.write_text('{\n  "instruction": "q",\n  "output": "a"\n}\n')
    with pytest.raises(UserError) as err:
        load_samples(path)
    assert str(err.value) == (f"{path}: one JSON object over several lines; expected a JSON list of "
                              "records, or one JSON object per line")


def test_openai_content_parts_are_joined_by_newline_and_trained_as_text(tokenizer):
    rec = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "who are you?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "I am"}, {"type": "text", "text": "Tuney."}]}]}
    assert marked(tokenizer, rec) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nwho are you?<|im_end|>\n"
        "<|im_start|>assistant\n⟦I am\nTuney.<|im_end|>⟧\n")


@pytest.mark.parametrize("part, expected", [
    ({"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
     "d.jsonl:2: messages[0].content[1]: image parts need a vision model; tuneforge trains text-only "
     "models (remove the part, or the record)"),
    ({"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}},
     "d.jsonl:2: messages[0].content[1]: audio parts need an audio model; tuneforge trains text-only "
     "models (remove the part, or the record)"),
    ({"type": "emoji", "text": ":)"},
     "d.jsonl:2: messages[0].content[1]: unknown content part 'emoji'; expected "
     '{"type": "text", "text": "..."}'),
    ({"type": "text", "text": 3}, "d.jsonl:2: messages[0].content[1].text: expected a string, got int"),
])
def test_openai_content_parts_that_are_not_text_are_refused(tmp_path, part, expected):
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
                        {"role": "assistant", "content": "A cat."}]}
    assert refusal(tmp_path, rec) == expected


def test_ms_swift_query_response_history_system_is_a_conversation(tokenizer):
    """ms-swift's record shape (its self-cognition set): every answer trained, history first."""
    rec = {"query": "你是谁？", "response": "我是小助手。", "system": "S",
           "history": [["hi", "hello"], ["who made you?", "Long."]], "tag": "zh"}
    assert to_messages(rec, "auto", "f:1") == [
        Message("system", "S"), Message("user", "hi"), Message("assistant", "hello"),
        Message("user", "who made you?"), Message("assistant", "Long."),
        Message("user", "你是谁？"), Message("assistant", "我是小助手。")]
    assert marked(tokenizer, rec) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "⟦hello<|im_end|>⟧\n<|im_start|>user\nwho made you?<|im_end|>\n<|im_start|>assistant\n"
        "⟦Long.<|im_end|>⟧\n<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n⟦我是小助手。<|im_end|>⟧\n")
    assert marked(tokenizer, {"query": "q", "response": "a"}, fmt="swift") == (
        SMOL_SYSTEM + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n⟦a<|im_end|>⟧\n")


@pytest.mark.parametrize("rec, expected", [
    ({"query": "q", "response": " "}, "d.jsonl:2: response: empty answer; remove the line or write the answer"),
    ({"query": "q", "response": "a", "history": [["q0"]]},
     "d.jsonl:2: history[0]: expected [question, answer] strings"),
    ({"query": ["q"], "response": "a"}, "d.jsonl:2: query: expected a string, got a list"),
])
def test_ms_swift_bad_records_are_named(tmp_path, rec, expected):
    assert refusal(tmp_path, rec) == expected


KTO_REFUSAL = ("d.json:[1]: label: a KTO record (each answer labelled good or bad); tuneforge has no KTO "
               "training (DPO, ORPO, SimPO train on pairs), and a label: false answer would be learned as a good one; "
               "to train the good answers as plain examples, drop the label: false records and the "
               "label field")


@pytest.mark.parametrize("label", [True, False])
def test_kto_records_with_a_label_are_refused(tmp_path, label):
    """LLaMA-Factory's KTO shape: messages (or ShareGPT/alpaca) plus "label": true|false."""
    rec = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
           "label": label}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "ok"}, rec], indent=2))
    with pytest.raises(UserError) as err:
        load_samples(path)
    assert str(err.value).replace(str(tmp_path) + "/", "") == KTO_REFUSAL
    with pytest.raises(UserError, match="KTO"):  # a named format is checked too
        to_messages(rec, "messages", "f:1")
    alpaca = {"instruction": "2+2?", "output": "5", "kto_tag": False}
    assert refusal(tmp_path, alpaca).startswith("d.jsonl:2: kto_tag: a KTO record")
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "label": False}
    assert refusal(tmp_path, sharegpt).startswith("d.jsonl:2: label: a KTO record")
    assert to_messages({"instruction": "q", "output": "a", "label": "sports"}, "auto", "f:1")[1] == \
        Message("assistant", "a")  # a label that is not true/false is just another column


def test_multimodal_records_are_refused_not_trained_as_literal_placeholders(tmp_path):
    """LLaMA-Factory's mllm_demo shape: messages with <image> in the text, plus an images list."""
    rec = {"messages": [{"role": "user", "content": "<image>Who is this?"},
                        {"role": "assistant", "content": "A football player."}],
           "images": ["demo/1.jpg"]}
    assert refusal(tmp_path, rec) == (
        "d.jsonl:2: images: a multimodal record (1 image); tuneforge trains text-only models, and the "
        "<image> placeholders would be learned as literal text; remove the record, or its images and "
        "<image> placeholders")
    rec = {"query": "<video><video>same?", "response": "yes", "videos": ["a.mp4", "b.mp4"]}
    assert refusal(tmp_path, rec).startswith("d.jsonl:2: videos: a multimodal record (2 videos);")
    assert len(load_samples(write_jsonl(tmp_path / "e.jsonl", [{**rec, "videos": []}]))) == 1
