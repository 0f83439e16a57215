"""The trained Jinja chat template as an Ollama TEMPLATE (Go's text/template).

Jinja cannot be translated to Go in general, but the templates tuneforge trains with all render a
chat the same way: an opening (BOS, a default system prompt), then each message as
``head + content + tail`` for its role, then the assistant header. ``learn`` finds those pieces
by rendering probe chats with the template itself (every prefix of a chat, placeholder contents),
``render`` is the Go template's logic in Python, and ``check`` compares the two on other chats, so
a template that does not fit this shape is refused rather than translated wrongly. ``go_template``
writes the pieces as Go string constants, so no Jinja text is ever reinterpreted.

As in Ollama's own templates, a chat that ends with an assistant message is continued (no tail, no
new header): transformers' ``continue_final_message``. Tool definitions and tool calls are not
rendered (the TEMPLATE covers system, user and assistant text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tuneforge.errors import UserError

Chat = list[dict[str, str]]
Render = Callable[[Chat, bool], str]  # (messages, add_generation_prompt) -> text


class Unlearnable(Exception):
    """The template does not render chats as opening + per-role head/content/tail."""


@dataclass(frozen=True)
class Turn:
    head: str
    tail: str


@dataclass(frozen=True)
class ChatShape:
    first_system: Turn  # a system message that opens the chat, with what comes before it
    opening: str  # what comes before a chat that does not open with a system message
    turns: dict[str, Turn] = field(default_factory=dict)  # user, assistant (and a later system)
    generation: str = ""  # what add_generation_prompt appends
    trims: bool = False  # the template strips the whitespace around message contents

    def without_prefix(self, prefix: str) -> ChatShape:
        """The shape minus PREFIX at its start (the BOS a tokenizer adds by itself)."""
        if not prefix:
            return self
        first = self.first_system
        if first.head.startswith(prefix):
            first = Turn(first.head[len(prefix):], first.tail)
        opening = self.opening[len(prefix):] if self.opening.startswith(prefix) else self.opening
        return replace(self, first_system=first, opening=opening)


def _split(block: str, content: str) -> Turn:
    if block.count(content) != 1:
        raise Unlearnable("a message's content does not appear exactly once in its rendering")
    head, tail = block.split(content)
    return Turn(head, tail)


def _blocks(render: Render, chat: Chat) -> list[str]:
    """What each message adds to the rendering of the chat before it."""
    texts = [render(chat[:k], False) for k in range(1, len(chat) + 1)]
    pairs = list(zip(texts, texts[1:], strict=False))
    if not all(after.startswith(before) for before, after in pairs):
        raise Unlearnable("adding a message rewrites the earlier ones")
    return [texts[0]] + [after[len(before):] for before, after in pairs]


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _later_system(render: Render) -> Turn | None:
    """A system message after the first turn, if the template renders one at all."""
    chat = [_msg("user", "tfU1"), _msg("assistant", "tfA1"), _msg("system", "tfS2"), _msg("user", "tfU2")]
    try:
        return _split(_blocks(render, chat)[2], "tfS2")
    except Exception:  # noqa: BLE001 (templates raise what they like on a role they refuse)
        return None


def learn(render: Render) -> ChatShape:
    """The shape of the chat template behind RENDER; Unlearnable if it has none."""
    chat = [_msg("system", "tfS0"), _msg("user", "tfU1"), _msg("assistant", "tfA1"),
            _msg("user", "tfU2"), _msg("assistant", "tfA2"), _msg("user", "tfU3")]
    blocks = _blocks(render, chat)
    seen: dict[str, set[Turn]] = {}
    for message, block in zip(chat[1:], blocks[1:], strict=True):
        seen.setdefault(message["role"], set()).add(_split(block, message["content"]))
    if any(len(v) != 1 for v in seen.values()):
        raise Unlearnable("a role's messages render differently depending on where they are")
    turns = {role: next(iter(v)) for role, v in seen.items()}
    user = turns["user"]
    alone = _blocks(render, [_msg("user", "tfU1"), _msg("assistant", "tfA1")])
    own = user.head + "tfU1" + user.tail
    if not alone[0].endswith(own) or alone[1] != turns["assistant"].head + "tfA1" + turns["assistant"].tail:
        raise Unlearnable("the first user message renders unlike the later ones")
    later = _later_system(render)
    if later is not None:
        turns["system"] = later
    generation = render(chat, True)[len(render(chat, False)):]
    if render(chat[:2], True)[len(render(chat[:2], False)):] != generation:
        raise Unlearnable("the generation prompt depends on the conversation")
    trims = "tfU1" in render([_msg("user", " tfU1 ")], False) and " tfU1 " not in render(
        [_msg("user", " tfU1 ")], False)
    return ChatShape(_split(blocks[0], "tfS0"), alone[0][: len(alone[0]) - len(own)], turns,
                     generation, trims)


def render(shape: ChatShape, chat: Chat) -> str:
    """CHAT as the Go template renders it (the same branches, in Python)."""
    out: list[str] = []
    for i, message in enumerate(chat):
        role, last = message["role"], i == len(chat) - 1
        turn = shape.turns.get(role)
        if role == "system":
            turn = shape.first_system if i == 0 else turn
        elif i == 0:
            out.append(shape.opening)
        if turn is not None:
            continues = last and role == "assistant"
            out += [turn.head, message["content"], "" if continues else turn.tail]
        if last and role != "assistant":
            out.append(shape.generation)
    return "".join(out)


# Chats the learnt shape must render exactly as the template does (contents unlike the probes).
CHECKS: tuple[Chat, ...] = (
    [_msg("user", "Please introduce yourself")],
    [_msg("system", "You are a helpful assistant.\nAnswer briefly."), _msg("user", "你是谁？")],
    [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Tell me a joke.\n")],
    [_msg("system", "Be terse."), _msg("user", "2+2?"), _msg("assistant", "4"), _msg("user", "3+3?"),
     _msg("assistant", "6"), _msg("user", "Thanks")],
)


def check(shape: ChatShape, hf_render: Render, prefix: str = "") -> None:
    """Raise Unlearnable unless SHAPE renders every check chat as HF_RENDER does (minus PREFIX,
    the BOS the tokenizer adds). A template that trims contents is checked on trimmed ones: Go
    cannot trim, which ``ChatShape.trims`` reports."""
    for chat in CHECKS:
        if shape.trims:
            chat = [{**m, "content": m["content"].strip()} for m in chat]
        expected = hf_render(chat, True)
        if prefix and expected.startswith(prefix):
            expected = expected[len(prefix):]
        if render(shape, chat) != expected:
            raise Unlearnable(f"a {len(chat)}-message chat renders differently")


def go_quote(text: str) -> str:
    """TEXT as a Go interpreted string literal that holds only printable characters (Ollama's
    Modelfile reader drops the others)."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _text(text: str) -> str:
    return f"{{{{- {go_quote(text)} -}}}}" if text else ""


