"""Several LoRA adapters on one base (`serve BASE --adapter a=DIR --adapter b=DIR`): the `model`
field picks the adapter per request, the base answers by its own name, all listed by /v1/models,
and the base is loaded once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from waits import limit

from tuneforge.chat.cli import load_for_serving
from tuneforge.chat.server import Served, make_server
from tuneforge.chat.worker import BASE, Worker
from tuneforge.data.templates import template_for
from tuneforge.errors import UserError


def _adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
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
