"""`tuneforge serve`: the OpenAI client, bad requests, 32 concurrent streams and the web page in
headless Chromium, against the bundled model with a LoRA adapter on it."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tuneforge.chat.cli import load_for_chat
from tuneforge.chat.server import Served, make_server
from tuneforge.chat.worker import Worker
from tuneforge.data.templates import template_for

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


@pytest.fixture(scope="module")
def server(bundled_path, adapter_dir):
    llm, tokenizer, template_dir = load_for_chat(str(bundled_path), str(adapter_dir))
    template = template_for(template_dir, tokenizer, None)
    served = Served(Worker(llm, tokenizer, template, max_prompt_tokens=300), "smollm2", "smollm2:base",
                    KEY, max_tokens=64)
    httpd = make_server(served, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def _post(base: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body), headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_the_openai_client_chats_streamed_and_not(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=KEY)
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
    got, payload = _post(server, body, key)
    assert got == status and needle in payload["error"]["message"], payload
    ok, reply = _post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def _stream_to_done(base: str, i: int) -> str:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 6, "stream": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = resp.read().decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    return "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-2])


def test_32_concurrent_streams_all_finish(server):
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda i: _stream_to_done(server, i), range(32)))
    assert len(texts) == 32 and all(isinstance(t, str) for t in texts)
    conn = http.client.HTTPConnection(server.removeprefix("http://"))
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["waiting"] == 0


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium not installed (make test installs Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_streams_an_answer_and_compares_with_the_base(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        # the key the page would ask for with prompt(); stored as the page does
        browser.get(server + "/health")
        browser.execute_script(f"sessionStorage.setItem('tuneforge-key', '{KEY}')")
        browser.get(server + "/")
        wait = WebDriverWait(browser, 180)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "smollm2")
        browser.find_element(By.ID, "compare").click()
        assert len(browser.find_elements(By.CSS_SELECTOR, ".column")) == 2
        browser.find_element(By.ID, "system").send_keys("You are a helpful assistant.")
        browser.find_element(By.ID, "input").send_keys("Who are you?\n")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]")) == 2)
        answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
        assert all(a.strip() for a in answers) and answers[0] != answers[1], answers
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["Who are you?"] * 2
        # a second turn goes on the same conversation
        browser.find_element(By.ID, "input").send_keys("Thanks!\n")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]")) == 4)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "chat_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()


def test_serve_command_starts_and_refuses_a_busy_port(tiny_model_dir):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tuneforge.train.parallel import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(tiny_model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.5)
        second = subprocess.run([sys.executable, "-m", "tuneforge", "serve", str(tiny_model_dir), "--port", str(port)],
                                capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith(f"tuneforge: error: cannot listen on 127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_in_4_bits(bundled_path):
    pytest.importorskip("bitsandbytes")
    from tuneforge.models.generate import Sampling, generate

    llm, tokenizer, template_dir = load_for_chat(str(bundled_path), None, bits=4)
    assert any(type(m).__name__ == "Linear4bit" for m in llm.modules())
    template = template_for(template_dir, tokenizer, None)
    reply = generate(llm, tokenizer, template, [{"role": "user", "content": "What is the capital of France?"}],
                     Sampling(max_new_tokens=12))
    assert "Paris" in reply, reply
