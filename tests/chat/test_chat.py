"""`tuneforge chat`: piped lines, --prompt conversations, the context window, streaming and the
saved template. What the model is asked is read from the call to generate itself."""

from __future__ import annotations

import io
import json

import pytest

from tuneforge.chat import cli as chat_cli
from tuneforge.chat.cli import run_chat
from tuneforge.data.templates import get_template, save_template, template_for
from tuneforge.models.generate import Sampling, generate, prompt_ids


class Piped(io.StringIO):
    def isatty(self) -> bool:
        return False


class Asked(list):
    """The messages of each call run_chat makes to generate (copied: the history grows after);
    ``replies`` holds what each call answered."""

    replies: list[str]


@pytest.fixture
def asked(monkeypatch) -> Asked:
    calls = Asked()
    calls.replies = []

    def recording(model, tokenizer, template, messages, sampling, on_text=None):
        calls.append([dict(m) for m in messages])
        calls.replies.append(generate(model, tokenizer, template, messages, sampling, on_text))
        return calls.replies[-1]

    monkeypatch.setattr(chat_cli, "generate", recording)
    return calls


def test_piped_lines_are_answered_one_by_one(tiny_model_dir, asked):
    out = io.StringIO()
    run_chat(str(tiny_model_dir), sampling=Sampling(max_new_tokens=3),
             stdin=Piped("hello\n\nRESET\nwho are you?\nand you?\nEXIT\nnever asked\n"), stdout=out)
    text = out.getvalue()
    assert text.count(">>> User:") == 3 and text.count(">>> Assistant:") == 3
    assert "who are you?" in text and "never asked" not in text and "[history cleared]" in text
    # each line is a question of its own: no earlier line or answer goes with it; the blank line,
    # RESET and EXIT are not questions, and nothing after EXIT is asked
    assert asked == [[{"role": "user", "content": q}] for q in ("hello", "who are you?", "and you?")]


def test_streamed_text_equals_the_reply(bundled_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundled_path)
    template = get_template("auto", tokenizer)
    pieces: list[str] = []
    msgs = [{"role": "user", "content": "请介绍一下你自己"}]
    reply = generate(model, tokenizer, template, msgs, Sampling(max_new_tokens=20), on_text=pieces.append)
    assert reply and "".join(pieces).strip() == reply
    assert "<|im_end|>" not in reply


def test_saved_template_wins_over_the_tokenizer_default(tokenizer, tmp_path):
    save_template(tmp_path, get_template("llama3_chat", tokenizer))
    assert template_for(tmp_path, tokenizer, None).name == "llama3_chat"
    assert template_for(tmp_path, tokenizer, "chatml").name == "chatml"
    assert template_for(tmp_path / "none", tokenizer, None).name == "auto"


def test_prompts_make_one_conversation_and_old_turns_are_dropped_to_fit(tiny_model_dir, tokenizer, asked):
    # The tiny model's window is 512 tokens, less the 3 to answer: about 130 tokens a question,
    # so three questions fit and the fourth pushes the oldest exchange out, the fifth the next.
    window = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    limit = window - 3
    questions = [f"question {i}: " + "apple " * 120 for i in range(5)]
    system = {"role": "system", "content": "Be brief."}
    out = io.StringIO()
    run_chat(str(tiny_model_dir), system="Be brief.", sampling=Sampling(max_new_tokens=3), stdout=out,
             prompts=questions)
    text = out.getvalue()
    assert text.count(">>> User:") == 5 and text.count(">>> Assistant:") == 5
    assert len(asked) == 5
    answers = asked.replies
    # one conversation: each question is asked after the exchanges before it
    assert asked[0] == [system, {"role": "user", "content": questions[0]}]
    assert asked[1] == [system, {"role": "user", "content": questions[0]},
                        {"role": "assistant", "content": answers[0]}, {"role": "user", "content": questions[1]}]
    n_tokens = lambda messages: len(prompt_ids(tokenizer, get_template("auto", tokenizer), messages))  # noqa: E731
    # the window fills at the fourth question: the oldest exchange goes, the system prompt and the
    # newest turns stay; at the fifth, the next oldest; each time only as much as needed to fit
    for i, dropped_up_to in ((3, 1), (4, 2)):
        kept = [system]
        for j in range(dropped_up_to, i):
            kept += [{"role": "user", "content": questions[j]}, {"role": "assistant", "content": answers[j]}]
        kept.append({"role": "user", "content": questions[i]})
        assert asked[i] == kept, [m["content"][:12] for m in asked[i]]
        assert n_tokens(asked[i]) <= limit < n_tokens(kept[:1] + asked[i - 1][1:3] + kept[1:])
    # each time one line says so, with the sizes: the conversation as it stood with the new
    # question (the last one sent, its answer, the question), and what went
    for i in (3, 4):
        whole = asked[i - 1] + [{"role": "assistant", "content": answers[i - 1]},
                                {"role": "user", "content": questions[i]}]
        line = (f"[the prompt is {n_tokens(whole):,} tokens, over the {limit:,} that fit the context: dropped the "
                f"2 oldest message(s), {n_tokens(whole) - n_tokens(asked[i]):,} tokens in all]")
        assert line in text.splitlines(), (line, text)
    assert text.count("[the prompt is") == 2


