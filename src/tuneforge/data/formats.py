"""Read dataset files and turn each record, whatever its format, into a list of ``Message``.

Formats (detected per record when ``data_format='auto'``):
- ``conversation`` (XTuner): ``{"conversation": [{"system"?, "input", "output", "output_with_loss"?}, ...]}``
  (tuneforge also reads ``"output_truncated": true``: an answer cut short, whose end is not learned)
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}``
- ``messages`` (OpenAI): ``{"messages": [{"role", "content", "loss"?, "tool_calls"?}, ...], "tools"?}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
  "value"}, ...], "tools"?}``
- ``swift`` (ms-swift, e.g. its self-cognition set): ``{"query", "response", "system"?, "history"?: [[q, a], ...]}``
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneforge.data.xtuner_maps import apply_map, check_map
from tuneforge.errors import UserError

FORMATS = ("alpaca", "conversation", "messages", "sharegpt", "swift")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool" (a tool's result, never trained)
    content: str
    loss: bool = True  # assistant turns only: train on this answer?
    truncated: bool = False  # assistant turns only: the answer was cut off, so its end-of-turn
    # marker is not learned (else the model learns to stop mid-answer)
    tool_calls: tuple[dict, ...] = ()  # assistant turns only: the function calls it makes, as
    # transformers' chat templates take them: {"type": "function", "function": {"name", "arguments"}}
    tools: tuple[dict, ...] = ()  # the tool definitions the chat offers, carried by its first message
    # (the template gets them as apply_chat_template(tools=...))


@dataclass(frozen=True)
class Sample:
    messages: tuple[Message, ...]
    where: str  # "file:line" (or "dataset[split]:row"), for error messages


class RecordReader(Protocol):
    """Records that come from a dataset rather than from a file we read (data/hub.py): each one
    is named "NAME[split]:ROW" where a file's would be "FILE:LINE"."""

    kind: str  # how it is read, as check-dataset reports it ("dataset", "dataset, streamed")

    def records(self) -> Iterator[tuple[str, Any]]: ...


