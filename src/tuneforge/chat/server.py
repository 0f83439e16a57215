"""`tuneforge serve`: an OpenAI-compatible chat server and a chat web page, in one process.

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events, or not), ``GET
/v1/models``, ``GET /health`` and the page at ``/``. Every client error is a 4xx with an
OpenAI-shaped JSON body; the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from tuneforge.chat import api
from tuneforge.chat.worker import Worker
from tuneforge.models.generate import Reply

MAX_BODY = 1 << 20  # bytes


@dataclass
class Served:
    worker: Worker
    name: str  # the model id clients ask for
    base_name: str | None  # the id of the base model (adapter off), when an adapter is loaded
    api_key: str | None
    max_tokens: int

    def models(self) -> list[str]:
        return [self.name] + ([self.base_name] if self.base_name else [])


class _Handler(BaseHTTPRequestHandler):
    """One request to the server; make_handler gives it what is served (a class attribute, since
    http.server makes a handler per request and passes it only the request and the server)."""

    served: Served
    page: bytes  # the chat page, read once
    server_version = "tuneforge"
    protocol_version = "HTTP/1.0"  # one response per connection; a stream ends when it closes

    def log_message(self, fmt: str, *args: Any) -> None:  # one short line per request
        print(f"[tuneforge] {self.address_string()} {fmt % args}", flush=True)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode())

    def _authorised(self) -> bool:
        if not self.served.api_key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.served.api_key}".encode())

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self._send(200, self.page, "text/html; charset=utf-8")
        elif path == "/health":
            self._json(200, {"status": "ok", "model": self.served.name, "waiting": self.served.worker.jobs.qsize()})
        elif path == "/v1/models":
            if not self._authorised():
                return self._json(401, api.ApiError(401, "wrong or missing API key", kind="authentication_error").body())
            now = int(time.time())
            self._json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": now, "owned_by": "tuneforge"} for m in self.served.models()]})
        else:
            self._json(404, api.ApiError(404, f"no such endpoint: GET {path}", kind="not_found_error").body())

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:
            if path != "/v1/chat/completions":
                raise api.ApiError(404, f"no such endpoint: POST {path}", kind="not_found_error")
            if not self._authorised():
                raise api.ApiError(401, "wrong or missing API key (Authorization: Bearer KEY)",
                                   kind="authentication_error")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise api.ApiError(413, f"the request body is over {MAX_BODY} bytes")
            request = api.parse_request(self.rfile.read(length), self.served.name, self.served.base_name,
                                        self.served.max_tokens)
            job = self.served.worker.submit(request)
        except api.ApiError as err:
            return self._json(err.status, err.body())
        except ValueError:
            return self._json(400, api.ApiError(400, "bad Content-Length header").body())
        cid = api.completion_id()
        if request.stream:
            self._stream(job, cid, request.model)
        else:
            text, reply = self._collect(job)
            if isinstance(reply, Exception):
                return self._json(500, api.ApiError(500, f"generation failed: {reply}", kind="server_error").body())
            self._json(200, api.reply_body(cid, request.model, reply.text, _finish(reply),
                                           reply.prompt_tokens, reply.completion_tokens))

    def _collect(self, job: Any) -> tuple[str, Reply | Exception]:
        parts = []
        while True:
            item = job.pieces.get()
            if isinstance(item, str):
                parts.append(item)
            else:
                return "".join(parts), item

    def _stream(self, job: Any, cid: str, model: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self.wfile.write(api.chunk(cid, model, {"role": "assistant", "content": ""}))
            self.wfile.flush()
            while True:
                item = job.pieces.get()
                if isinstance(item, str):
                    self.wfile.write(api.chunk(cid, model, {"content": item}))
                    self.wfile.flush()
                    continue
                if isinstance(item, Exception):
                    err = api.ApiError(500, f"generation failed: {item}", kind="server_error")
                    self.wfile.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                else:
                    self.wfile.write(api.chunk(cid, model, {}, _finish(item)))
                self.wfile.write(api.DONE)
                self.wfile.flush()
                return
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client left: stop generating for it


def make_handler(served: Served) -> type[BaseHTTPRequestHandler]:
    """The request handler class for ``ThreadingHTTPServer``, serving SERVED."""
    page = resources.files("tuneforge.chat").joinpath("page.html").read_bytes()
    return type("Handler", (_Handler,), {"served": served, "page": page})


def _finish(reply: Reply) -> str:
    return "stop" if reply.finished or reply.completion_tokens == 0 else "length"


class _Server(ThreadingHTTPServer):
    # The listen backlog: http.server's default of 5 refuses connections when a burst of
    # clients (32 at once, in the load test) arrives faster than they are accepted.
    request_queue_size = 256
    daemon_threads = True


def make_server(served: Served, host: str, port: int) -> ThreadingHTTPServer:
    """The server, bound and ready for ``serve_forever`` (port 0: any free port)."""
    try:
        httpd = _Server((host, port), make_handler(served))
    except OSError as err:
        from tuneforge.errors import UserError

        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port") from None
    return httpd


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
