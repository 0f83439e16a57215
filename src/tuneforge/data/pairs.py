"""Preference records (a prompt, a chosen and a rejected answer) -> pairs of conversations.

Formats, detected per record (the keys say which):
- LLaMA-Factory, alpaca style: ``{"instruction", "input"?, "chosen": str, "rejected": str, "system"?,
  "history"?}``
- LLaMA-Factory, ShareGPT style: ``{"conversations": [...], "chosen": {"from": "gpt", "value"},
  "rejected": {...}}`` (its OpenAI style: ``"messages"`` with ``{"role", "content"}`` answers)
- TRL: ``{"prompt": str, "chosen": str, "rejected": str}``, or conversational with lists of
  ``{"role", "content"}``; without ``"prompt"``, chosen and rejected are whole conversations and
  their common beginning is the prompt (TRL's implicit prompt), also when a ``"prompt"`` string
  beside them repeats the question (ultrafeedback_binarized-style sets)
- ms-swift: ``{"messages": [..., {"role": "assistant", "content": chosen}], "rejected_response"}``
  (and its older ``{"query", "response", "rejected_response", "history"?}``)
- XTuner: ``{"chosen_conversations": [...], "rejected_conversations": [...]}`` in ShareGPT turns;
  the two may differ before their last answer. XTuner 0.x's own DPO records are TRL's
  conversational ones, and its orpo_dpo_mix_40k_map_fn reads TRL's implicit ones.

Each side becomes a whole conversation whose last answer (the completion) is trained and whose
earlier turns are context only, so that everything the pair shares is never learned.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tuneforge.data.formats import (
    _ROLES,
    _SHAREGPT_ROLES,
    Message,
    Source,
    _answer,
    _from_list,
    _one_message,
    _system_and_history,
    _text,
    _type_name,
    iter_records,
    no_records,
)
from tuneforge.errors import UserError

PAIR_FORMATS = ("llamafactory", "llamafactory-sharegpt", "llamafactory-messages", "trl", "trl-conversational",
                "trl-implicit", "swift", "swift-query", "xtuner")


@dataclass(frozen=True)
class Pair:
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    where: str  # "file:line", for error messages


def detect_pair_format(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {_type_name(record)}")
    if "chosen_conversations" in record or "rejected_conversations" in record:
        return "xtuner"
    if "rejected_response" in record:
        return "swift" if "messages" in record else "swift-query"
    if "chosen" in record or "rejected" in record:
        if "conversations" in record:
            return "llamafactory-sharegpt"
        if "messages" in record:
            return "llamafactory-messages"
        if "instruction" in record:
            return "llamafactory"
        if "prompt" in record and not _whole_conversations(record):
            return "trl" if isinstance(record["prompt"], str) else "trl-conversational"
        return "trl-implicit"
    raise UserError(
        f"{where}: not a preference pair (keys: {', '.join(sorted(record)) or 'none'}); expected a chosen "
        "and a rejected answer: 'chosen'/'rejected' (LLaMA-Factory, TRL), 'rejected_response' (ms-swift) "
        "or 'chosen_conversations'/'rejected_conversations' (XTuner); objective='sft' trains plain records")


def _whole_conversations(record: dict) -> bool:
    """A string prompt beside chosen and rejected conversations that hold the question themselves,
    as ultrafeedback_binarized-style sets keep it (mlabonne/orpo-dpo-mix-40k, argilla's, H4's): the
    conversations are the pair and the string only repeats the question (XTuner's
    orpo_dpo_mix_40k_map_fn drops it too)."""
    chosen = record.get("chosen")
    return isinstance(record.get("prompt"), str) and isinstance(chosen, list) and any(
        isinstance(m, dict) and m.get("role") == "user" for m in chosen)


def _context(messages: list[Message]) -> list[Message]:
    """MESSAGES as a prompt: answers in it are context, not learned."""
    return [Message(m.role, m.content, False, m.truncated, m.tool_calls, m.tools) if m.role == "assistant" else m
            for m in messages]


def _completion(messages: list[Message], where: str, field: str) -> list[Message]:
    if not messages or messages[-1].role != "assistant":
        raise UserError(f"{where}: {field}: expected the answer last (an assistant message)")
    return messages


def _both(record: dict, where: str, key: str, read: Any) -> tuple[Any, Any]:
    if key.format("chosen") not in record or key.format("rejected") not in record:
        missing = key.format("chosen") if key.format("chosen") not in record else key.format("rejected")
        raise UserError(f"{where}: {missing}: missing; a preference pair needs a chosen and a rejected answer")
    return read(key.format("chosen")), read(key.format("rejected"))


def _answer_text(record: dict, key: str, where: str, role_key: str, text_key: str) -> str:
    """A pair's answer as a string, or as one message object ``{role_key: ..., text_key: ...}``."""
    value = record[key]
    if isinstance(value, dict) and role_key not in value:
        raise UserError(f'{where}: {key}: expected the answer as a string or as {{"{role_key}": ..., "{text_key}": ...}}, '
                        f"got an object with keys {', '.join(map(repr, value)) or 'none'}")
    if isinstance(value, dict):
        msg = _one_message(value, where, key, role_key, text_key, _SHAREGPT_ROLES if role_key == "from" else _ROLES)
        if msg.role != "assistant":
            raise UserError(f"{where}: {key}.{role_key}: expected the assistant's answer, got {value.get(role_key)!r}")
        return msg.content
    return _answer(record, key, where, key)


