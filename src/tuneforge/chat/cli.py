"""The terminal chat: streaming, multi-turn, RESET and EXIT; line-per-question when piped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from tuneforge.chat.engine import Sampling, generate, template_for
from tuneforge.errors import UserError


def load_for_chat(model: str, adapter: str | None, device: str = "auto") -> tuple[Any, Any, Path]:
    """Model (merged, or base + adapter) and tokenizer; returns the dir whose template applies."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models.load import load_tokenizer, pick_device
    from tuneforge.models.resolve import resolve_model

    path = resolve_model(model)
    dev = pick_device(device)
    llm = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(dev)
    template_dir = path
    tok_dir = path
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter '{adapter}' is not a PEFT adapter directory")
        llm = PeftModel.from_pretrained(llm, adapter)
        template_dir = Path(adapter)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tok_dir = Path(adapter)
    return llm, load_tokenizer(tok_dir), template_dir


def run_chat(model: str, adapter: str | None = None, prompt_template: str | None = None,
             system: str = "", sampling: Sampling | None = None, stream: bool = True,
             stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    sampling = sampling or Sampling()
    llm, tokenizer, template_dir = load_for_chat(model, adapter)
    template = template_for(template_dir, tokenizer, prompt_template)
    interactive = stdin.isatty()
    base_history = [{"role": "system", "content": system}] if system else []
    history = list(base_history)

    def emit(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        emit(f"tuneforge chat ({template.name} template). RESET clears the history, EXIT quits.\n")
    while True:
        if interactive:
            try:
                question = input("\n>>> User: ")
            except EOFError:
                break
        else:
            line = stdin.readline()
            if not line:
                break
            question = line.rstrip("\n")
        if not question.strip():
            continue
        if question.strip() == "EXIT":
            break
        if question.strip() == "RESET":
            history = list(base_history)
            emit("[history cleared]\n")
            continue
        if not interactive:  # piped input: each line is a question of its own
            history = list(base_history)
            emit(f">>> User: {question}\n")
        history.append({"role": "user", "content": question})
        emit(">>> Assistant: ")
        reply = generate(llm, tokenizer, template, history, sampling,
                         on_text=emit if stream else None)
        if not stream:
            emit(reply)
        emit("\n")
        history.append({"role": "assistant", "content": reply})
