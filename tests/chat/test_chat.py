from __future__ import annotations

import io

from tuneforge.chat.cli import run_chat
from tuneforge.data.templates import get_template, save_template, template_for
from tuneforge.models.generate import Sampling, generate


class Piped(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_piped_lines_are_answered_one_by_one(tiny_model_dir):
    out = io.StringIO()
    run_chat(str(tiny_model_dir), sampling=Sampling(max_new_tokens=3),
             stdin=Piped("hello\n\nRESET\nwho are you?\nEXIT\nnever asked\n"), stdout=out)
    text = out.getvalue()
    assert text.count(">>> User:") == 2 and text.count(">>> Assistant:") == 2
    assert "who are you?" in text and "never asked" not in text and "[history cleared]" in text


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


def test_prompts_make_one_conversation_and_old_turns_are_dropped_to_fit(tiny_model_dir):
    out = io.StringIO()
    run_chat(str(tiny_model_dir), sampling=Sampling(max_new_tokens=3), stdout=out,
             prompts=["first question", "second question"])
    text = out.getvalue()
    assert text.count(">>> User:") == 2 and text.count(">>> Assistant:") == 2


def test_fit_history_keeps_system_and_last_question():
    from tuneforge.chat.cli import fit_history

    history = [{"role": "system", "content": "s"}]
    for i in range(5):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    history.append({"role": "user", "content": "last"})
    fitted = fit_history(history, len, 4)  # "tokens" = messages here
    assert [m["content"] for m in fitted] == ["s", "q4", "a4", "last"]
    assert [m["content"] for m in fit_history(history, len, 1)] == ["s", "last"]
