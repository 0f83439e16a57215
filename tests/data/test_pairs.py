"""Preference pairs: every peer format is read, a bad line names FILE:LINE, and the encoded pair
trains exactly the two answers (with their end markers) after a prompt they share token for token."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.config.load import build_config
from tuneforge.data.batching import collate, pairs_in
from tuneforge.data.cache import EncodeSettings, encode_pair, with_system
from tuneforge.data.dataset import build_pair_rows
from tuneforge.data.encode import IGNORE
from tuneforge.data.pairs import Pair, detect_pair_format, iter_pairs, to_pair
from tuneforge.data.templates import get_template, render
from tuneforge.errors import UserError

# Excerpts of peers' own demo files (answers cut to their first sentence), to read what users bring:
# LLaMA-Factory data/dpo_en_demo.json (hiyouga/LLaMA-Factory @ 3075df15, records 1 and 5: ShareGPT
# turns, chosen/rejected as {"from": "gpt", "value"} objects, a system turn, a multi-turn prompt).
LLAMAFACTORY_SHAREGPT = [
    {"conversations": [{"from": "human", "value": "How can I best prepare for a job interview?"}],
     "chosen": {"from": "gpt", "value": "Preparing for a job interview requires a combination of research, "
                                        "practice, and self-reflection."},
     "rejected": {"from": "gpt", "value": "Here are some tips to help you prepare for a job interview:"}},
    {"conversations": [
        {"from": "system", "value": "You are a teacher. Given a task, you explain in simple steps what the task "
                                    "is asking."},
        {"from": "human", "value": "Who wrote the classic novel \"Pride and Prejudice\", published in 1813?"},
        {"from": "gpt", "value": "Jane Austen"},
        {"from": "human", "value": "Elaborate on the societal norms and values depicted in it."}],
     "chosen": {"from": "gpt", "value": "\"Pride and Prejudice\" provides a vivid portrayal of early "
                                        "19th-century English society."},
     "rejected": {"from": "gpt", "value": "Sure, I'd be happy to help!"}},
]
# The shapes of the other peers' documented formats (their docs' field names; our own texts).
OTHERS = {
    "llamafactory": {"instruction": "Say hello", "input": "in French", "chosen": "Bonjour !", "rejected": "Hello!",
                     "system": "Be brief.", "history": [["Hi", "Hi there."]]},
    "llamafactory-messages": {"messages": [{"role": "user", "content": "2+2?"}],
                              "chosen": {"role": "assistant", "content": "4"},
                              "rejected": {"role": "assistant", "content": "5"}},
    "trl": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "trl-conversational": {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                           "chosen": [{"role": "assistant", "content": "It is blue."}],
                           "rejected": [{"role": "assistant", "content": "It is green."}]},
    "trl-implicit": {"chosen": [{"role": "user", "content": "What color is the sky?"},
                                {"role": "assistant", "content": "It is blue."}],
                     "rejected": [{"role": "user", "content": "What color is the sky?"},
                                  {"role": "assistant", "content": "It is green."}]},
    "swift": {"messages": [{"role": "system", "content": "You are helpful."},
                           {"role": "user", "content": "Who are you?"},
                           {"role": "assistant", "content": "I am Long's assistant."}],
              "rejected_response": "I am ChatGPT."},
    "swift-query": {"query": "Who are you?", "response": "I am Long's assistant.", "rejected_response": "I am Qwen."},
    "xtuner": {"chosen_conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello!"},
                                        {"from": "human", "value": "who are you"},
                                        {"from": "gpt", "value": "Long's assistant."}],
               "rejected_conversations": [{"from": "human", "value": "who are you"},
                                          {"from": "gpt", "value": "An AI by OpenAI."}]},
}


def _last_answers(pair: Pair) -> tuple[str, str]:
    return pair.chosen[-1].content, pair.rejected[-1].content


def test_llamafactory_demo_records(tmp_path):
    path = tmp_path / "dpo_en_demo.json"
    path.write_text(json.dumps(LLAMAFACTORY_SHAREGPT, indent=2))
    pairs = list(iter_pairs(path))
    assert [detect_pair_format(r, "x") for r in LLAMAFACTORY_SHAREGPT] == ["llamafactory-sharegpt"] * 2
    assert _last_answers(pairs[0]) == (LLAMAFACTORY_SHAREGPT[0]["chosen"]["value"],
                                       LLAMAFACTORY_SHAREGPT[0]["rejected"]["value"])
    multi = pairs[1]
    assert [m.role for m in multi.chosen] == ["system", "user", "assistant", "user", "assistant"]
    assert multi.chosen[:-1] == multi.rejected[:-1]
    assert multi.chosen[2].loss is False and multi.chosen[-1].loss is True  # history answers: context
    assert pairs[1].where.endswith("dpo_en_demo.json:[1]")


@pytest.mark.parametrize("fmt", list(OTHERS))
def test_every_format_is_detected_and_read(fmt):
    record = OTHERS[fmt]
    assert detect_pair_format(record, "f:1") == fmt
    pair = to_pair(record, "f:1")
    trained = [[m.content for m in side if m.role == "assistant" and m.loss] for side in (pair.chosen, pair.rejected)]
    assert len(trained[0]) == len(trained[1]) == 1  # only the last answer of each side is learned
    assert trained[0] != trained[1]
    assert pair.chosen[-1].role == pair.rejected[-1].role == "assistant"


def test_each_format_keeps_its_prompt():
    assert [m.content for m in to_pair(OTHERS["llamafactory"], "f:1").chosen] == \
        ["Be brief.", "Hi", "Hi there.", "Say hello\nin French", "Bonjour !"]
    assert [m.content for m in to_pair(OTHERS["trl-implicit"], "f:1").rejected] == \
        ["What color is the sky?", "It is green."]
    x = to_pair(OTHERS["xtuner"], "f:1")  # XTuner's two sides may have different prompts
    assert len(x.chosen) == 4 and len(x.rejected) == 2


BAD = [
    ({"prompt": "q", "chosen": "a"}, "f.jsonl:2: rejected: missing"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "f.jsonl:2: rejected: empty answer"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "f.jsonl:2: rejected: expected a string, got int"),
    ({"instruction": "q", "output": "a"}, "f.jsonl:2: not a preference pair .*objective='sft'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "f.jsonl:2: chosen.from: expected the assistant's answer"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "f.jsonl:2: chosen and rejected are the same"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}], "rejected_response": "b"},
     "f.jsonl:2: messages: expected the answer last"),
    ({"messages": [{"role": "user", "content": "q"}], "rejected_response": "b"},
     "f.jsonl:2: messages: no assistant message"),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_a_bad_line_names_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "f.jsonl", [OTHERS["trl"], record])
    with pytest.raises(UserError, match=message.replace("f.jsonl", ".*f.jsonl")):
        list(iter_pairs(path))
    bad: list[str] = []
    assert len(list(iter_pairs(path, bad=bad))) == 1 and len(bad) == 1  # skip_bad_lines


def test_a_bad_pair_line_stops_training_setup_with_file_and_line(tmp_path, tokenizer, bundled_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [OTHERS["trl"], OTHERS["swift"], {"prompt": "q", "chosen": "a"}])
    cfg = build_config(dict(pretrained_model_name_or_path=str(bundled_path), data_files=str(path), objective="dpo"))
    with pytest.raises(UserError, match=r"pairs.jsonl:3: rejected: missing"):
        build_pair_rows(cfg, tokenizer, get_template("auto", tokenizer), use_cache=False)


text = st.text(alphabet=st.sampled_from(list("abc xyz龙的助手?!.,\n")), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s)


def _settings(tokenizer, max_length=10_000, system=""):
    return EncodeSettings(get_template("auto", tokenizer), system, max_length, "auto", False, pairs=True)


def _trained(tokenizer, enc) -> str:
    return tokenizer.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(st.tuples(text, text), max_size=2), question=text, chosen=text, rejected=text,
       system=st.one_of(st.just(""), text))
def test_a_pair_trains_exactly_its_two_answers_after_a_shared_prompt(tokenizer, history, question, chosen,
                                                                     rejected, system):
    if chosen == rejected:
        return
    record = {"instruction": question, "chosen": chosen, "rejected": rejected, "history": [list(h) for h in history]}
    pair = to_pair(record, "f:1")
    c, r = encode_pair(pair, tokenizer, _settings(tokenizer, system=system))
    assert _trained(tokenizer, c) == chosen + "<|im_end|>"
    assert _trained(tokenizer, r) == rejected + "<|im_end|>"
    first_c = next(i for i, lab in enumerate(c.labels) if lab != IGNORE)
    first_r = next(i for i, lab in enumerate(r.labels) if lab != IGNORE)
    assert first_c == first_r and c.input_ids[:first_c] == r.input_ids[:first_r]  # the prompt, token for token
    # and that prompt is what chat feeds the model before it answers
    prompt = render(get_template("auto", tokenizer), tokenizer, with_system(pair.chosen[:-1], system),
                    add_generation_prompt=True)
    assert tokenizer.decode(c.input_ids[:first_c]) == prompt


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers=st.lists(st.tuples(text, text), min_size=1, max_size=5), max_length=st.integers(48, 160))
def test_packed_pairs_keep_sides_apart_and_fit(tokenizer, answers, max_length):
    """In a packed row every pair keeps both sides whole, the sequence numbers say which side a token
    is on, labels stay on answers only, and a long pair is cut to fit max_length together."""
    answers = [(c * 4, r * 4 + "!") for c, r in answers]
    sides = [encode_pair(to_pair({"prompt": "q", "chosen": c, "rejected": r}, "f:1"), tokenizer,
                         _settings(tokenizer, max_length)) for c, r in answers]
    for c, r in sides:
        assert len(c.input_ids) + len(r.input_ids) <= max_length
        if not (c.truncated or r.truncated):
            assert c.n_trained > 0 and r.n_trained > 0
    from tuneforge.data.pack import assemble_pairs

    row = assemble_pairs([e for pair in sides for e in pair])
    batch = collate([row, row], tokenizer.pad_token_id)
    seq, labels = batch["sequence_ids"], batch["labels"]
    assert pairs_in([row, row]) == 2 * len(answers)
    assert int(seq.max()) == 4 * len(answers) - 1  # the second row's sequences follow on
    for k, e in enumerate(e for pair in sides for e in pair):
        mine = seq[0] == k
        assert labels[0][mine].tolist() == e.labels and batch["input_ids"][0][mine].tolist() == e.input_ids
        assert batch["position_ids"][0][mine].tolist() == list(range(len(e.input_ids)))  # its own sample
    assert ((labels != IGNORE) <= (seq >= 0)).all()  # padding trains nothing


@pytest.mark.parametrize("record", [OTHERS["swift"], LLAMAFACTORY_SHAREGPT[0], OTHERS["trl"], OTHERS["xtuner"]])
def test_sft_refuses_a_pair_record_rather_than_learning_a_side(record):
    from tuneforge.data.formats import to_messages

    with pytest.raises(UserError, match=r"f:1: rejected\w*: a preference pair .*objective='dpo'"):
        to_messages(record, "auto", "f:1")


def test_check_dataset_reports_pairs_formats_bad_lines_and_both_sides(tmp_path, tokenizer, bundled_path):
    """check-dataset on a preference config: each file's pair format, the bad line by FILE:LINE,
    pairs counted as pairs, and the first pair's chosen and rejected answers marked as trained."""
    from tuneforge.data.inspect import check_dataset

    path = write_jsonl(tmp_path / "pairs.jsonl", [OTHERS["trl"], OTHERS["swift"], {"prompt": "q", "chosen": "a"},
                                                  OTHERS["trl-conversational"]])
    cfg = build_config(dict(pretrained_model_name_or_path=str(bundled_path), data_files=str(path), objective="dpo"))
    report, bad = check_dataset(cfg, tokenizer, get_template("auto", tokenizer))
    assert bad == 1, report
    assert "pairs.jsonl:3: rejected: missing" in report
    assert "pairs 3, bad lines 1" in report and "pairs: 3 usable (objective dpo)" in report, report
    assert "trl 2, swift 1, trl-conversational 1; pairs 3, bad lines 1" in report, report
    chosen, rejected = report.split("first pair (")[1:]
    assert chosen.startswith(f"{path}:1), chosen") and chosen.rstrip().endswith("<|im_start|>assistant\n⟦ blue.<|im_end|>⟧")
    assert rejected.startswith(f"{path}:1), rejected") and rejected.rstrip().endswith("⟦ green.<|im_end|>⟧")
    assert chosen.count("⟦") == rejected.count("⟦") == 2  # the header's and the answer's: the prompt is context


def test_log_dataset_shows_each_pairs_two_sides_as_trained(tmp_path, tokenizer, bundled_path):
    from tuneforge.data.inspect import log_dataset

    path = write_jsonl(tmp_path / "pairs.jsonl", [OTHERS["trl"], OTHERS["swift"]])
    cfg = build_config(dict(pretrained_model_name_or_path=str(bundled_path), data_files=str(path), objective="orpo"))
    out = log_dataset(cfg, tokenizer, get_template("auto", tokenizer), show="masked_text", num=1)
    heads = [line for line in out.splitlines() if line.startswith("-----")]
    assert [h.split(" (")[0] for h in heads] == ["----- pair 0, chosen", "----- pair 0, rejected"], out
    chosen, rejected = out.split("----- pair 0, rejected")
    # the prompt masked, the answer and its end-of-turn trained, the newline after it masked
    assert chosen.rstrip().endswith("masked] blue.<|im_end|>[1 masked]"), out
    assert rejected.rstrip().endswith("masked] green.<|im_end|>[1 masked]"), out