Source = Path | RecordReader  # what a data_files entry resolves to: files, or a dataset


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _text(record: dict, key: str, where: str, field: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: {field}: missing; expected a string")
        return ""
    if isinstance(value, dict):
        # The tutorial's data generators are easy to get wrong this way: a turn's text wrapped in
        # another object. Say what was found and show the line as it should be.
        texts = [v for v in value.values() if isinstance(v, str)]
        hint = (f'; write the text itself: "{key}": {json.dumps(texts[0][:40], ensure_ascii=False)}'
                if len(texts) == 1 else f'; write the text itself as a string: "{key}": "..."')
        raise UserError(f"{where}: {field}: expected a string, got an object with keys "
                        f"{', '.join(map(repr, value)) or 'none'}{hint}")
    if not isinstance(value, str):
        raise UserError(f"{where}: {field}: expected a string, got {_type_name(value)}")
    return value


def _answer(record: dict, key: str, where: str, field: str) -> str:
    text = _text(record, key, where, field)
    if not text.strip():
        raise UserError(f"{where}: {field}: empty answer; remove the line or write the answer")
    return text


def detect_format(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {_type_name(record)}")
    if "conversation" in record:
        return "conversation"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or ("output" in record and "input" in record):
        return "alpaca"
    if "query" in record and "response" in record:
        return "swift"
    raise UserError(
        f"{where}: unknown record format (keys: {', '.join(sorted(record)) or 'none'}); expected "
        "'conversation', 'messages', 'conversations', alpaca's 'instruction'/'output', or ms-swift's "
        "'query'/'response'"
    )


def _from_conversation(record: dict, where: str) -> list[Message]:
    turns = record["conversation"]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: conversation: expected a non-empty list of turns")
    out: list[Message] = []
    for i, turn in enumerate(turns):
        field = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {field}: expected an object, got {_type_name(turn)}")
        system = _text(turn, "system", where, f"{field}.system", required=False)
        if system:
            out.append(Message("system", system))
        out.append(Message("user", _text(turn, "input", where, f"{field}.input")))
        loss = turn.get("output_with_loss", True)
        cut = turn.get("output_truncated", False)
        if not isinstance(loss, bool) or not isinstance(cut, bool):
            raise UserError(f"{where}: {field}.output_with_loss/output_truncated: expected true or false")
        out.append(Message("assistant", _answer(turn, "output", where, f"{field}.output"), loss, cut))
    return out


def _system_and_history(record: dict, where: str) -> list[Message]:
    """The optional ``system`` and ``history: [[q, a], ...]`` that alpaca and ms-swift records share;
    the history answers are trained like the last one."""
    out: list[Message] = []
    system = _text(record, "system", where, "system", required=False)
    if system:
        out.append(Message("system", system))
    history = record.get("history") or []
    if not isinstance(history, list):
        raise UserError(f"{where}: history: expected a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{where}: history[{i}]: expected [question, answer] strings")
        out += [Message("user", pair[0]), Message("assistant", pair[1])]
    return out


def _from_alpaca(record: dict, where: str) -> list[Message]:
    out = _system_and_history(record, where)
    instruction = _text(record, "instruction", where, "instruction", required=False)
    extra = _text(record, "input", where, "input", required=False)
    prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    if not prompt.strip():
        raise UserError(f"{where}: instruction: empty; expected the question text")
    out += [Message("user", prompt), Message("assistant", _answer(record, "output", where, "output"))]
    return out


def _from_swift(record: dict, where: str) -> list[Message]:
    out = _system_and_history(record, where)
    query = _text(record, "query", where, "query")
    if not query.strip():
        raise UserError(f"{where}: query: empty; expected the question text")
    return out + [Message("user", query), Message("assistant", _answer(record, "response", where, "response"))]


_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "function_call": "assistant", "observation": "tool"}


def _json_value(value: Any, where: str, field: str, expected: str) -> Any:
    """VALUE, or the JSON it holds when it is a string (tool calls and tools are often stored so)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: {field}: expected {expected} (as JSON), got invalid JSON: {err.msg}") from err


def _tool_call(call: Any, where: str, field: str) -> dict:
    """One function call, OpenAI's ``{"function": {...}}`` or ShareGPT's ``{"name", "arguments"}``."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise UserError(f'{where}: {field}: expected a function call {{"name": ..., "arguments": {{...}}}}')
    args = _json_value(fn.get("arguments", {}), where, f"{field}.arguments", "an object")
    if not isinstance(args, dict):
        raise UserError(f"{where}: {field}.arguments: expected an object, got {_type_name(args)}")
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def _tool_calls(calls: Any, where: str, field: str) -> tuple[dict, ...]:
    calls = _json_value(calls, where, field, "a function call")
    calls = calls if isinstance(calls, list) else [calls]
    return tuple(_tool_call(c, where, f"{field}[{j}]" if len(calls) > 1 else field) for j, c in enumerate(calls))


def _tools(record: dict, where: str) -> tuple[dict, ...]:
    """The record's ``tools`` column (a list, or a JSON string of one), as transformers takes it."""
    tools = _json_value(record.get("tools") or [], where, "tools", "a list of tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"{where}: tools: expected a list of tool definitions")
    return tuple(t if "function" in t else {"type": "function", "function": t} for t in tools)


# Content parts that are not text, and why each cannot be trained.
_IMAGE, _AUDIO, _VIDEO = ("image parts need a vision model", "audio parts need an audio model",
                          "video parts need a video model")
_MEDIA_PARTS = {"image_url": _IMAGE, "image": _IMAGE, "input_image": _IMAGE, "input_audio": _AUDIO,
                "audio": _AUDIO, "video": _VIDEO, "video_url": _VIDEO,
                "file": "file parts are not read (put the file's text in a text part)"}
PART_JOINER = "\n"  # between the text parts of one message, as vLLM and LangChain join them


def _join_parts(parts: list, where: str, field: str) -> str:
    """OpenAI's list form of ``content``: ``[{"type": "text", "text": ...}, ...]`` -> one string."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise UserError(f"{where}: {field}[{j}]: {_MEDIA_PARTS[kind]}; tuneforge trains text-only "
                            "models (remove the part, or the record)")
        if kind not in ("text", "refusal"):
            raise UserError(f"{where}: {field}[{j}]: unknown content part "
                            f"{kind if kind is not None else _type_name(part)!r}; expected "
                            '{"type": "text", "text": "..."}')
        texts.append(_text(part, kind, where, f"{field}[{j}].{kind}"))
    return PART_JOINER.join(texts)


def _one_message(m: Any, where: str, field: str, role_key: str, text_key: str,
                 roles: dict[str, str]) -> Message:
    if not isinstance(m, dict):
        raise UserError(f"{where}: {field}: expected an object, got {_type_name(m)}")
    raw_role = m.get(role_key)
    if raw_role not in roles:
        raise UserError(
            f"{where}: {field}.{role_key}: unknown role {raw_role!r}; expected one of "
            + ", ".join(sorted(roles))
        )
    role = roles[raw_role]
    loss = m.get("loss", True)
    if not isinstance(loss, bool):
        raise UserError(f"{where}: {field}.loss: expected true or false")
    if raw_role == "function_call":  # ShareGPT: the call is the turn's text
        return Message(role, "", loss, tool_calls=_tool_calls(m.get(text_key), where, f"{field}.{text_key}"))
    calls = (_tool_calls(m["tool_calls"], where, f"{field}.tool_calls")
             if role == "assistant" and m.get("tool_calls") else ())
    if isinstance(m.get(text_key), list):
        m = {text_key: _join_parts(m[text_key], where, f"{field}.{text_key}")}
    if calls:  # an assistant turn that calls tools may say nothing
        return Message(role, _text(m, text_key, where, f"{field}.{text_key}", required=False), loss,
                       tool_calls=calls)
    text = _answer(m, text_key, where, f"{field}.{text_key}") if role == "assistant" else \
        _text(m, text_key, where, f"{field}.{text_key}")
    return Message(role, text, loss)


def _from_list(turns: Any, where: str, key: str, role_key: str, text_key: str,
               roles: dict[str, str]) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {key}: expected a non-empty list of messages")
    out = [_one_message(m, where, f"{key}[{i}]", role_key, text_key, roles) for i, m in enumerate(turns)]
    if not any(m.role == "assistant" for m in out):
        raise UserError(f"{where}: {key}: no assistant message to learn from")
    return out


def _with_tools(messages: list[Message], record: dict, where: str) -> list[Message]:
    tools = _tools(record, where)
    if tools:
        first = messages[0]
        messages[0] = Message(first.role, first.content, first.loss, first.truncated, first.tool_calls, tools)
    return messages


_MEDIA_KEYS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}  # LLaMA-Factory, ms-swift


def _refuse_untrainable(record: dict, where: str) -> None:
    """Records of a kind tuneforge cannot train, which would otherwise train silently wrong."""
    for key in ("label", "kto_tag"):  # LLaMA-Factory's KTO data (kto_en_demo.json: "label")
        if isinstance(record.get(key), bool) or (key == "kto_tag" and key in record):
            raise UserError(
                f"{where}: {key}: a KTO record (each answer labelled good or bad); tuneforge has no "
                f"KTO training (DPO, ORPO, SimPO train on pairs), and a {key}: false answer would be learned as a good "
                f"one; to train the good answers as plain examples, drop the {key}: false records and "
                f"the {key} field")
    pair = next((k for k in ("rejected", "rejected_response", "rejected_conversations") if k in record), None)
    if pair:
        raise UserError(f"{where}: {pair}: a preference pair (a chosen and a rejected answer); objective='sft' "
                        "would learn the rejected answer or drop it silently; train pairs with objective='dpo' "
                        "(or 'orpo', 'simpo'): docs/preference.md")
    for key, placeholder in _MEDIA_KEYS.items():
        media = record.get(key)
        if media:
            count = len(media) if isinstance(media, list) else 1
            raise UserError(
                f"{where}: {key}: a multimodal record ({count} {key[:-1]}{'s' if count != 1 else ''}); "
                f"tuneforge trains text-only models, and the {placeholder} placeholders would be learned "
                f"as literal text; remove the record, or its {key} and {placeholder} placeholders")


def to_messages(record: Any, fmt: str, where: str) -> list[Message]:
    """Convert one record to messages; ``fmt`` is a format name or 'auto'."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {_type_name(record)}")
    _refuse_untrainable(record, where)
    if fmt.endswith("_map_fn"):  # an XTuner config's dataset_map_fn: the record as it maps it
        mapped = apply_map(fmt, record, where)
        return _from_conversation(mapped, where) if mapped["conversation"] else []  # [] : XTuner drops it
    if fmt == "auto":
        fmt = detect_format(record, where)
    if fmt == "conversation":
        return _from_conversation(record, where)
    if fmt == "alpaca":
        return _from_alpaca(record, where)
    if fmt == "swift":
        return _from_swift(record, where)
    if fmt == "messages":
        return _with_tools(_from_list(record.get("messages"), where, "messages", "role", "content", _ROLES),
                           record, where)
    if fmt == "sharegpt":
        return _with_tools(_from_list(record.get("conversations"), where, "conversations", "from", "value",
                                      _SHAREGPT_ROLES), record, where)
    raise UserError(f"unknown data_format '{fmt}'; expected auto or one of {', '.join(FORMATS)}, "
                    "or an XTuner dataset_map_fn name")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from err
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def _first_char(path: Path) -> str:
    """The first non-blank character of a text file ('' when it is blank)."""
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _json_list_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, or one JSON object per line")
    for i, record in enumerate(data):
        yield f"{path}:[{i}]", record


def _refuse_spread_object(path: Path) -> None:
    """A .json that is one object written over several lines is neither a list nor JSON Lines."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return  # JSON Lines with a bad first line: reported line by line
        if isinstance(whole, dict):
            raise UserError(f"{path}: one JSON object over several lines; expected a JSON list of "
                            "records, or one JSON object per line") from None


def _json_lines_records(path: Path, bad: list[str] | None) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})"
                if bad is None:
                    raise UserError(msg) from err
                bad.append(msg)
                continue
            yield f"{path}:{lineno}", record


def file_kind(path: Source) -> str:
    """How ``iter_records`` reads PATH: "Parquet", "JSON list" or "JSON Lines" (or the dataset's kind)."""
    if not isinstance(path, Path):
        return path.kind
    if path.suffix == ".parquet":
        return "Parquet"
    return "JSON list" if path.suffix == ".json" and _first_char(path) == "[" else "JSON Lines"


def iter_records(path: Source, bad: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", record)`` for a .jsonl file (or a .json list, or .parquet rows), or
    ``("NAME[split]:ROW", record)`` for a dataset's rows.

    A ``.json`` file is read by what it holds, as ``datasets.load_dataset('json')`` does: one JSON
    list of records (``"file:[i]"``), or JSON Lines like a .jsonl file. A JSON Lines line of invalid
    JSON raises, or, with BAD given, is recorded there and skipped.
    """
    if not isinstance(path, Path):
        yield from path.records()
        return
    kind = file_kind(path)
    if kind == "Parquet":
        yield from _parquet_records(path)
    elif kind == "JSON list":
        yield from _json_list_records(path)
    else:
        if path.suffix == ".json":
            _refuse_spread_object(path)
        yield from _json_lines_records(path, bad)


# XTuner trains these records' text whole, with no chat template (template_map_fn=None)
RAW_TEXT_MAP_FNS = ("pretrain_map_fn", "completion_map_fn")


def check_format(fmt: str, path: Source) -> None:
    """A format that cannot read PATH at all stops before its first record (not once per line)."""
    if not fmt.endswith("_map_fn"):
        return
    try:
        name = check_map(fmt)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if name in RAW_TEXT_MAP_FNS:
        raise UserError(f"{path}: dataset_map_fn={name}: XTuner trains these records as raw text without a "
                        "chat template (continued pre-training); tuneforge trains chat turns only so far: "
                        "write the data as conversation records instead")


def no_records(path: Source) -> UserError:
    return UserError(f"{path}: no records; the file is empty" if isinstance(path, Path)
                     else f"{path}: no records; the split is empty")


def iter_samples(path: Source, fmt: str = "auto", bad: list[str] | None = None) -> Iterator[Sample]:
    """Every sample of PATH, streamed. With BAD given, malformed records are appended there and
    skipped; without it the first one raises. A record an XTuner map function maps to nothing
    is skipped, as XTuner skips it."""
    check_format(fmt, path)
    empty = True
    for where, rec in iter_records(path, bad):
        try:
            messages = to_messages(rec, fmt, where)
            empty = False
            if messages:
                yield Sample(tuple(messages), where)
        except UserError as err:
            if bad is None:
                raise
            bad.append(str(err))
    if empty and not bad:
        raise no_records(path)


def load_samples(path: Source, fmt: str = "auto", bad: list[str] | None = None) -> list[Sample]:
    return list(iter_samples(path, fmt, bad))
