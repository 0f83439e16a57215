"""`tuneforge serve`: an OpenAI-compatible API and a chat web page, one ASGI app (FastAPI) served
by uvicorn.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events through sse-starlette, or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text) and the page at ``/``. Every error, the server's own included, is an
OpenAI-shaped JSON body; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from tuneforge.chat import api
from tuneforge.chat.worker import BASE, Job, Params, Worker

MAX_BODY = 1 << 20  # bytes
BODY_TIMEOUT = 30.0  # seconds to receive a whole body: a client that sends less never holds a slot
MAX_URL = 8 * 1024  # bytes of path and query
MAX_HEADERS = 16 * 1024  # bytes of all headers
PING = 10.0  # seconds between SSE comments, so proxies keep a waiting stream open
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request looks for its client having gone


@dataclass
class Served:
    worker: Worker
    name: str  # the model id clients ask for
    base_name: str | None  # the id of the base model (adapter off), when an adapter is loaded
    api_key: str | None
    max_tokens: int
    cors_origins: list[str] = field(default_factory=list)
    body_timeout: float = BODY_TIMEOUT
    # model id -> the adapter it answers with (None: the model as loaded; BASE: adapter off; else a
    # peft adapter name); by default NAME, and NAME:base when an adapter is loaded
    routes: dict[str, str | None] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=lambda: [0.0, 0])  # sum of seconds, count

    def __post_init__(self) -> None:
        if not self.routes:
            self.routes = {self.name: None, **({self.base_name: BASE} if self.base_name else {})}

    def models(self) -> list[str]:
        return list(self.routes)

    def parent(self, model: str) -> str | None:
        """The base model's id for a model that is an adapter on it, else None (vLLM's `parent` in
        /v1/models, so that a client can tell adapters from their base and pair them)."""
        base = next((m for m, adapter in self.routes.items() if adapter == BASE), None)
        return None if self.routes[model] == BASE else base


def _error(err: api.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_KINDS = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          408: "invalid_request_error", 413: "invalid_request_error", 503: "server_busy"}


async def _body(request: Request, timeout: float) -> bytes:
    """The whole body, within MAX_BODY bytes and TIMEOUT seconds."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise api.ApiError(413 if length.isdigit() else 400,
                           f"the request body is over {MAX_BODY} bytes" if length.isdigit() else "bad Content-Length header")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise api.ApiError(413, f"the request body is over {MAX_BODY} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise api.ApiError(408, f"the request body did not arrive within {timeout:g} s") from None


def _params(req: api.ChatRequest | api.CompletionRequest, limit: int) -> Params:
    wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
    field_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if wanted is not None and wanted > limit:
        raise api.ApiError(400, f"'{field_name}' must be at most {limit} (--max-tokens)", field_name)
    logprobs = req.logprobs
    top = req.top_logprobs or 0 if isinstance(req, api.ChatRequest) else (logprobs or 0)
    if isinstance(req, api.ChatRequest) and top and not logprobs:
        raise api.ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return Params(max_tokens=wanted or min(512, limit), temperature=req.temperature, top_p=req.top_p,
                  stops=tuple(req.stops()), seed=req.seed, presence_penalty=req.presence_penalty,
                  frequency_penalty=req.frequency_penalty,
                  logit_bias=tuple((req.logit_bias or {}).items()), logprobs=logprobs is not None and logprobs is not False,
                  top_logprobs=top)


class _Stream:
    """A job's events, handed from the generating thread to the request's event loop."""

    def __init__(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple] = asyncio.Queue()
        self.job, self.open = job, job.n

        def sink(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop has closed (the server stopping): nobody to tell
                job.cancelled.set()

        job.sink = sink

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple]:
        """Each event until every choice has ended. With REQUEST (a client not streaming), a
        disconnect is noticed while waiting and cancels the job."""
        checked = time.monotonic()
        try:
            while self.open:
                try:
                    event = await asyncio.wait_for(self.queue.get(), DISCONNECT_CHECK_S)
                except TimeoutError:
                    event = None
                # checked on a clock, not only when idle: while tokens flow the queue never times out
                if request is not None and time.monotonic() - checked >= DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event[0] == "error":
                    raise event[1]
                if event[0] == "end":
                    self.open -= 1
                yield event
        finally:
            self.job.cancelled.set()  # a no-op once all ended; otherwise the client has gone


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class _Limits:
    """414 and 431 as JSON. uvicorn refuses only what arrives incomplete over its buffer; a whole
    oversized request in one read reaches the app and is refused here (plain ASGI, so streams and
    disconnects pass through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = None
            if len(scope.get("raw_path") or b"") + len(scope["query_string"]) > MAX_URL:
                refusal = api.ApiError(414, f"the URL is over {MAX_URL} bytes")
            elif sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADERS:
                refusal = api.ApiError(431, f"the request headers are over {MAX_HEADERS} bytes")
            if refusal is not None:
                return await _error(refusal)(scope, receive, send)
        await self.app(scope, receive, send)


def _http_error_body(request: Request, err: HTTPException) -> api.ApiError:
    """Starlette's own errors (no route, wrong method) in OpenAI's shape."""
    if err.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif err.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(err.detail)
    return api.ApiError(err.status_code, message, kind=_KINDS.get(err.status_code, "invalid_request_error"),
                        headers=dict(err.headers or {}))


def _authorise(served: Served, request: Request) -> None:
    if not served.api_key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
        raise api.ApiError(401, "wrong or missing API key (Authorization: Bearer KEY)", kind="authentication_error")


def _route(served: Served, model: str | None) -> tuple[str, str | None]:
    """The model id asked for (the first served when none) and the adapter it answers with."""
    model = model or served.name
    if model not in served.routes:
        raise api.ApiError(404, f"model '{model}' is not served here; models: {', '.join(served.models())}",
                           "model", "not_found_error")
    return model, served.routes[model]


def _cors(app: FastAPI, origins: list[str]) -> None:
    """Pages from ORIGINS may call the API; none by default (a page elsewhere must not use a
    model on this machine through its visitor's browser)."""
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])