def _with_answers(prompt: list[Message], record: dict, where: str, role_key: str = "role",
                  text_key: str = "content") -> tuple[list[Message], list[Message]]:
    chosen, rejected = _both(record, where, "{}", lambda k: _answer_text(record, k, where, role_key, text_key))
    prompt = _context(prompt)
    return prompt + [Message("assistant", chosen)], prompt + [Message("assistant", rejected)]


def _prompt_list(record: dict, where: str, key: str, role_key: str, text_key: str,
                 roles: dict[str, str]) -> list[Message]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {key}: expected a non-empty list of messages")
    out = [_one_message(m, where, f"{key}[{i}]", role_key, text_key, roles) for i, m in enumerate(turns)]
    if out[-1].role == "assistant":
        raise UserError(f"{where}: {key}: the prompt ends with an answer; chosen and rejected answer its last "
                        "user message")
    return out


def _messages_of(value: Any, where: str, field: str) -> list[Message]:
    """TRL's conversational completion or whole conversation: a list of messages."""
    return _from_list(value, where, field, "role", "content", _ROLES)


def _implicit(record: dict, where: str) -> tuple[list[Message], list[Message]]:
    """TRL's implicit prompt: two whole conversations; what they share up front is context."""
    chosen, rejected = _both(record, where, "{}", lambda k: _messages_of(record[k], where, k))
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return (_context(chosen[:shared]) + _completion(chosen[shared:], where, "chosen"),
            _context(rejected[:shared]) + _completion(rejected[shared:], where, "rejected"))


def _xtuner(record: dict, where: str) -> tuple[list[Message], list[Message]]:
    def side(key: str) -> list[Message]:
        msgs = _from_list(record[key], where, key, "from", "value", _SHAREGPT_ROLES)
        msgs = _completion(msgs, where, key)
        return _context(msgs[:-1]) + msgs[-1:]
    return _both(record, where, "{}_conversations", side)


def _sides(record: dict, fmt: str, where: str) -> tuple[list[Message], list[Message]]:
    if fmt == "xtuner":
        return _xtuner(record, where)
    if fmt == "trl-implicit":
        return _implicit(record, where)
    if fmt == "trl":
        prompt = _text(record, "prompt", where, "prompt")
        return _with_answers([Message("user", prompt)], record, where)
    if fmt == "trl-conversational":
        prompt = _prompt_list(record, where, "prompt", "role", "content", _ROLES)
        chosen, rejected = _both(record, where, "{}", lambda k: _completion(
            _messages_of(record[k], where, k), where, k))
        return _context(prompt) + chosen, _context(prompt) + rejected
    if fmt == "llamafactory":
        instruction = _text(record, "instruction", where, "instruction", required=False)
        extra = _text(record, "input", where, "input", required=False)
        question = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
        if not question.strip():
            raise UserError(f"{where}: instruction: empty; expected the question text")
        return _with_answers(_system_and_history(record, where) + [Message("user", question)], record, where)
    if fmt == "llamafactory-sharegpt":
        prompt = _prompt_list(record, where, "conversations", "from", "value", _SHAREGPT_ROLES)
        return _with_answers(prompt, record, where, "from", "value")
    if fmt == "llamafactory-messages":
        return _with_answers(_prompt_list(record, where, "messages", "role", "content", _ROLES), record, where)
    if fmt == "swift":
        msgs = _completion(_from_list(record["messages"], where, "messages", "role", "content", _ROLES),
                           where, "messages")
        rejected = _answer(record, "rejected_response", where, "rejected_response")
        prompt = _context(msgs[:-1])
        return prompt + msgs[-1:], prompt + [Message("assistant", rejected)]
    if fmt == "swift-query":
        query = _text(record, "query", where, "query")
        if not query.strip():
            raise UserError(f"{where}: query: empty; expected the question text")
        prompt = _context(_system_and_history(record, where) + [Message("user", query)])
        return (prompt + [Message("assistant", _answer(record, "response", where, "response"))],
                prompt + [Message("assistant", _answer(record, "rejected_response", where, "rejected_response"))])
    raise UserError(f"unknown preference format '{fmt}'; expected one of {', '.join(PAIR_FORMATS)}")


def to_pair(record: Any, where: str, fmt: str = "auto") -> Pair:
    """One preference record as a pair of conversations."""
    if fmt == "auto":
        fmt = detect_pair_format(record, where)
    elif not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {_type_name(record)}")
    chosen, rejected = _sides(record, fmt, where)
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected are the same answer; a pair must differ to teach anything")
    return Pair(tuple(chosen), tuple(rejected), where)


def iter_pairs(path: Source, fmt: str = "auto", bad: list[str] | None = None) -> Iterator[Pair]:
    """Every pair of PATH, streamed; with BAD given, malformed records go there and are skipped."""
    empty = True
    for where, rec in iter_records(path, bad):
        empty = False
        try:
            yield to_pair(rec, where, fmt)
        except UserError as err:
            if bad is None:
                raise
            bad.append(str(err))
    if empty and not bad:
        raise no_records(path)
