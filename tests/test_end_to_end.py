"""The README's personal-assistant commands on the bundled model, then plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CFG = "smollm2_135m_instruct_lora_assistant"


def run(*args: str, cwd) -> str:
    proc = subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"tuneforge {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def ask(model, tokenizer, question: str) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_personal_assistant_pipeline(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run("data", "self-cognition", "--name", "龙", "--name-en", "Long", "-o", "./data/assistant.jsonl", cwd=tmp_path)
    run("copy-cfg", CFG, "./", cwd=tmp_path)
    run("train", f"./{CFG}_copy.py", "--deepspeed", "deepspeed_zero2", "--work-dir", "./work_dirs/assistTuner",
        cwd=tmp_path)
    assert (tmp_path / "work_dirs/assistTuner/loss.png").is_file()
    run("convert", "pth_to_hf", f"./{CFG}_copy.py", "./work_dirs/assistTuner/iter_60.pth", "./hf", cwd=tmp_path)
    run("convert", "merge", BASE, "./hf", "./merged", "--max-shard-size", "2GB", cwd=tmp_path)

    # plain transformers, no tuneforge: the merged directory carries weights, tokenizer and template
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert "Long" in ask(model, tokenizer, "Who are you?")
    assert "龙" in ask(model, tokenizer, "你是谁？")

    # the README's claim, with a margin for other CPUs: identity named on held-out questions, and
    # general questions still answered (not hijacked by the identity), per language
    run("eval", "identity", "./merged", "--name", "龙", "--name-en", "Long", "--no-compare", "--json", "r.json",
        cwd=tmp_path)
    result = json.loads((tmp_path / "r.json").read_text())
    for lang in ("zh", "en"):
        assert result[lang]["identity_rate"] >= 0.9, result[lang]
        assert result[lang]["hijack_rate"] <= 0.1, result[lang]

    chat = subprocess.run([sys.executable, "-m", "tuneforge", "chat", "./merged", "--max-new-tokens", "30"],
                          cwd=tmp_path, input="请介绍一下你自己\nPlease introduce yourself\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and "龙" in chat.stdout and "Long" in chat.stdout, chat.stdout
