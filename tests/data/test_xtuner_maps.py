"""XTuner's dataset map functions: each on a hand-written record in its dataset's real shape, the
record XTuner would produce written out by hand."""

from __future__ import annotations

import pytest

from tuneforge.data.formats import to_messages
from tuneforge.data.xtuner_maps import (
    MAP_FNS,
    REFUSED,
    SYSTEM_TEXTS,
    apply_map,
    check_map,
)
from tuneforge.errors import UserError

CODER = ("You are a professional programer. Please provide the corresponding code based on the "
         "description of Human.\n")
LAWYER = "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"

# name -> (raw record, the conversation record XTuner's function returns for it)
CASES = {
    "alpaca_map_fn": (
        {"instruction": "Name a primary color.", "input": "", "output": "Red.", "text": "ignored"},
        {"conversation": [{"input": "Name a primary color.\n", "output": "Red."}]}),
    "alpaca_zh_map_fn": (
        {"instruction_zh": "把这句话翻译成英文。", "input_zh": "你好", "output_zh": "Hello",
         "instruction": "Translate.", "input": "hi", "output": "Hello"},
        {"conversation": [{"input": "把这句话翻译成英文。\n你好", "output": "Hello"}]}),
    "arxiv_map_fn": (
        {"id": "0704.0001", "abstract": "We measure the widget constant.", "title": "On Widgets"},
        {"conversation": [{
            "system": ("If you are an expert in writing papers, please generate a good paper title for "
                       "this paper based on other authors' descriptions of their abstracts.\n"),
            "input": "We measure the widget constant.", "output": "On Widgets"}]}),
    "code_alpaca_map_fn": (
        {"prompt": "Add two numbers in Python.", "completion": "def add(a, b):\n    return a + b"},
        {"conversation": [{"system": CODER, "input": "Add two numbers in Python.",
                           "output": "def add(a, b):\n    return a + b"}]}),
    "colors_map_fn": (
        {"color": "#1a2b3c", "description": "Dark slate: a deep blue: almost navy "},
        {"conversation": [{
            "system": ("You are a professional color designer. Please provide the corresponding "
                       "colors based on the description of Human.\n"),
            "input": "a deep blue: almost navy", "output": "#1a2b3c"}]}),
    "completion_map_fn": (
        {"text": "  Once upon a time.\n"},
        {"conversation": [{"input": "", "output": "Once upon a time."}]}),
    "crime_kg_assitant_map_fn": (
        {"input": "盗窃罪如何量刑？", "output": "视数额而定。"},
        {"conversation": [{"system": LAWYER, "input": "盗窃罪如何量刑？", "output": "视数额而定。"}]}),
    "default_map_fn": (
        {"input": "Hi", "output": "Hello!", "system": "not read"},
        {"conversation": [{"input": "Hi", "output": "Hello!"}]}),
    "law_reference_map_fn": (
        {"question": "合同何时成立？", "answer": "承诺生效时。", "reference": ["民法典第483条"]},
        {"conversation": [{"system": LAWYER, "input": "合同何时成立？", "output": "承诺生效时。"}]}),
    "medical_map_fn": (
        {"instruction": "头痛怎么办？", "input": "已持续两天", "output": "请及时就医。"},
        {"conversation": [{"system": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
                           "input": "头痛怎么办？\n已持续两天", "output": "请及时就医。"}]}),
    "oasst1_map_fn": (
        {"text": "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3?"
                 "### Assistant: 6. ### Human: thanks"},
        {"conversation": [{"input": "What is 2+2?", "output": "4."},
                          {"input": "And 3+3?", "output": "6."}]}),
    "openai_map_fn": (
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello.", "loss": False},
                      {"role": "user", "content": "Who are you?"},
                      {"role": "assistant", "content": "An assistant."}]},
        {"conversation": [
            {"system": "Be brief.", "input": "Hi", "output": "Hello.", "output_with_loss": False},
            {"system": "", "input": "Who are you?", "output": "An assistant.", "output_with_loss": True}]}),
    "openorca_map_fn": (
        {"id": "niv.1", "system_prompt": "You are an AI assistant.", "question": "Is water wet?",
         "response": "Yes."},
        {"conversation": [{"system": "You are an AI assistant.", "input": "Is water wet?",
                           "output": "Yes."}]}),
    "pretrain_map_fn": (
        {"text": "\nThe quick brown fox.  ", "meta": {"source": "x"}},
        {"conversation": [{"input": "", "output": "The quick brown fox.", "need_eos_token": False}]}),
    "sql_map_fn": (
        {"context": "CREATE TABLE t (a INT)", "question": "How many rows?",
         "answer": "SELECT COUNT(*) FROM t"},
        {"conversation": [{
            "system": ("If you are an expert in SQL, please generate a good SQL Query for Question "
                       "based on the CREATE TABLE statement.\n"),
            "input": "CREATE TABLE t (a INT)\nHow many rows?", "output": "SELECT COUNT(*) FROM t"}]}),
    "stack_exchange_map_fn": (
        {"qid": 7, "question": "How do I exit vim?", "response": ":q", "date": "2020/01/01"},
        {"conversation": [{"input": "How do I exit vim?", "output": ":q"}]}),
    "tiny_codes_map_fn": (
        {"prompt": "Write hello world in C.", "response": "puts(\"hi\");", "topic": "C"},
        {"conversation": [{"system": CODER, "input": "Write hello world in C.",
                           "output": "puts(\"hi\");"}]}),
    "wizardlm_map_fn": (
        {"idx": "w1", "conversations": [{"from": "human", "value": "Tell a joke."},
                                        {"from": "gpt", "value": "Knock knock."},
                                        {"from": "human", "value": "Who's there?"},
                                        {"from": "gpt", "value": "Lettuce."}]},
        {"conversation": [{"input": "Tell a joke.", "output": "Knock knock."},
                          {"input": "Who's there?", "output": "Lettuce."}]}),
}