def create_app(served: Served) -> FastAPI:
    """The ASGI app serving SERVED."""
    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("tuneforge.chat").joinpath("page.html").read_bytes()
    worker = served.worker
    _cors(app, served.cors_origins)

    app.add_middleware(_Limits)
    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, err: api.ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(_http_error_body(request, err))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        return _error(api.ApiError(500, f"the server failed: {type(err).__name__}: {err}", kind="server_error"))

    def authorise(request: Request) -> None:
        _authorise(served, request)

    def adapter_for(model: str | None) -> tuple[str, str | None]:
        return _route(served, model)

    @app.get("/", response_class=HTMLResponse)
    @app.get("/index.html", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "waiting": worker.queued(), "running": worker.stats.running}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(served), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorise(request)
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "tuneforge",
                                            "parent": served.parent(m)} for m in served.models()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorise(request)
        req = api.parse(api.ChatRequest, await _body(request, served.body_timeout))
        api.refuse_unsupported(req)
        model, adapter = adapter_for(req.model)
        messages = req.chat()
        prompt = await asyncio.to_thread(worker.chat_prompt, messages)
        job = Job(prompt, _params(req, served.max_tokens), messages[-1]["content"], messages, req.n, adapter)
        stream = _Stream(job)
        worker.submit(job)
        cid = api.completion_id()
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return EventSourceResponse(_chat_events(served, stream, cid, model, usage), ping=PING, sep="\n")
        return JSONResponse(await _chat_reply(served, stream, request, cid, model))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorise(request)
        req = api.parse(api.CompletionRequest, await _body(request, served.body_timeout))
        text = api.one_prompt(req)
        model, adapter = adapter_for(req.model)
        prompt = await asyncio.to_thread(worker.text_prompt, text)
        job = Job(prompt, _params(req, served.max_tokens), text, None, req.n, adapter)
        stream = _Stream(job)
        worker.submit(job)
        cid = api.completion_id("cmpl-")
        if req.stream:
            return EventSourceResponse(_completion_events(served, stream, cid, model), ping=PING, sep="\n")
        return JSONResponse(await _completion_reply(served, stream, request, cid, model))

    return app


def _first_token(served: Served, job: Job) -> None:
    served.ttft[0] += time.monotonic() - job.arrived
    served.ttft[1] += 1


async def _chat_reply(served: Served, stream: _Stream, request: Request, cid: str, model: str) -> dict:
    texts: dict[int, str] = {}
    logprobs: dict[int, list] = {}
    choices: dict[int, dict] = {}
    tokens, first = 0, True
    async for event in stream.events(request):
        if event[0] == "piece":
            if first:
                _first_token(served, stream.job)
                first = False
            texts[event[1]] = texts.get(event[1], "") + event[2]
            logprobs.setdefault(event[1], []).extend(event[3])
        elif event[0] == "end":
            _, i, reply, reason = event
            tokens += reply.completion_tokens
            choices[i] = {"index": i, "message": {"role": "assistant", "content": reply.text},
                          "logprobs": {"content": logprobs.get(i, [])} if stream.job.params.logprobs else None,
                          "finish_reason": _finish(reason)}
    if stream.open:  # the client went away: nobody to answer
        return {}
    return api.chat_body(cid, model, [choices[i] for i in sorted(choices)], len(stream.job.prompt), tokens)


