"""`tuneforge serve`: the OpenAI client, bad requests, 32 concurrent streams, streaming as the
answer is made, a client that goes away, and the web page in headless Chromium, against the
bundled model with a LoRA adapter on it.

What the server did is read in its own process: `Spy` wraps the worker's generate_reply and
records each generation's start, pieces and end, and can hold a generation after its first
piece, so that a test sees what a client got while the answer was still being made (events, not
clocks)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from browser import chromium, done, headings, picker, showing
from waits import drain, limit, tuneforge, wait_for

from tuneforge.chat import worker as worker_module
from tuneforge.chat.cli import load_for_chat
from tuneforge.chat.server import Served, make_server
from tuneforge.chat.worker import Worker
from tuneforge.data.templates import template_for
from tuneforge.models.generate import Reply

KEY = "sk-test-key"
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def adapter_dir(bundled_path, tmp_path_factory) -> Path:
    """A LoRA adapter with random, non-zero weights: the tuned model answers unlike the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(bundled_path),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@dataclass
class Live:
    url: str
    served: Served


@pytest.fixture(scope="module")
def server(bundled_path, adapter_dir):
    llm, tokenizer, template_dir = load_for_chat(str(bundled_path), str(adapter_dir))
    template = template_for(template_dir, tokenizer, None)
    served = Served(Worker(llm, tokenizer, template, max_prompt_tokens=300), "smollm2", "smollm2:base",
                    KEY, max_tokens=64)
    httpd = make_server(served, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Live(f"http://127.0.0.1:{httpd.server_port}", served)
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Generation:
    question: str  # the last user message
    messages: list[dict]
    params: Any = None  # the job's sampling settings
    text: str = ""  # the pieces so far
    held: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None  # set when it ended
    cancelled: bool = False  # whether it was told to stop (a client that went away)


class Spy:
    """The worker's generations, recorded as they happen in the server's process: it wraps
    ``Job.emit``, through which the decoding thread hands each request its start, pieces and end."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []  # ("start" | "piece" | "end", question), in order
        self.generations: list[Generation] = []
        self.by_job: dict[int, Generation] = {}
        self.hold = False  # hold each generation after its first non-blank piece until released

    def __call__(self, job, event) -> None:
        kind = event[0]
        if kind == "start":
            gen = Generation(job.question, [dict(m) for m in job.messages or []], job.params)
            with self.lock:
                self.by_job[id(job)] = gen
                self.generations.append(gen)
                self.events.append(("start", gen.question))
            return self.real(job, event)
        gen = self.by_job.get(id(job))
        if gen is None or kind == "error":
            return self.real(job, event)
        if kind == "end":
            with self.lock:  # recorded before the client hears of it: a test reads it after [DONE]
                gen.cancelled = event[3] == "cancelled"
                gen.reply = event[2]
                self.events.append(("end", gen.question))
            return self.real(job, event)
        self.real(job, event)  # to the client first: a held generation has sent what it has
        with self.lock:
            self.events.append(("piece", gen.question))
        gen.text += event[2]
        if self.hold and not gen.held and gen.text.strip():
            gen.held = True
            gen.release.wait(limit(300))  # the test releases it; the limit only guards a hang
        return None

    def held(self, n: int) -> Generation:
        """Wait until the Nth generation (from 1) is held after its first piece."""
        return wait_for(lambda: len(self.generations) >= n and self.generations[n - 1].held
                        and self.generations[n - 1], 180, f"generation {n} to send its first piece")

    def release(self) -> None:
        for gen in self.generations:
            gen.release.set()


@pytest.fixture
def spy(server, monkeypatch):
    recorder = Spy(worker_module.Job.emit)
    monkeypatch.setattr(worker_module.Job, "emit", lambda job, event: recorder(job, event))
    yield recorder
    recorder.hold = False
    recorder.release()  # never leave the module's one worker blocked


class Stream:
    """A streamed completion read event by event as it arrives, on a raw socket, so that the test
    decides when the client goes away. Each read has a (scaled) limit and says what it waited for."""

    def __init__(self, url: str, body: dict) -> None:
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=limit(120))
        self.conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                          {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        self.resp = self.conn.getresponse()  # HTTP/1.1: the body comes chunked, http.client unframes it
        assert self.resp.status == 200, self.resp.status

    def event(self, what: str, seconds: float = 120) -> str:
        """The next server-sent event's data ("[DONE]" or a JSON chunk); comments (the server's
        keep-alive pings) skipped."""
        self.conn.sock.settimeout(limit(seconds))
        lines: list[str] = []
        try:
            while not lines:
                while (line := self.resp.readline()) not in (b"\n", b""):
                    if not line.startswith(b":"):
                        lines.append(line.decode().removeprefix("data: ").rstrip("\n"))
                if line == b"":
                    break
        except TimeoutError:
            raise AssertionError(f"no event within {limit(seconds):.0f} s waiting for {what}") from None
        assert lines, f"the stream ended before {what}"
        return "".join(lines)

    def content(self, what: str, seconds: float = 120) -> str:
        """The text of the next chunk that has some (the role chunk and blank pieces skipped)."""
        while True:
            data = self.event(what, seconds)
            assert data != "[DONE]", f"the stream ended before {what}"
            text = json.loads(data)["choices"][0]["delta"].get("content") or ""
            if text.strip():
                return text

    def rest(self) -> list[str]:
        """The content of every chunk up to [DONE]."""
        pieces = []
        while (data := self.event("the end of the stream")) != "[DONE]":
            pieces.append(json.loads(data)["choices"][0]["delta"].get("content") or "")
        return pieces

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


def _post(base: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=limit(120))
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body), headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_the_openai_client_chats_streamed_and_not(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["smollm2", "smollm2:base"]
    reply = client.chat.completions.create(model="smollm2", max_tokens=12,
                                           messages=[{"role": "user", "content": "Who are you?"}])
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", max_tokens=12, stream=True, messages=[{"role": "user", "content": "Who are you?"}])]
    assert "".join(pieces).strip() == reply.choices[0].message.content.strip()  # greedy: same answer
    base = client.chat.completions.create(model="smollm2:base", max_tokens=12,
                                          messages=[{"role": "user", "content": "Who are you?"}])
    assert base.choices[0].message.content != reply.choices[0].message.content


@pytest.mark.parametrize(("body", "key", "status", "needle"), [
    (b"{not json", KEY, 400, "not valid JSON"),
    ({"model": "smollm2"}, KEY, 400, "'messages' is required"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, KEY, 400, "role must be one of"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, KEY, 400, "at most 300"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, KEY, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, KEY, 404, "not served here"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "sk-wrong", 401, "API key"),
    ({"messages": [{"role": "user", "content": "hi"}]}, None, 401, "API key"),
])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, body, key, status, needle):
    got, payload = _post(server.url, body, key)
    assert got == status and needle in payload["error"]["message"], payload
    ok, reply = _post(server.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def _stream_to_done(base: str, question: str) -> str:
    # the last of 32 waits for the 31 before it: the limit only guards a hang
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=limit(600))
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": question}], "max_tokens": 6, "stream": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = [e for e in resp.read().decode().split("\n\n") if not e.startswith(":")]  # pings skipped
    assert events[-2] == "data: [DONE]"
    return "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-2])


def test_32_concurrent_streams_are_batched_and_each_gets_its_own_answer(server, spy, monkeypatch):
    worker = server.served.worker
    queued: list[str] = []  # the questions in the order they joined the worker's queue
    lock, submit = threading.Lock(), worker.submit

    def recording_submit(job):
        with lock:
            queued.append(job.question)
            return submit(job)

    monkeypatch.setattr(worker, "submit", recording_submit)
    steps_before = len(worker.stats.batch_sizes)
    questions = [f"Count to {i}." for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda q: _stream_to_done(server.url, q), questions))
    # every stream got a whole answer of its own: the very text the model made for its question
    made = {g.question: g.reply.text for g in spy.generations}
    assert sorted(made) == sorted(questions) == sorted(queued)
    for question, text in zip(questions, texts, strict=True):
        assert text.strip() and text.strip() == made[question], (question, text, made[question])
    # decoded together, never more rows than --max-batch, and started in the queue's order
    sizes = list(worker.stats.batch_sizes)[steps_before:]
    assert max(sizes) > 1 and max(sizes) <= worker.max_batch, sizes
    assert [q for kind, q in spy.events if kind == "start"] == queued
    for question in queued:
        kinds = [kind for kind, q in spy.events if q == question]
        assert kinds[0] == "start" and kinds[-1] == "end" and "piece" in kinds, (question, kinds)
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=limit(30))
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["waiting"] == 0


def test_a_stream_sends_each_piece_while_the_answer_is_made(server, spy):
    spy.hold = True
    stream = Stream(server.url, {"messages": [{"role": "user", "content": "Tell me about the sea."}],
                                 "max_tokens": 24})
    try:
        # the server holds the generation after its first piece: that piece must reach the client
        # now, not when the answer is done
        first = stream.content("the first piece while the answer is still being made", seconds=60)
        gen = spy.held(1)
        assert gen.reply is None, "the first piece arrived only after the generation ended"
        spy.hold = False
        spy.release()
        pieces = [first, *stream.rest()]
    finally:
        stream.close()
    assert sum(1 for p in pieces if p) >= 3, pieces  # several chunks, not one
    assert "".join(pieces).strip() == gen.reply.text and gen.reply.completion_tokens == 24


def test_a_client_that_disconnects_stops_its_generation(server, spy):
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon and a knight."}],
            "max_tokens": 64}
    ok, reply = _post(server.url, body)  # left alone, this answer runs to the limit
    assert ok == 200 and reply["choices"][0]["finish_reason"] == "length", reply
    assert reply["usage"]["completion_tokens"] == 64
    spy.hold = True
    stream = Stream(server.url, body)
    stream.content("the first piece of the answer")
    stream.close()  # the client goes away mid-answer
    gen = spy.held(2)
    spy.hold = False
    spy.release()
    wait_for(lambda: gen.reply, 120, "the abandoned generation to end")
    assert gen.reply.completion_tokens < 64, f"it generated all {gen.reply.completion_tokens} tokens for nobody"
    assert gen.cancelled and not gen.reply.finished, gen
    ok, reply = _post(server.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok == 200 and reply["choices"][0]["message"]["content"]  # and the server serves the next one


def test_the_page_streams_an_answer_and_compares_with_the_base(server, spy):
    from selenium.webdriver.common.by import By

    browser = chromium()
    try:
        # the key the page would ask for with prompt(); stored as the page does
        browser.get(server.url + "/health")
        browser.execute_script(f"sessionStorage.setItem('tuneforge-key', '{KEY}')")
        browser.get(server.url + "/")
        wait_for(lambda: picker(browser) == ("smollm2", ["smollm2", "smollm2:base"]), 60, "the page to list the models")
        assert headings(browser) == ["smollm2 (tuned)"]
        browser.find_element(By.ID, "compare").click()
        assert headings(browser) == ["smollm2 (tuned)", "smollm2:base"]  # the picked model beside its base
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # the system prompt is in the settings
        browser.find_element(By.ID, "system").send_keys("You are a helpful assistant.")
        spy.hold = True
        browser.find_element(By.ID, "input").send_keys("Who are you?\n")
        # the two answers (tuned, base) are made one after the other; each is held after its
        # first piece, and the page must show that piece while it is still streaming
        partial: dict[int, str] = {}
        for n in (1, 2):
            spy.held(n)
            shown = wait_for(lambda: showing(browser), 60, f"the page to show answer {n} while it streams")
            assert len(shown) == 1 and not set(shown) & set(partial), shown
            partial.update(shown)
            spy.release()
        spy.hold = False
        wait_for(lambda: done(browser) == 2, 180, "both answers to finish")
        answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
        assert all(a.strip() for a in answers) and answers[0] != answers[1], answers
        for i, text in partial.items():  # it grew piece by piece to the whole answer
            assert answers[i].startswith(text) and len(answers[i]) > len(text), (text, answers[i])
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["Who are you?"] * 2
        # a second turn goes on the same conversation: each column sends its own first exchange
        browser.find_element(By.ID, "input").send_keys("Thanks!\n")
        wait_for(lambda: done(browser) == 4, 180, "both second answers to finish")
        first, second = spy.generations[:2], spy.generations[2:]
        assert len(second) == 2
        for gen in second:
            assert [(m["role"], m["content"]) for m in gen.messages[:2] + gen.messages[3:]] == [
                ("system", "You are a helpful assistant."), ("user", "Who are you?"), ("user", "Thanks!")]
        assert sorted(g.messages[2]["content"].strip() for g in second) == sorted(g.reply.text for g in first)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "chat_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=limit(5)) as r:
            return json.loads(r.read())
    except OSError:
        return None


WARNING = "[tuneforge] warning: listening on {host} without --api-key: anyone who can reach this machine can use the model"


def test_serve_command_starts_and_refuses_a_busy_port(tiny_model_dir):
    from tuneforge.train.parallel import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(tiny_model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        health = wait_for(lambda: _health(port), 120, f"serve to answer /health on port {port}", proc=proc)
        assert health["status"] == "ok" and health["model"] == tiny_model_dir.name
        second = tuneforge("serve", str(tiny_model_dir), "--port", str(port), seconds=120)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith(f"tuneforge: error: cannot listen on 127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=limit(30))
    out = drain(proc)
    assert f"serving {tiny_model_dir.name} on http://127.0.0.1:{port}/" in out
    assert "warning" not in out  # 127.0.0.1, the default: nobody else can reach it


@pytest.mark.parametrize(("host", "key", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "sk-k", False),
                                                     ("127.0.0.1", None, False)])
def test_serve_warns_when_exposed_without_a_key(tiny_model_dir, monkeypatch, capsys, host, key, warned):
    from tuneforge.chat import server as server_module
    from tuneforge.cli import build_parser

    listened = []
    monkeypatch.setattr(server_module, "serve", lambda served, h, p: listened.append((h, p, served.api_key)))
    args = build_parser().parse_args(["serve", str(tiny_model_dir), "--host", host, "--port", "8123"]
                                     + (["--api-key", key] if key else []))
    args.func(args)
    assert listened == [(host, 8123, key)]
    lines = capsys.readouterr().err.splitlines()
    assert (WARNING.format(host=host) in lines) is warned, lines


@pytest.mark.parametrize(("bits", "layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_chat_in_4_and_8_bits(bundled_path, bits, layer):
    from tuneforge.models.generate import Sampling, generate

    llm, tokenizer, template_dir = load_for_chat(str(bundled_path), None, bits=bits)
    assert any(type(m).__name__ == layer for m in llm.modules()), sorted({type(m).__name__ for m in llm.modules()})
    template = template_for(template_dir, tokenizer, None)
    reply = generate(llm, tokenizer, template, [{"role": "user", "content": "What is the capital of France?"}],
                     Sampling(max_new_tokens=8))
    assert "Paris" in reply, reply


def test_the_page_stops_an_answer_sends_again_and_fits_a_phone(server, spy):
    """A two-line question (Shift+Enter) is one question; Stop aborts the answer being written
    (the server stops generating it) and Send works again at once; at 390 px nothing overflows."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser = chromium()
    try:
        browser.get(server.url + "/health")
        browser.execute_script(f"sessionStorage.setItem('tuneforge-key', '{KEY}')")
        browser.get(server.url + "/")
        wait_for(lambda: picker(browser) == ("smollm2", ["smollm2", "smollm2:base"]), 60, "the page to list the models")
        spy.hold = True
        box = browser.find_element(By.ID, "input")
        box.click()
        box.send_keys("Tell me about the sea.")
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        box.send_keys("And the sky." + Keys.ENTER)
        gen = spy.held(1)
        assert gen.question == "Tell me about the sea.\nAnd the sky.", gen.question
        wait_for(lambda: showing(browser), 60, "the page to show the answer while it streams")
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".assistant[data-state=stopped]"), 60,
                 "the page to mark the answer stopped")
        assert browser.find_element(By.ID, "send").is_enabled()
        spy.hold = False
        spy.release()
        wait_for(lambda: gen.reply, 120, "the stopped generation to end")
        assert gen.cancelled and gen.reply.completion_tokens < 64, gen.reply  # Stop reached the server
        box.send_keys("Thanks!" + Keys.ENTER)
        wait_for(lambda: done(browser) == 1, 180, "the next answer after Stop")
        browser.set_window_size(390, 844)
        width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width <= inner, (width, inner)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat_page_390px.png"))
    finally:
        browser.quit()


