"""Prompt templates, and the split of a rendered chat into masked and trained text.

Every template is a Jinja chat template, as transformers uses them: ``auto`` is the tokenizer's
own, the named ones below exist for XTuner parity and for models without one. One rendering
path for all of them means the text trained on is exactly the text ``chat`` builds later, and
the merged model can carry the template in its tokenizer for any other tool to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.formats import Message
from tuneforge.errors import UserError

TEMPLATE_FILE = "tuneforge_template.json"

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_DEFAULT = (  # for base models with no chat format of their own
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Template:
    name: str
    chat_template: str  # Jinja, rendered by tokenizer.apply_chat_template
    stop_words: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a checkpoint and a converted folder carry."""
        return {"name": self.name, "chat_template": self.chat_template, "stop_words": list(self.stop_words)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Template:
        return cls(data["name"], data["chat_template"], tuple(data.get("stop_words", ())))


NAMED_TEMPLATES: dict[str, Template] = {
    "internlm2_chat": Template("internlm2_chat", "{{ bos_token }}" + _CHATML, ("<|im_end|>",)),
    "qwen_chat": Template("qwen_chat", _CHATML, ("<|im_end|>", "<|endoftext|>")),
    "chatml": Template("chatml", _CHATML, ("<|im_end|>",)),
    "llama3_chat": Template("llama3_chat", _LLAMA3, ("<|eot_id|>",)),
    "default": Template("default", _DEFAULT, ()),
}

# End-of-turn markers that, when a tokenizer's own template uses them, also end generation.
_KNOWN_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def get_template(name: str, tokenizer: Any) -> Template:
    """Resolve a ``prompt_template`` setting against a tokenizer."""
    if name == "auto":
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja or not isinstance(jinja, str):
            raise UserError(
                "prompt_template='auto' but the tokenizer has no chat template; set prompt_template "
                f"to one of: {', '.join(NAMED_TEMPLATES)}"
            )
        stops = [w for w in _KNOWN_TURN_ENDS if w in jinja]
        return Template("auto", jinja, tuple(stops))
    if name not in NAMED_TEMPLATES:
        raise UserError(
            f"unknown prompt_template '{name}'; expected 'auto' or one of: {', '.join(NAMED_TEMPLATES)}"
        )
    return NAMED_TEMPLATES[name]


def stop_token_ids(template: Template, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the template's stop words plus EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[w] for w in template.stop_words if w in vocab}
    return sorted(ids)


def _as_dict(m: Message | dict) -> dict:
    if isinstance(m, dict):
        return m
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = list(m.tool_calls)
    return d


def has_tool_support(template: Template) -> bool:
    """Whether the template renders tool definitions and tool calls (as Qwen2.5's, Llama 3.1's do)."""
    return "tools" in template.chat_template and "tool_calls" in template.chat_template


def render(template: Template, tokenizer: Any, messages: list[Message] | list[dict],
           add_generation_prompt: bool, tools: tuple[dict, ...] | list[dict] = ()) -> str:
    return tokenizer.apply_chat_template(
        [_as_dict(m) for m in messages], tools=list(tools) or None, chat_template=template.chat_template,
        tokenize=False, add_generation_prompt=add_generation_prompt,
    )


def _tools_of(template: Template, messages: list[Message]) -> tuple[dict, ...]:
    """The chat's tool definitions; refuses tool use that the template cannot render."""
    tools = next((m.tools for m in messages if m.tools), ())
    uses_tools = tools or any(m.tool_calls or m.role == "tool" for m in messages)
    if uses_tools and not has_tool_support(template):
        raise UserError(
            f"tools: prompt_template '{template.name}' has no tool support (its chat template never "
            "renders tools or tool calls), so tool calls and results cannot be trained as the model "
            "will see them; use a model whose chat template renders tools, or drop the tool-use records")
    return tools


def split_for_training(template: Template, tokenizer: Any,
                       messages: list[Message]) -> list[tuple[str, bool]]:
    """Render MESSAGES and cut the text into ``(text, trained)`` segments.

    A trained segment is one assistant answer (or function call) plus its end-of-turn marker;
    everything else (system, tools, user turns, tool results, the assistant header, whitespace after
    the marker) is context only. The cut points
    come from rendering each prefix of the chat with and without the generation prompt, so no
    template-specific parsing is needed.
    """
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of the final rendering already assigned to a segment
    tools = _tools_of(template, messages)
    full = render(template, tokenizer, messages, add_generation_prompt=False, tools=tools)
    for i, msg in enumerate(messages):
        if msg.role != "assistant":  # tool results, like user turns, are context only
            continue
        prompt = render(template, tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render(template, tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done):
            raise UserError(
                f"prompt_template '{template.name}' does not render chats incrementally (it rewrites "
                "earlier turns), so the answer tokens cannot be located; set prompt_template to one "
                f"of: {', '.join(NAMED_TEMPLATES)}"
            )
        answer = upto[len(prompt):]
        answer = answer[: len(answer.rstrip())]  # whitespace after the end marker stays context
        if msg.truncated and answer.startswith(msg.content):
            answer = msg.content  # a cut-off answer: its end marker stays context too
        segments.append((full[done:len(prompt)], False))
        segments.append((answer, msg.loss))
        done = len(prompt) + len(answer)
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def save_template(directory: str | Path, template: Template) -> None:
    Path(directory, TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), ensure_ascii=False, indent=2))


def load_template(directory: str | Path) -> Template | None:
    path = Path(directory, TEMPLATE_FILE)
    if not path.is_file():
        return None
    return Template.from_dict(json.loads(path.read_text(encoding="utf-8")))


def template_for(model_dir: str | Path | None, tokenizer: Any, override: str | None) -> Template:
    """The template to chat with a model in MODEL_DIR: ``--prompt-template`` if given, else the
    template saved with the model, else the tokenizer's own."""
    if override:
        return get_template(override, tokenizer)
    saved = load_template(model_dir) if model_dir and Path(model_dir).is_dir() else None
    if saved is not None:
        return saved
    try:
        return get_template("auto", tokenizer)
    except UserError as err:
        raise UserError(f"{model_dir}: no saved template and {err}") from err