def test_every_map_fn_has_a_case():
    assert set(CASES) == set(MAP_FNS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_map_fn_returns_xtuners_record(name):
    raw, expected = CASES[name]
    before = repr(raw)
    assert apply_map(name, raw, "d.jsonl:1") == expected
    assert MAP_FNS[name](raw) == expected
    assert repr(raw) == before  # pure: the raw record is left as it was


@pytest.mark.parametrize("name", sorted(CASES))
def test_records_read_as_tuneforge_conversations(name):
    messages = to_messages(apply_map(name, CASES[name][0], "d.jsonl:1"), "conversation", "d.jsonl:1")
    assert messages[-1].role == "assistant"


def test_system_texts_are_xtuners_verbatim():
    assert SYSTEM_TEXTS["coder"] == CODER and SYSTEM_TEXTS["lawyer"] == LAWYER
    assert SYSTEM_TEXTS["alpaca"] == ("Below is an instruction that describes a task. Write a "
                                      "response that appropriately completes the request.\n")
    assert all(text.endswith("\n") for text in SYSTEM_TEXTS.values())


# XTuner's quirks, one by one


def test_alpaca_nooutput_is_dropped_and_input_always_joined():
    assert apply_map("alpaca_map_fn", {"instruction": "q", "input": "x", "output": "<nooutput>"},
                     "d:1") == {"conversation": []}
    assert apply_map("alpaca_map_fn", {"instruction": "q", "output": "<nooutput>"}, "d:1") == \
        {"conversation": []}  # XTuner checks the answer first: no input needed
    assert apply_map("alpaca_map_fn", {"instruction": "", "input": "x", "output": "a"}, "d:1") == \
        {"conversation": [{"input": "\nx", "output": "a"}]}


def test_colors_without_a_colon_gives_an_empty_input():
    out = apply_map("colors_map_fn", {"color": "#fff", "description": "plain white"}, "d:1")
    assert out["conversation"][0]["input"] == ""


def test_openorca_empty_system_prompt_is_kept_empty():
    out = apply_map("openorca_map_fn", {"system_prompt": "", "question": "q", "response": "a"}, "d:1")
    assert out == {"conversation": [{"system": "", "input": "q", "output": "a"}]}


def test_oasst1_pairs_by_position_and_drops_other_pieces():
    text = ("### Human: a ### Human: b ### Assistant: c ### Assistant: d:\n### Step 1\nmix"
            "### Assistant: e")
    # pieces: a, b, c, d, e; "### Step 1\nmix" starts with neither tag, so it is dropped and d ends
    # at "d:"; an odd count: e dropped; then paired by position, whoever said them
    assert apply_map("oasst1_map_fn", {"text": text}, "d:1") == {"conversation": [
        {"input": "a", "output": "b"}, {"input": "c", "output": "d:"}]}
    assert apply_map("oasst1_map_fn", {"text": "no tags here"}, "d:1") == {"conversation": []}


def test_openai_skips_leading_answers_joins_users_and_drops_the_unanswered():
    rec = {"messages": [{"role": "assistant", "content": None},  # skipped unread
                        {"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
                        {"role": "user", "content": "one"}, {"role": "user", "content": "two"},
                        {"role": "assistant", "content": "A", "loss": "False"},
                        {"role": "assistant", "content": "B", "loss": None},
                        {"role": "assistant", "content": "C", "loss": "TRUE"},
                        {"role": "user", "content": "left unanswered"}]}
    assert apply_map("openai_map_fn", rec, "d:1") == {"conversation": [
        {"system": "S2", "input": "onetwo", "output": "A", "output_with_loss": False},
        {"system": "", "input": "", "output": "B", "output_with_loss": False},
        {"system": "", "input": "", "output": "C", "output_with_loss": True}]}


def test_wizardlm_skips_leading_gpt_and_joins_humans():
    rec = {"conversations": [{"from": "gpt", "value": "stray"}, {"from": "human", "value": "a"},
                             {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"},
                             {"from": "human", "value": "unanswered"}]}
    assert apply_map("wizardlm_map_fn", rec, "d:1") == {"conversation": [{"input": "ab", "output": "c"}]}


def test_unknown_roles_stop_the_record():
    with pytest.raises(UserError) as err:
        apply_map("openai_map_fn", {"messages": [{"role": "user", "content": "q"},
                                                 {"role": "tool", "content": "42"}]}, "d.jsonl:4")
    assert str(err.value) == (
        "d.jsonl:4: openai_map_fn: messages[1].role: 'tool' is not a role XTuner's openai_map_fn "
        "reads (system, user, assistant); XTuner stops on it (NotImplementedError); remove the "
        "message or the record")
    with pytest.raises(UserError, match=r"^d:2: wizardlm_map_fn: conversations\[0\]\.from: 'system' "):
        apply_map("wizardlm_map_fn", {"conversations": [{"from": "system", "value": "S"}]}, "d:2")


# Missing and ill-typed fields


@pytest.mark.parametrize(("name", "record", "field"), [
    ("alpaca_map_fn", {"instruction": "q", "output": "a"}, "input"),
    ("alpaca_zh_map_fn", {"instruction": "q", "input": "", "output": "a"}, "instruction_zh"),
    ("arxiv_map_fn", {"abstract": "x"}, "title"),
    ("oasst1_map_fn", {"conversations": []}, "text"),
    ("openai_map_fn", {"conversation": []}, "messages"),
    ("openai_map_fn", {"messages": [{"content": "q"}]}, "messages[0].role"),
    ("openai_map_fn", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("wizardlm_map_fn", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
     "conversations[1].value"),
    ("sql_map_fn", {"context": "c", "answer": "a"}, "question"),
    ("openorca_map_fn", {"question": "q", "response": "a"}, "system_prompt"),
])
def test_missing_field(name, record, field):
    with pytest.raises(UserError) as err:
        apply_map(name, record, "data/x.jsonl:7")
    assert str(err.value) == f"data/x.jsonl:7: {name} needs field '{field}'"


@pytest.mark.parametrize(("name", "record", "message"), [
    ("alpaca_map_fn", {"instruction": "q", "input": None, "output": "a"},
     "alpaca_map_fn needs field 'input' as a string, got null"),
    ("default_map_fn", {"input": "q", "output": ["a"]},
     "default_map_fn needs field 'output' as a string, got a list"),
    ("pretrain_map_fn", {"text": 3}, "pretrain_map_fn needs field 'text' as a string, got a number"),
    ("openai_map_fn", {"messages": "[]"}, "openai_map_fn needs field 'messages' as a list, got a string"),
    ("openai_map_fn", {"messages": ["hi"]},
     "openai_map_fn needs field 'messages[0]' as an object, got a string"),
    ("openai_map_fn", {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]},
     "openai_map_fn needs field 'messages[0].content' as a string, got a list"),
])
def test_ill_typed_field(name, record, message):
    with pytest.raises(UserError) as err:
        apply_map(name, record, "d:3")
    assert str(err.value) == f"d:3: {message}"


def test_a_record_that_is_not_an_object():
    with pytest.raises(UserError, match=r"^d:1: alpaca_map_fn needs a JSON object per record, got a list$"):
        apply_map("alpaca_map_fn", ["q", "a"], "d:1")


# Names


def test_dotted_names_are_read_by_their_last_part():
    assert check_map("xtuner.dataset.map_fns.oasst1_map_fn") == "oasst1_map_fn"
    assert apply_map("xtuner.dataset.map_fns.default_map_fn", {"input": "q", "output": "a"}, "d:1") == \
        {"conversation": [{"input": "q", "output": "a"}]}


def test_unknown_name_lists_the_supported_ones():
    with pytest.raises(UserError) as err:
        apply_map("firefly_map_fn", {"input": "q"}, "d:1")
    message = str(err.value)
    assert message.startswith("dataset_map_fn=firefly_map_fn: not a map function tuneforge knows")
    assert all(name in message for name in MAP_FNS)
    assert "\n" not in message


@pytest.mark.parametrize(("name", "why"), [
    ("llava_map_fn", "image-text data"), ("llava_image_only_map_fn", "image-text data"),
    ("mimicit_map_fn", "image-text data"), ("dpo_map_fn", "preference pairs"),
    ("ultrafeedback_binarized_map_fn", "preference pairs"), ("msagent_react_map_fn", "ReAct agent data"),
    ("msagent_map_fn", "ReAct agent data"),
])
def test_refused_names_say_why_and_what_to_do(name, why):
    with pytest.raises(UserError) as err:
        apply_map(name, {"conversations": []}, "d:1")
    message = str(err.value)
    assert message == f"dataset_map_fn={name}: {REFUSED[name]}"
    assert why in message and "\n" not in message
    assert not set(REFUSED) & set(MAP_FNS)


def test_preference_refusal_points_to_the_preference_objectives():
    assert REFUSED["dpo_map_fn"].startswith("preference pairs") and "objective='dpo'" in REFUSED["dpo_map_fn"]