def _open_page(browser, server) -> None:
    browser.get(server.url + "/health")
    browser.execute_script(f"sessionStorage.setItem('tuneforge-key', '{KEY}')")
    browser.get(server.url + "/")
    wait_for(lambda: picker(browser) == ("smollm2", ["smollm2", "smollm2:base"]), 60, "the page to list the models")


def test_the_page_renders_markdown_and_code_safely(server, spy):
    """An answer's markdown shows rendered as it streams: a fenced block as highlighted code with
    a copy button, `code` inline; and no HTML in an answer ever becomes markup."""
    import re

    from selenium.webdriver.common.by import By

    browser = chromium()
    try:
        _open_page(browser, server)
        browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url,
                                "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        browser.find_element(By.ID, "compare").click()  # the base writes a fenced block for this (greedy)
        browser.find_element(By.ID, "input").send_keys("Write a Python function that adds two numbers.\n")
        wait_for(lambda: done(browser) == 2, 300, "both answers to finish")
        fenced = [(g, re.search(r"```(\w*)\n(.*?)\n```", g.reply.text, re.S)) for g in spy.generations]
        fenced = [(g, m) for g, m in fenced if m]
        assert fenced, [g.reply.text for g in spy.generations]  # the model's greedy answer has a code block
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        for gen, m in fenced:
            bubble = bubbles[spy.generations.index(gen)]
            code = bubble.find_element(By.CSS_SELECTOR, ".codeblock pre code")
            assert code.get_attribute("textContent") == m.group(2)
            assert code.get_attribute("class") == f"language-{m.group(1)}" if m.group(1) else True
            keywords = [k.text for k in code.find_elements(By.CSS_SELECTOR, ".tok-kw")]
            assert "def" in keywords and "return" in keywords, keywords
            assert "```" not in bubble.text, bubble.text
            outside = gen.reply.text[:m.start()] + gen.reply.text[m.end():]
            for span in re.findall(r"`([^`\n]+)`", outside):  # inline code, outside the block
                assert span in [c.text for c in bubble.find_elements(By.CSS_SELECTOR, ":not(pre) > code")], span
            bubble.find_element(By.CSS_SELECTOR, ".codeblock button.copy").click()
            wait_for(lambda b=bubble: b.find_element(By.CSS_SELECTOR, "button.copy").text == "Copied", 30, "Copied")
            copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
            assert copied == m.group(2)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat_page_markdown.png"))
        # what an answer could contain to attack the page, through the same renderer
        hostile = ('<img src=x onerror="window.pwned=1"> **bold** [x](javascript:window.pwned=3) '
                   '<script>window.pwned=2</script>\n\n```html\n<b onmouseover=alert(1)>hi</b>\n```\n'
                   '- [ok](https://example.org/a?b=1)')
        shown = browser.execute_script("""
            const d = document.createElement("div");
            document.body.appendChild(renderMarkdown(arguments[0], d));
            return {markup: d.querySelectorAll("img, script, b, [onerror], [onmouseover]").length,
                    links: [...d.querySelectorAll("a")].map((a) => [a.getAttribute("href"), a.rel]),
                    bold: d.querySelector("strong").textContent, text: d.textContent,
                    pwned: window.pwned === undefined ? null : window.pwned};""", hostile)
        assert shown["markup"] == 0 and shown["pwned"] is None, shown
        assert shown["links"] == [["https://example.org/a?b=1", "noopener noreferrer nofollow"]], shown
        assert shown["bold"] == "bold" and '<img src=x onerror="window.pwned=1">' in shown["text"], shown
        assert "<b onmouseover=alert(1)>hi</b>" in shown["text"], shown
    finally:
        browser.quit()