def _turn(turn: Turn, continues_if_last: bool = False) -> str:
    tail = _text(turn.tail)
    if continues_if_last and tail:
        tail = f"{{{{- if not $last -}}}}{tail}{{{{- end -}}}}"
    return f"{_text(turn.head)}{{{{- .Content -}}}}{tail}"


def go_template(shape: ChatShape, note: str) -> str:
    """SHAPE as a Go template over Ollama's ``.Messages``; NOTE becomes its first comment.

    Every action trims the whitespace around it, so the template's own line breaks are layout and
    everything rendered comes from the quoted strings and the message contents."""
    if "*/" in note:
        raise ValueError("a Go template comment cannot contain */")
    later = shape.turns.get("system")
    lines = [
        f"{{{{- /* {note} */ -}}}}",
        "{{- range $i, $_ := .Messages -}}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}",
        '{{- if eq .Role "system" -}}',
        "{{- if eq $i 0 -}}" + _turn(shape.first_system),
        "{{- else -}}" + (_turn(later) if later else ""),
        "{{- end -}}",
        "{{- else -}}",
    ]
    if shape.opening:
        lines.append("{{- if eq $i 0 -}}" + _text(shape.opening) + "{{- end -}}")
    lines += [
        '{{- if eq .Role "user" -}}' + _turn(shape.turns["user"]),
        '{{- else if eq .Role "assistant" -}}' + _turn(shape.turns["assistant"], continues_if_last=True),
        "{{- end -}}",
        "{{- end -}}",
        '{{- if and $last (ne .Role "assistant") -}}' + _text(shape.generation) + "{{- end -}}",
        "{{- end -}}",
    ]
    return "\n".join(lines)


def ollama_template(hf_render: Render, bos: str, note: str) -> tuple[str, ChatShape]:
    """The Go TEMPLATE that renders chats as HF_RENDER does, less BOS (the text of the BOS token
    the GGUF's tokenizer adds itself, or ""), and the shape it was made from."""
    try:
        shape = learn(hf_render).without_prefix(bos)
        check(shape, hf_render, bos)
    except Unlearnable as err:
        raise UserError(f"the chat template cannot be written as an Ollama TEMPLATE ({err}); "
                        "the GGUF alone still carries it as tokenizer.chat_template") from err
    return go_template(shape, note), shape