async def _chat_events(served: Served, stream: _Stream, cid: str, model: str, usage: bool) -> AsyncIterator[str]:
    job = stream.job
    tokens, first = 0, True
    yield json.dumps(api.chat_chunk(cid, model, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None} for i in range(job.n)]), ensure_ascii=False)
    try:
        async for event in stream.events():
            if event[0] == "piece":
                if first:
                    _first_token(served, job)
                    first = False
                choice: dict[str, Any] = {"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}
                if job.params.logprobs:
                    choice["logprobs"] = {"content": event[3]}
                yield json.dumps(api.chat_chunk(cid, model, [choice]), ensure_ascii=False)
            elif event[0] == "end":
                tokens += event[2].completion_tokens
                yield json.dumps(api.chat_chunk(cid, model, [{"index": event[1], "delta": {},
                                                              "finish_reason": _finish(event[3])}]))
    except Exception as err:  # noqa: BLE001 - the stream has begun: the error goes in it
        yield json.dumps(api.ApiError(500, f"generation failed: {err}", kind="server_error").body())
    else:
        if usage:
            yield json.dumps(api.chat_chunk(cid, model, [], api.usage(len(job.prompt), tokens)))
    yield "[DONE]"


async def _completion_reply(served: Served, stream: _Stream, request: Request, cid: str, model: str) -> dict:
    texts: dict[int, str] = {}
    choices: dict[int, dict] = {}
    lps: dict[int, list] = {}
    tokens = 0
    async for event in stream.events(request):
        if event[0] == "piece":
            texts[event[1]] = texts.get(event[1], "") + event[2]
            lps.setdefault(event[1], []).extend(event[3])
        elif event[0] == "end":
            _, i, reply, reason = event
            tokens += reply.completion_tokens
            choices[i] = {"index": i, "text": texts.get(i, ""), "finish_reason": _finish(reason),
                          "logprobs": _legacy_logprobs(lps.get(i, [])) if stream.job.params.logprobs else None}
    if stream.open:
        return {}
    return api.completion_body(cid, model, [choices[i] for i in sorted(choices)], len(stream.job.prompt), tokens)


def _legacy_logprobs(entries: list[dict]) -> dict:
    """/v1/completions' older log-probability shape."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _completion_events(served: Served, stream: _Stream, cid: str, model: str) -> AsyncIterator[str]:
    try:
        async for event in stream.events():
            if event[0] == "piece":
                choice = {"index": event[1], "text": event[2], "finish_reason": None, "logprobs": None}
            elif event[0] == "end":
                choice = {"index": event[1], "text": "", "finish_reason": _finish(event[3]), "logprobs": None}
            else:
                continue
            yield json.dumps(api.completion_body(cid, model, [choice], 0, 0, chunk=True), ensure_ascii=False)
    except Exception as err:  # noqa: BLE001
        yield json.dumps(api.ApiError(500, f"generation failed: {err}", kind="server_error").body())
    yield "[DONE]"


def _metrics(served: Served) -> str:
    s = served.worker.stats
    ttft_sum, ttft_n = served.ttft
    lines = [
        ("tuneforge_requests_total", "counter", "requests admitted to the queue", s.requests),
        ("tuneforge_requests_dropped_total", "counter", "queued requests whose client left first", s.dropped),
        ("tuneforge_queue_length", "gauge", "requests waiting", served.worker.queued()),
        ("tuneforge_running_rows", "gauge", "rows in the current decoding step", s.running),
        ("tuneforge_generated_tokens_total", "counter", "tokens generated", s.generated),
        ("tuneforge_tokens_per_second", "gauge", "tokens generated per second of decoding",
         s.generated / s.busy_s if s.busy_s else 0.0),
    ]
    out = []
    for name, kind, doc, value in lines:
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    out += ["# HELP tuneforge_time_to_first_token_seconds from arrival to the first piece",
            "# TYPE tuneforge_time_to_first_token_seconds summary",
            f"tuneforge_time_to_first_token_seconds_sum {ttft_sum}",
            f"tuneforge_time_to_first_token_seconds_count {ttft_n}"]
    return "\n".join(out) + "\n"


class Http:
    """uvicorn serving the app on a socket bound at once (so a busy port is an error before the
    model loads anything else, and port 0 tells its number), in the shape of http.server's
    serve_forever / shutdown / server_close."""

    def __init__(self, served: Served, host: str, port: int, max_connections: int | None = None) -> None:
        import uvicorn

        from tuneforge.chat.protocol import JsonErrorsH11

        try:
            self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                             backlog=256)
        except OSError as err:
            from tuneforge.errors import UserError

            raise UserError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port") from None
        self.server_port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(served), http=JsonErrorsH11, log_level="warning",
                                timeout_keep_alive=30, limit_concurrency=max_connections,
                                h11_max_incomplete_event_size=16 * 1024)
        self.server = uvicorn.Server(config)
        self.stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.stopped.wait(30)

    def server_close(self) -> None:
        self.sock.close()


def make_server(served: Served, host: str, port: int, max_connections: int | None = None) -> Http:
    """The server, bound and ready for ``serve_forever`` (port 0: any free port)."""
    return Http(served, host, port, max_connections)


def serve(served: Served, host: str, port: int) -> None:
    httpd = make_server(served, host, port)
    print(f"[tuneforge] serving {', '.join(served.models())} on http://{host}:{httpd.server_port}/ "
          f"(OpenAI API at /v1; Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
