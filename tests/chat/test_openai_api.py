"""`tuneforge serve` against the OpenAI contract, through the official `openai` client: every
sampling parameter honoured (checked against what the model itself does) or refused with a 400
naming it; /v1/completions, /v1/models, /health, /metrics; malformed HTTP answered with JSON;
admission control; and clients that go away, queued or running, streaming or not, freeing their
slot at the next decoding step (watched through the worker's batch sizes)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from waits import limit, wait_for

from tuneforge.chat.cli import load_for_chat
from tuneforge.chat.server import Served, make_server
from tuneforge.chat.worker import Job, Params, Worker
from tuneforge.data.templates import template_for

Q = [{"role": "user", "content": "Name three colours."}]


@dataclass
class Live:
    url: str
    host: str
    port: int
    served: Served


@pytest.fixture(scope="module")
def live(bundled_path):
    llm, tokenizer, template_dir = load_for_chat(str(bundled_path), None)
    template = template_for(template_dir, tokenizer, None)
    served = Served(Worker(llm, tokenizer, template, max_prompt_tokens=300, max_batch=8), "smollm2", None,
                    None, max_tokens=64, body_timeout=limit(3))
    httpd = make_server(served, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Live(f"http://127.0.0.1:{httpd.server_port}", "127.0.0.1", httpd.server_port, served)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key="none", timeout=limit(300), max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model="smollm2", messages=kw.pop("messages", Q), **kw)


def test_stop_cuts_before_the_stop_text_streamed_and_not(client):
    whole = _chat(client, max_tokens=16).choices[0].message.content
    words = whole.split()
    assert len(words) >= 4, whole
    stop = words[2]
    cut = whole[:whole.index(stop)].strip()
    for stops in (stop, ["@@never@@", stop]):
        reply = _chat(client, max_tokens=16, stop=stops).choices[0]
        assert reply.message.content == cut and reply.finish_reason == "stop", (reply, stop)
    pieces = [c.choices[0].delta.content or "" for c in _chat(client, max_tokens=16, stop=[stop], stream=True)
              if c.choices]
    assert "".join(pieces).strip() == cut and stop not in "".join(pieces)


def test_seed_and_n(client):
    kw = dict(max_tokens=8, temperature=1.0, seed=1234, n=2)
    first, again = _chat(client, **kw), _chat(client, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1] and len(texts) == 2
    assert texts == [c.message.content for c in again.choices]  # same seed, same settings: same text
    assert texts[0] != texts[1]  # each choice samples its own stream
    other = [c.message.content for c in _chat(client, **{**kw, "seed": 99}).choices]
    assert other != texts
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) if c.logprobs else 0
                                                for c in first.choices) or first.usage.completion_tokens > 0


def test_logprobs_and_usage(client, live):
    reply = _chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    for entry in content:  # greedy: the chosen token is the most likely one
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0])
    assert "".join(e.token for e in content).strip() == reply.choices[0].message.content
    worker = live.served.worker
    assert reply.usage.prompt_tokens == len(worker.chat_prompt(Q))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    with pytest.raises(Exception) as err:
        _chat(client, max_tokens=2, top_logprobs=2)
    assert getattr(err.value, "status_code", None) == 400 and "top_logprobs" in str(err.value)


def test_logit_bias_bans_and_forces_tokens(client, live):
    reply = _chat(client, max_tokens=4, logprobs=True)
    first = reply.choices[0].logprobs.content[0].token
    tokenizer = live.served.worker.tokenizer
    first_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(first))[0]
    banned = _chat(client, max_tokens=4, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first
    forced_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" blue"))[0]
    forced = _chat(client, max_tokens=4, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content.split() == ["blue"] * 4


def test_presence_and_frequency_penalties_reduce_repeats(client, live):
    ask = [{"role": "user", "content": "Write the word hello 10 times separated by spaces."}]
    tokenizer = live.served.worker.tokenizer

    def most_repeated(**kw) -> int:  # how often the answer's most frequent token comes
        text = _chat(client, messages=ask, max_tokens=24, **kw).choices[0].message.content
        return Counter(tokenizer.tokenize(text)).most_common(1)[0][1]

    plain = most_repeated()
    assert plain >= 8, plain  # left alone, the model repeats
    assert most_repeated(frequency_penalty=2.0) < plain / 2
    assert most_repeated(presence_penalty=2.0) < plain / 2


def test_max_completion_tokens_and_include_usage(client):
    reply = _chat(client, max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    chunks = list(_chat(client, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]


@pytest.mark.parametrize(("extra", "field"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ({"extra_body": {"n": 0}}, "n"),
    ({"extra_body": {"temperature": 3}}, "temperature"),
])
def test_unsupported_or_invalid_parameters_are_refused_by_name(client, extra, field):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        _chat(client, max_tokens=2, **extra)
    body = err.value.body
    assert body["param"] == field and field in body["message"], body


def test_completions_models_health_metrics(client, live):
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3,
                                      logprobs=2)
    choice = reply.choices[0]
    assert "Paris" in choice.text and reply.usage.completion_tokens == 3
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.top_logprobs[0]) == 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=3, stream=True))
    assert streamed == choice.text
    assert [m.id for m in client.models.list()] == ["smollm2"]
    status, health = _raw(live, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200 and health["status"] == "ok"
    conn = http.client.HTTPConnection(live.host, live.port, timeout=limit(30))
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for name in ("tuneforge_requests_total", "tuneforge_queue_length", "tuneforge_tokens_per_second",
                 "tuneforge_time_to_first_token_seconds_count"):
        assert f"\n{name} " in text, text


def _raw(live: Live, data: bytes, seconds: float = 60) -> tuple[int, dict]:
    """Send DATA as is; the status and the JSON body of the one response."""
    with socket.create_connection((live.host, live.port), timeout=limit(seconds)) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read())


def _post_raw(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


HI = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


@pytest.mark.parametrize(("data", "status", "needle"), [
    (_post_raw(b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'), (200, 400), ""),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
     + f"{len(HI):x}\r\n".encode() + HI + b"\r\n0\r\n\r\n", (200,), ""),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{\"messages\"", (408,),
     "did not arrive"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n", (413,), "over"),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", (414,), "URL"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", (431,), "headers"),
    (b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n", (404,), "no such endpoint"),
    (b"DELETE /v1/models HTTP/1.1\r\nHost: t\r\n\r\n", (405,), "not allowed"),
    (b"BREW /\x00 HTCPCP\r\n\r\n", (400,), "malformed"),
])
def test_malformed_http_gets_json_errors_and_the_server_keeps_serving(live, data, status, needle):
    got, body = _raw(live, data)
    assert got in status, (got, body)
    assert needle in json.dumps(body)
    ok, reply = _raw(live, _post_raw(HI))
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def test_keep_alive_serves_several_requests_on_one_connection(live):
    conn = http.client.HTTPConnection(live.host, live.port, timeout=limit(120))
    for _ in range(3):
        conn.request("POST", "/v1/chat/completions", HI, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.version == 11 and not resp.will_close
        json.loads(resp.read())
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after(live, monkeypatch):
    monkeypatch.setattr(live.served.worker, "max_queue", 0)
    conn = http.client.HTTPConnection(live.host, live.port, timeout=limit(60))
    conn.request("POST", "/v1/chat/completions", HI, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 503 and int(resp.getheader("Retry-After")) > 0
    assert "already waiting" in json.loads(resp.read())["error"]["message"]


class Gate:
    """A job that holds the worker at its start until opened: requests sent meanwhile queue up,
    and start together when it opens (the gate's one token ends it; they join at that step)."""

    def __init__(self, worker: Worker) -> None:
        self.opened = threading.Event()
        self.started = threading.Event()
        job = Job(worker.chat_prompt(Q), Params(max_tokens=1), "gate", sink=self._sink)
        Worker.submit(worker, job)  # not through the test's recording of the requests sent
        wait_for(self.started.is_set, 120, "the gate job to hold the worker")

    def _sink(self, event: tuple) -> None:
        if event[0] == "start":
            self.started.set()
            self.opened.wait(limit(300))

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def jobs(live, monkeypatch):
    """Every job submitted over HTTP during the test, in order."""
    seen: list[Job] = []
    submit = live.served.worker.submit
    monkeypatch.setattr(live.served.worker, "submit", lambda job: seen.append(job) or submit(job))
    return seen


def _stream(live: Live, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(live.host, live.port, timeout=limit(120))
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": Q, "max_tokens": max_tokens, "stream": True}), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _non_streaming(live: Live, max_tokens: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(live.host, live.port, timeout=limit(120))
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": Q, "max_tokens": max_tokens}),
                 {"Content-Type": "application/json"})
    return conn


@pytest.mark.parametrize("streaming", [True, False])
def test_a_running_client_that_leaves_frees_its_slot_at_the_next_step(live, jobs, streaming, monkeypatch):
    worker = live.served.worker
    # steps slowed to >= 0.1 s, so the stayer's 48 tokens outlast the server's 0.5 s look for a
    # client that left however fast this machine decodes
    forward = worker.model.forward
    monkeypatch.setattr(worker.model, "forward", lambda *a, **k: time.sleep(0.1) or forward(*a, **k))
    gate = Gate(worker)
    try:
        stay_conn, stay = _stream(live, 48)
        leave = _stream(live, 48)[0] if streaming else _non_streaming(live, 48)
        wait_for(lambda: len(jobs) == 2, 60, "both requests to queue")
    finally:
        gate.open()
    steps = worker.stats.batch_sizes
    wait_for(lambda: worker.stats.running == 2, 120, "both requests to decode in one batch")
    leave.close()
    wait_for(jobs[1].cancelled.is_set, 60, "the server to notice the client left")
    at = len(steps)  # the step running now may still hold both rows; the one after must not
    wait_for(lambda: len(steps) >= at + 2, 120, "two more decoding steps")
    assert steps[at + 1] == 1, list(steps)[at - 2:at + 4]
    body = stay.read().decode()  # the one that stayed gets its whole answer
    stay_conn.close()
    assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body.replace(" ", "")


@pytest.mark.parametrize("streaming", [True, False])
def test_a_queued_client_that_leaves_never_runs(live, jobs, streaming):
    worker = live.served.worker
    gate = Gate(worker)
    try:
        conn = _stream(live, 8)[0] if streaming else _non_streaming(live, 8)
        wait_for(lambda: len(jobs) == 1, 60, "the request to queue")
        dropped = worker.stats.dropped
        conn.close()
        wait_for(jobs[0].cancelled.is_set, 60, "the server to notice the queued client left")
        assert worker.queued() == 0
    finally:
        gate.open()
    wait_for(lambda: worker.stats.running == 0 and not worker.waiting, 120, "the worker to be idle")
    assert worker.stats.dropped == dropped + 1
    ok, reply = _raw(live, _post_raw(HI))
    assert ok == 200
