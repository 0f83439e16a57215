"""The terminal chat: streaming, multi-turn, RESET and EXIT; line-per-question when piped."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from tuneforge.chat.context import fit_prompt
from tuneforge.data.templates import template_for
from tuneforge.errors import UserError
from tuneforge.models.generate import Sampling, generate, prompt_ids


def load_for_chat(model: str, adapter: str | None, device: str = "auto", bits: int | None = None,
                  trust_remote_code: bool | None = None) -> tuple[Any, Any, Path]:
    """Model (merged, or base + adapter; 4- or 8-bit with BITS) and tokenizer; returns the dir
    whose template applies. TRUST_REMOTE_CODE None: as the model's or adapter's metadata says."""
    from tuneforge.models.load import load_model, load_tokenizer, pick_device, remote_code_allowed
    from tuneforge.models.resolve import resolve_model

    path = resolve_model(model)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter '{adapter}' is not a PEFT adapter directory")
    trust = remote_code_allowed(trust_remote_code, path, adapter)
    dev = pick_device(device)
    llm = load_model(path, dev, torch.bfloat16 if bits and dev.type == "cuda" else "auto",
                     load_in_4bit=bits == 4, load_in_8bit=bits == 8, double_quant=False,
                     trust_remote_code=trust)
    template_dir = path
    tok_dir = path
    if adapter:
        from tuneforge.models.adapters import attach_adapter

        llm = attach_adapter(llm, Path(adapter), path)
        template_dir = Path(adapter)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tok_dir = Path(adapter)
    return llm, load_tokenizer(tok_dir, trust), template_dir


def load_for_serving(model: str, name: str, adapters: list[str], bits: int | None = None,
                     trust_remote_code: bool | None = None) -> tuple[Any, Any, Path, dict[str, str | None]]:
    """What `serve` answers with: the model and tokenizer, the dir whose template applies, and
    the routes (model id -> adapter) for ADAPTERS: none (NAME), one DIR (NAME and NAME:base), or
    NAME=DIR ones, all on one base (peft's multi-adapter model; the base as NAME, adapter off)."""
    from tuneforge.chat.worker import BASE

    named = [a.split("=", 1) for a in adapters if "=" in a]
    if not named:
        if len(adapters) > 1:
            raise UserError("several adapters need names: --adapter NAME=DIR, once for each")
        llm, tokenizer, template_dir = load_for_chat(model, adapters[0] if adapters else None, bits=bits,
                                                     trust_remote_code=trust_remote_code)
        return llm, tokenizer, template_dir, {name: None, **({f"{name}:base": BASE} if adapters else {})}
    if len(named) != len(adapters):
        raise UserError("give every --adapter as NAME=DIR, or one plain DIR")
    names = [n for n, _ in named]
    if len(set(names)) != len(names) or name in names or any(not n for n in names):
        raise UserError(f"adapter names must be distinct, not empty, and not '{name}' (the base's name)")
    (first, first_dir), rest = named[0], named[1:]
    llm, tokenizer, template_dir = load_for_chat(model, first_dir, bits=bits, trust_remote_code=trust_remote_code)
    routes: dict[str, str | None] = {name: BASE, first: "default"}  # peft names the first one "default"
    for adapter_name, directory in rest:
        if not (Path(directory) / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter_name}={directory}: not a PEFT adapter directory")
        llm.load_adapter(directory, adapter_name=adapter_name)
        routes[adapter_name] = adapter_name
    return llm, tokenizer, template_dir, routes


def run_chat(model: str, adapter: str | None = None, prompt_template: str | None = None,
             system: str = "", sampling: Sampling | None = None, stream: bool = True,
             stdin: TextIO | None = None, stdout: TextIO | None = None,
             prompts: list[str] | None = None, bits: int | None = None,
             trust_remote_code: bool | None = None) -> None:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    sampling = sampling or Sampling()
    llm, tokenizer, template_dir = load_for_chat(model, adapter, bits=bits,
                                                 trust_remote_code=trust_remote_code)
    template = template_for(template_dir, tokenizer, prompt_template)
    window = getattr(llm.config, "max_position_embeddings", None) or 4096
    limit = max(64, window - sampling.max_new_tokens)

    def n_tokens(messages: list[dict]) -> int:
        return len(prompt_ids(tokenizer, template, messages))

    interactive = stdin.isatty() and not prompts
    base_history = [{"role": "system", "content": system}] if system else []
    history = list(base_history)

    def emit(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    shown: list[str] = []  # the answer being written, kept when Ctrl-C stops it

    def show(text: str) -> None:
        shown.append(text)
        emit(text)

    if interactive:
        emit(f"tuneforge chat ({template.name} template). RESET clears the history, EXIT quits.\n")
    for question in _questions(prompts, interactive, stdin):
        if not question.strip():
            continue
        if question.strip() == "EXIT":
            break
        if question.strip() == "RESET":
            history = list(base_history)
            emit("[history cleared]\n")
            continue
        if prompts is not None:  # --prompt: one conversation, shown as it goes
            emit(f">>> User: {question}\n")
        elif not interactive:  # piped input: each line is a question of its own
            history = list(base_history)
            emit(f">>> User: {question}\n")
        if (fitted := _fitted(history, question, n_tokens, limit, tokenizer, emit)) is None:
            continue
        history = fitted
        emit(">>> Assistant: ")
        shown.clear()
        try:
            reply = generate(llm, tokenizer, template, history, sampling, on_text=show if stream else None)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat: what came is kept
            reply = "".join(shown).strip()
            emit(" [stopped]")
        if not stream:
            emit(reply)
        emit("\n")
        history.append({"role": "assistant", "content": reply})


def _fitted(history: list[dict], question: str, n_tokens: Any, limit: int, tokenizer: Any,
            emit: Any) -> list[dict] | None:
    """HISTORY and QUESTION fitted into the context, what that took said in one line; None when
    even the question cut to nothing does not fit (the system prompt alone is too long)."""
    fitted = fit_prompt([*history, {"role": "user", "content": question}], n_tokens, limit,
                        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                        lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    if (warning := fitted.warning()) is not None:
        emit(warning + "\n")
    return fitted.messages if fitted.fits else None


def _questions(prompts: list[str] | None, interactive: bool, stdin: TextIO) -> Iterator[str]:
    """The user's lines until they run out: PROMPTS when given, else asked at the terminal, else
    read from STDIN. A generator, so that each is asked for only once the last one is answered."""
    if prompts is not None:
        yield from list(prompts)
    elif interactive:
        armed = False  # a Ctrl-C at the prompt says how to quit; a second one in a row quits
        while True:
            try:
                question = input("\n>>> User: ")
                if question.strip() == '"""':  # a multi-line question, up to a closing """
                    lines = []
                    while (line := input("... ")).strip() != '"""':
                        lines.append(line)
                    question = "\n".join(lines)
            except EOFError:
                return
            except KeyboardInterrupt:
                if armed:
                    print()
                    return
                armed = True
                print("\n[Ctrl-C again quits; EXIT too]")
                continue
            armed = False
            yield question
    else:
        for line in iter(stdin.readline, ""):
            yield line.rstrip("\n")
