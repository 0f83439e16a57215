"""The OpenAI protocol as pydantic models: request bodies validated (an unknown or unsupported
field is a 400 that names it, never silently ignored), and the reply and stream-chunk shapes
every client expects."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error the client caused: an HTTP status and an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class _Body(BaseModel):
    # forbid: a field we do not implement must be refused by name, not dropped
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted and unused: it only labels a speaker

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _Sampled(_Body):
    """The sampling fields /v1/chat/completions and /v1/completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # 0 (greedy), not OpenAI's 1: a served assistant answers the same question the same way
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    user: str | None = None  # accepted and unused: it only identifies the caller

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} must be from -100 to 100")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # refused below with a 400 naming them: accepted here only so the message can say why
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _last_is_users(cls, value: list[Message]) -> list[Message]:
        if value and value[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return value

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's own default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict[str, Any]) -> tuple[str, str | None]:
    """One error of a pydantic ValidationError as (message, the top-level field it is about)."""
    loc = tuple(p for p in err["loc"] if p not in ("str", "list[TextPart]", "function-after[_last_is_users(), list[Message]]"))
    field = str(loc[0]) if loc else None
    where = _where(loc)
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON: {err['msg']}", None
    if err["type"] == "model_type" and not loc:
        return "the request body must be a JSON object", None
    if err["type"] == "extra_forbidden":
        return f"'{where}' is not supported by this server", field
    if where == "messages" and err["type"] in ("missing", "too_short", "list_type"):
        return "'messages' is required: a non-empty list of {role, content}", field
    if where.endswith(".role"):
        return f"{where} must be one of {', '.join(ROLES)}", field
    if err["type"] == "missing":
        return f"'{where}' is required", field
    return f"'{where}': {err['msg'].removeprefix('Value error, ')}", field


def parse(model: type[_Body], raw: bytes) -> Any:
    """RAW validated into MODEL; the first error as a 400 naming its field."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as err:
        message, field = _message(err.errors()[0])
        raise ApiError(400, message, field) from None


def refuse_unsupported(request: ChatRequest) -> None:
    """The fields we parse but do not implement: a 400 naming each, never ignored."""
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        raise ApiError(400, f"response_format type '{fmt.type}' is not supported by this server "
                            "(no constrained decoding); only 'text'", "response_format")
    if request.tools:
        raise ApiError(400, "'tools' is not supported by this server (no tool-call parsing)", "tools")
    if request.tool_choice not in (None, "none"):
        raise ApiError(400, "'tool_choice' is not supported by this server", "tool_choice")


def one_prompt(request: CompletionRequest) -> str:
    """The one prompt of a /v1/completions request; what we do not implement refused by name."""
    if request.echo:
        raise ApiError(400, "'echo' is not supported by this server", "echo")
    if len(request.prompts()) != 1:
        raise ApiError(400, "'prompt' must be one string here (a list of one is fine)", "prompt")
    return request.prompts()[0]


def completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(cid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_body(cid: str, model: str, choices: list[dict], prompt_tokens: int,
                    completion_tokens: int, chunk: bool = False) -> dict:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if not chunk:
        body["usage"] = usage(prompt_tokens, completion_tokens)
    return body