def test_fit_history_keeps_system_and_last_question():
    from tuneforge.chat.context import fit_history

    history = [{"role": "system", "content": "s"}]
    for i in range(5):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    history.append({"role": "user", "content": "last"})
    fitted = fit_history(history, len, 4)  # "tokens" = messages here
    assert [m["content"] for m in fitted] == ["s", "q4", "a4", "last"]
    assert [m["content"] for m in fit_history(history, len, 1)] == ["s", "last"]


def test_a_question_over_the_context_loses_its_start_and_says_how_many_tokens(tiny_model_dir, tokenizer, asked):
    import re

    window = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    limit = window - 3
    question = "Here is a text. " + "The river runs to the sea. " * 150 + "What does the river do?"
    out = io.StringIO()
    run_chat(str(tiny_model_dir), sampling=Sampling(max_new_tokens=3), stdout=out, prompts=[question, "And?"])
    template = get_template("auto", tokenizer)
    n_tokens = lambda messages: len(prompt_ids(tokenizer, template, messages))  # noqa: E731
    full = n_tokens([{"role": "user", "content": question}])
    assert full > limit
    sent = asked[0][-1]["content"]
    assert len(asked) == 2 and sent.endswith("What does the river do?") and len(sent) < len(question)
    assert limit - 3 <= n_tokens(asked[0]) <= limit  # only as much cut as needed
    line = next(x for x in out.getvalue().splitlines() if x.startswith("[the prompt is"))
    m = re.fullmatch(r"\[the prompt is ([\d,]+) tokens, over the ([\d,]+) that fit the context: cut the first "
                     r"([\d,]+) tokens of your question, ([\d,]+) tokens in all\]", line)
    assert m, line
    said, fit, cut, gone = (int(g.replace(",", "")) for g in m.groups())
    assert (said, fit, gone) == (full, limit, full - n_tokens(asked[0]))
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[cut:], skip_special_tokens=True) == sent  # the number is what was cut
    # the next turn: the long question goes as an old message, the new one is asked whole
    assert asked[1][-1] == {"role": "user", "content": "And?"} and n_tokens(asked[1]) <= limit


def test_a_system_prompt_over_the_context_refuses_the_turn(tiny_model_dir, asked):
    out = io.StringIO()
    run_chat(str(tiny_model_dir), system="Be brief. " * 400, sampling=Sampling(max_new_tokens=3), stdout=out,
             prompts=["hi"])
    assert asked == [] and "the system prompt alone is over the" in out.getvalue()


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(tiny_model_dir, monkeypatch):
    calls: list[list[dict]] = []

    def interrupted_once(model, tokenizer, template, messages, sampling, on_text=None):
        calls.append([dict(m) for m in messages])
        if len(calls) == 1:
            on_text("Half an ans")
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of generate
        return "fine"

    monkeypatch.setattr(chat_cli, "generate", interrupted_once)
    out = io.StringIO()
    run_chat(str(tiny_model_dir), prompts=["first?", "second?"], stdout=out, sampling=Sampling(max_new_tokens=4))
    assert "Half an ans [stopped]" in out.getvalue()
    assert [(m["role"], m["content"]) for m in calls[1]] == [
        ("user", "first?"), ("assistant", "Half an ans"), ("user", "second?")]


def test_terminal_chat_ctrl_c_and_a_pasted_block(tiny_model_dir):
    """In a real terminal (a pty): Ctrl-C mid-answer stops it and the chat goes on; a three-line
    block between \"\"\" lines is one question; Ctrl-C twice at the prompt quits."""
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    from waits import limit

    child = pexpect.spawn(sys.executable, ["-m", "tuneforge", "chat", str(tiny_model_dir), "--max-new-tokens", "100000"],
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, encoding="utf-8", timeout=limit(120))
    try:
        child.expect_exact(">>> User: ")
        child.sendline("Tell me everything.")
        child.expect_exact(">>> Assistant: ")
        child.expect(r"\S{3}")  # the answer is being written (a random model: it never stops by itself)
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">>> User: ")
        child.sendline('"""')
        for line in ("one", "two", "three"):
            child.expect_exact("... ")
            child.sendline(line)
        child.expect_exact("... ")
        child.sendline('"""')
        child.expect_exact(">>> Assistant: ")
        child.sendintr()
        child.expect_exact(">>> User: ")
        assert ">>> User: " not in child.before  # one turn: no prompt between the block's lines and this
        child.sendintr()
        child.expect_exact("Ctrl-C again quits")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)
