"""uvicorn's HTTP/1.1 protocol (h11) with JSON error bodies for the requests it refuses before the
app sees them: a malformed request, a request line too long (414), headers too large (431).

uvicorn answers those with a plain-text 400 of its own; an OpenAI client expects a JSON error.
Only the two methods that write those answers are replaced."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _json(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": None}}).encode()


class JsonErrorsH11(H11Protocol):
    def _refusal(self) -> tuple[int, str]:
        buffered, _ = self.conn.trailing_data
        if len(buffered) <= self.config.h11_max_incomplete_event_size:
            return 400, "malformed HTTP request"
        if b"\r\n" not in buffered[:self.config.h11_max_incomplete_event_size]:
            return 414, "the request line (URL) is too long"
        return 431, "the request headers are too large"

    def send_400_response(self, msg: str) -> None:
        status, message = self._refusal()
        body = _json(status, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        reason = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}[status]
        for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
