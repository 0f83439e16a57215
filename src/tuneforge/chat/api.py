"""The OpenAI chat-completions protocol as pure functions: a request body in, validated
parameters out; replies and stream chunks in the shapes every client expects."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tuneforge.models.generate import Sampling

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error the client caused: an HTTP status and an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    base: bool  # answer with the adapter switched off
    model: str


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", "messages")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number from {low} to {high}", key)
    return float(value)


def parse_request(raw: bytes, served: str, base_name: str | None, max_tokens_limit: int) -> ChatRequest:
    """Validate a /v1/chat/completions body. SERVED is the model id; BASE_NAME the id that asks
    for the base model (when an adapter is loaded)."""
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        clean.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}]")})
    if clean[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    model = body.get("model") or served
    if model not in (served, base_name):
        names = served + (f", {base_name}" if base_name else "")
        raise ApiError(404, f"model '{model}' is not served here; models: {names}", "model", "not_found_error")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = int(_number({"max_tokens": max_tokens}, "max_tokens", min(512, max_tokens_limit), 1,
                             max_tokens_limit))
    sampling = Sampling(max_new_tokens=max_tokens,
                        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                        repetition_penalty=1.0 + _number(body, "frequency_penalty", 0.0, 0.0, 2.0) / 10)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    return ChatRequest(clean, sampling, stream, base=model == base_name and base_name is not None, model=model)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def reply_body(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None) -> bytes:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
