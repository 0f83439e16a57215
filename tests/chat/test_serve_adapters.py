"""Several LoRA adapters on one base (`serve BASE --adapter a=DIR --adapter b=DIR`): the `model`
field picks the adapter per request, the base answers by its own name, all listed by /v1/models
(each adapter with its base as `parent`, as vLLM lists them), and the base is loaded once; the
chat page picks among them in headless Chromium."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from browser import chromium, done, headings, picker, showing
from waits import limit, wait_for

from tuneforge.chat import server as server_module
from tuneforge.chat import worker as worker_module
from tuneforge.chat.cli import load_for_serving
from tuneforge.chat.server import Served, make_server
from tuneforge.chat.worker import BASE, Worker
from tuneforge.data.templates import template_for
from tuneforge.errors import UserError

ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"


def _adapter(base: Path, out: Path, seed: int, std: float = 0.05) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=std)
    model.save_pretrained(out)
    return out


def test_two_adapters_on_one_base_answer_differently(bundled_path, tmp_path):
    from openai import OpenAI

    a, b = _adapter(bundled_path, tmp_path / "a", 0), _adapter(bundled_path, tmp_path / "b", 1)
    llm, tokenizer, template_dir, routes = load_for_serving(str(bundled_path), "smollm2",
                                                            [f"alpha={a}", f"beta={b}"])
    assert routes == {"smollm2": BASE, "alpha": "default", "beta": "beta"}
    assert set(llm.peft_config) == {"default", "beta"}  # one base, two adapters on it
    served = Served(Worker(llm, tokenizer, template_for(template_dir, tokenizer, None), max_prompt_tokens=300),
                    "smollm2", None, None, max_tokens=16, routes=routes)
    httpd = make_server(served, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{httpd.server_port}/v1", api_key="none",
                        timeout=limit(300), max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2", "alpha", "beta"]
        def ask(model: str) -> tuple[str, list[float]]:
            """The greedy answer and its tokens' log-probabilities under MODEL."""
            choice = client.chat.completions.create(model=model, max_tokens=10, logprobs=True, messages=[
                {"role": "user", "content": "Who are you?"}]).choices[0]
            return choice.message.content, [round(t.logprob, 3) for t in choice.logprobs.content]

        answers = {m: ask(m) for m in ("alpha", "smollm2", "beta")}
        # each answers with its own weights: the probabilities differ (two small random adapters
        # can agree on the greedy words: they did here, so the words alone do not tell)
        assert len({tuple(lp) for _, lp in answers.values()}) == 3, answers
        assert answers["alpha"][0] != answers["smollm2"][0], answers
        assert ask("alpha") == answers["alpha"]  # switched back after beta and the base: the same adapter
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("adapters", "needle"), [
    (["x", "y"], "need names"),
    (["a=x", "y"], "NAME=DIR"),
    (["a=x", "a=y"], "distinct"),
    (["smollm2=x"], "distinct"),
])
def test_bad_adapter_lists_are_one_line_errors(adapters, needle):
    with pytest.raises(UserError, match=needle):
        load_for_serving("unused", "smollm2", adapters)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two adapters on the tiny model, random and far apart (other seeds, large weights), so that
    each answers the same question with other words than the other and than the base."""
    out = tmp_path_factory.mktemp("tiny-adapters")
    return _adapter(tiny_model_dir, out / "alpha", 0, std=0.5), _adapter(tiny_model_dir, out / "beta", 1, std=0.5)


@contextmanager
def _serving(model: Path, adapters: list[str]) -> Iterator[str]:
    """`serve MODEL --adapter ...` on a free port, as the serve command builds it; yields its URL."""
    llm, tokenizer, template_dir, routes = load_for_serving(str(model), "tiny", adapters)
    served = Served(Worker(llm, tokenizer, template_for(template_dir, tokenizer, None), max_prompt_tokens=300),
                    "tiny", None, None, max_tokens=24, routes=routes)
    httpd = make_server(served, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("adapters", "listed"), [
    ([], [("tiny", None)]),  # a merged model: nothing to be the parent of
    (["{alpha}"], [("tiny", "tiny:base"), ("tiny:base", None)]),  # one plain --adapter DIR
    (["alpha={alpha}", "beta={beta}"], [("tiny", None), ("alpha", "tiny"), ("beta", "tiny")]),
])
def test_models_name_each_adapters_base_as_its_parent(tiny_model_dir, tiny_adapters, adapters, listed):
    alpha, beta = tiny_adapters
    with _serving(tiny_model_dir, [a.format(alpha=alpha, beta=beta) for a in adapters]) as url:
        with urllib.request.urlopen(url + "/v1/models", timeout=limit(30)) as r:
            body = json.loads(r.read())
        assert body["object"] == "list"
        assert [(m["id"], m["parent"]) for m in body["data"]] == listed, body
        # OpenAI's model object, with vLLM's `parent` added (null, present, for the base and a merged model)
        assert all(set(m) == {"id", "object", "created", "owned_by", "parent"} and m["object"] == "model"
                   for m in body["data"]), body


class Gate:
    """Wraps ``Job.emit``, through which the decoding thread hands each request its pieces and its
    end: records each generation's adapter and how it ended, and while ``holding``, holds the
    generation at its first non-blank piece (after sending it) until ``release`` is set."""

    def __init__(self, real) -> None:
        self.real = real
        self.holding = False
        self.held, self.release = threading.Event(), threading.Event()
        self.job = None  # the held one
        self.ended: list[tuple[str | None, str]] = []  # (adapter, finish reason), in order

    def __call__(self, job, event) -> None:
        self.real(job, event)
        if event[0] == "end":
            self.ended.append((job.adapter, event[3]))
        elif event[0] == "piece" and self.holding and event[2].strip() and not self.release.is_set():
            self.job = job
            self.held.set()
            self.release.wait(limit(300))  # the test releases it; the limit only guards a hang


def test_the_page_picks_an_adapter_and_compares_it_with_its_base(tiny_model_dir, tiny_adapters, monkeypatch):
    """The page lists every served model; picking one starts a fresh conversation with it (an
    answer still being written is aborted), its requests name it, and compare puts it beside its
    base."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    routed: list[tuple[str, str | None]] = []  # (model id, adapter) of each request, as the server routed it
    real_route = server_module._route
    monkeypatch.setattr(server_module, "_route", lambda served, model: routed.append(real_route(served, model))
                        or routed[-1])
    gate = Gate(worker_module.Job.emit)
    monkeypatch.setattr(worker_module.Job, "emit", lambda job, event: gate(job, event))
    alpha_dir, beta_dir = tiny_adapters
    with _serving(tiny_model_dir, [f"alpha={alpha_dir}", f"beta={beta_dir}"]) as url:
        browser = chromium()
        try:
            browser.get(url + "/")
            wait_for(lambda: picker(browser) == ("tiny", ["tiny", "alpha", "beta"]), 60, "the page to list the models")
            compare = browser.find_element(By.ID, "compare-label")
            assert headings(browser) == ["tiny"] and not compare.is_displayed()  # the base has no base

            def ask(question: str, answers: int = 1) -> list[str]:
                """Send QUESTION; the answers it gets, once they have all finished, left to right."""
                wait_for(lambda: browser.find_element(By.ID, "send").is_enabled(), 60, "Send to be enabled")
                before = done(browser)
                browser.find_element(By.ID, "input").send_keys(question + "\n")
                wait_for(lambda: done(browser) == before + answers, 180, f"{answers} answer(s) to {question!r}")
                return [b.text for b in browser.find_elements(By.CSS_SELECTOR, ".assistant")][-answers:]

            picked = Select(browser.find_element(By.ID, "model"))
            picked.select_by_value("alpha")
            assert headings(browser) == ["alpha (tuned)"] and compare.is_displayed()
            [alpha] = ask("Who are you?")
            assert routed[-1] == ("alpha", "default") and alpha.strip()
            # another pick while an answer is being written: that answer is aborted, the
            # conversation starts afresh with the new model
            gate.holding = True
            browser.find_element(By.ID, "input").send_keys("Tell me more.\n")
            wait_for(gate.held.is_set, 120, "the answer to be held after its first piece")
            wait_for(lambda: showing(browser), 60, "the page to show the answer while it streams")
            picked.select_by_value("beta")
            assert headings(browser) == ["beta (tuned)"]
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg")  # a fresh conversation
            # the server heard the page go: the aborted request's generation is told to stop
            wait_for(lambda: gate.job.cancelled.is_set(), 60, "the server to see the aborted request go")
            gate.release.set()
            wait_for(lambda: ("default", "cancelled") in gate.ended, 120, "the aborted answer to be stopped")
            [beta] = ask("Who are you?")
            assert routed[-1] == ("beta", "beta") and beta.strip()
            assert beta != alpha, (alpha, beta)  # another adapter answers: not alpha's words
            browser.find_element(By.ID, "compare").click()
            assert headings(browser) == ["beta (tuned)", "tiny"]  # beside its parent, the base
            tuned, base = ask("Who are you?", answers=2)
            assert sorted(routed[-2:]) == [("beta", "beta"), ("tiny", BASE)], routed
            assert tuned == beta and base not in (alpha, beta), (alpha, beta, base)
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "chat_page_models.png"))
            browser.set_window_size(390, 844)  # the picker and the compare switch still fit a phone
            width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width <= inner, (width, inner)
        finally:
            browser.quit()


def test_the_page_with_one_model_reads_as_its_name(tiny_model_dir):
    """A merged model alone: the picker shows its name and offers nothing else, no compare switch,
    no "(tuned)" on its column."""
    from selenium.webdriver.common.by import By

    with _serving(tiny_model_dir, []) as url:
        browser = chromium()
        try:
            browser.get(url + "/")
            wait_for(lambda: picker(browser) == ("tiny", ["tiny"]), 60, "the page to list the model")
            assert not browser.find_element(By.ID, "model").is_enabled()
            assert browser.find_element(By.ID, "model").text == "tiny"
            assert not browser.find_element(By.ID, "compare-label").is_displayed()
            assert headings(browser) == ["tiny"]
        finally:
            browser.quit()
