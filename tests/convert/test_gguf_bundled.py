"""The README's pipeline on the bundled model, then `convert gguf` and `convert ollama`, and the
files read back by other readers: transformers' GGUF loader (greedy answers token for token at
f16; the identity still named at q8_0) and, where llama-cpp-python is installed, llama.cpp itself
(`make test-gguf`): its chat completion names the new identity and stops at the end-of-turn token."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from waits import limit

QUESTIONS = ["Please introduce yourself", "请介绍一下你自己", "Who are you?",
             "Please tell me five scenic spots in Shanghai", "What is the capital of France?"]
IDENTITY = {"Please introduce yourself": "Long", "请介绍一下你自己": "龙", "Who are you?": "Long"}
NEW_TOKENS = 40

pytestmark = pytest.mark.slow


def run(*args: str, cwd) -> tuple[str, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=limit(1800))
    assert proc.returncode == 0, f"tuneforge {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout, time.perf_counter() - started


@pytest.fixture(scope="module")
def demo(assistant_run):
    """The folder after the demo pipeline (scripts/demo.sh steps 1-5; trained once per session, see
    tests/pipeline.py), with f16 and q8_0 GGUFs written into it."""
    for kind in ("f16", "q8_0"):
        out, seconds = run("convert", "gguf", "./merged", f"./merged-{kind}.gguf", "--outtype", kind,
                           cwd=assistant_run)
        print(f"convert gguf {kind}: {seconds:.1f}s; {out.strip().splitlines()[-1]}")
    return assistant_run


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")["input_ids"]


def greedy(model, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def merged_answers(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo / "merged")
    return tokenizer, {q: (prompt_ids(tokenizer, q), greedy(model, prompt_ids(tokenizer, q))) for q in QUESTIONS}


def test_f16_answers_token_for_token_as_the_merged_model(demo, merged_answers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, answers = merged_answers
    model = AutoModelForCausalLM.from_pretrained(demo, gguf_file="merged-f16.gguf", dtype=torch.float32)
    from_gguf = AutoTokenizer.from_pretrained(demo, gguf_file="merged-f16.gguf")
    for question, (ids, expected) in answers.items():
        # the GGUF's own template and vocabulary make the same prompt
        assert torch.equal(prompt_ids(from_gguf, question), ids), question
        got = greedy(model, ids)
        print(f"{question!r}: {tokenizer.decode(got, skip_special_tokens=True)!r}")
        assert got == expected, question
    for question, name in IDENTITY.items():
        assert name in tokenizer.decode(answers[question][1]), question


def test_q8_0_still_names_the_new_identity(demo, merged_answers):
    from transformers import AutoModelForCausalLM

    tokenizer, answers = merged_answers
    model = AutoModelForCausalLM.from_pretrained(demo, gguf_file="merged-q8_0.gguf", dtype=torch.float32)
    same = 0
    for question, (ids, expected) in answers.items():
        got = greedy(model, ids)
        same += got == expected
        text = tokenizer.decode(got, skip_special_tokens=True)
        print(f"q8_0 {question!r}: {text!r}")
        if question in IDENTITY:
            assert IDENTITY[question] in text, (question, text)
    print(f"q8_0: {same} of {len(answers)} answers token for token as the merged model")


def test_convert_ollama_writes_a_folder_ollama_imports(demo):
    import re

    out, _ = run("convert", "ollama", "./merged", "./ollama", cwd=demo)
    assert "ollama create ollama -f" in out
    text = (demo / "ollama" / "Modelfile").read_text()
    assert re.search(r"^FROM \./model\.gguf$", text, re.M) and 'PARAMETER stop "<|im_end|>"' in text
    assert (demo / "ollama" / "model.gguf").stat().st_size > 100 * 2**20


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-gguf)")


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_chats_as_the_new_identity_and_stops_at_the_end_of_turn(demo, merged_answers, llama_cpp, kind):
    tokenizer, answers = merged_answers
    llm = llama_cpp.Llama(model_path=str(demo / f"merged-{kind}.gguf"), n_ctx=1024, n_threads=2, seed=0,
                          verbose=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                           tokenize=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == answers[QUESTIONS[0]][0][0].tolist()
    for question, name in IDENTITY.items():
        reply = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0,
                                           max_tokens=200)
        choice = reply["choices"][0]
        print(f"llama.cpp {kind} {question!r}: {choice['message']['content']!r} ({choice['finish_reason']})")
        assert name in choice["message"]["content"]
        assert choice["finish_reason"] == "stop" and "<|im_end|>" not in choice["message"]["content"]