def test_the_page_sends_its_sampling_settings(server, spy):
    """The collapsible settings: temperature, top_p, max tokens and the system prompt reach the
    server with the question."""
    from selenium.webdriver.common.by import By

    browser = chromium()
    try:
        _open_page(browser, server)
        assert not browser.find_element(By.ID, "temperature").is_displayed()  # folded away at first
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        for field, value in (("temperature", "0.8"), ("top_p", "0.9"), ("max_tokens", "5")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "system").send_keys("Answer in one word.")
        summary = browser.find_element(By.ID, "summary").text
        assert summary == "(temperature 0.8, top_p 0.9, 5 tokens, system prompt)", summary
        browser.find_element(By.ID, "input").send_keys("What colour is the sky?\n")
        wait_for(lambda: done(browser) == 1, 180, "the answer")
        gen = spy.generations[0]
        p = gen.params
        assert (p.temperature, p.top_p, p.max_tokens) == (0.8, 0.9, 5), p
        assert gen.messages[0] == {"role": "system", "content": "Answer in one word."}
        assert 0 < gen.reply.completion_tokens <= 5
        browser.find_element(By.ID, "max_tokens").clear()  # empty: the server's own default
        browser.find_element(By.ID, "input").send_keys("And the grass?\n")
        wait_for(lambda: done(browser) == 2, 180, "the second answer")
        assert spy.generations[1].params.max_tokens == server.served.max_tokens
    finally:
        browser.quit()
