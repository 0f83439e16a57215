"""The XTuner tutorial's six commands on InternLM2.5 (a tiny random checkpoint in the original
layout, remote-code files and all), with no remote code run: copy-cfg each internlm2_5 preset,
edit it, train (QLoRA, LoRA under ZeRO-2, full), pth_to_hf, merge in both layouts, chat."""

from __future__ import annotations

import subprocess

import pytest
import torch
from internlm2_checkpoint import make_internlm2, read_state
from waits import tuneforge

PRESETS = {"qlora": "internlm2_5_chat_7b_qlora_alpaca_e3", "lora": "internlm2_5_chat_7b_lora_alpaca_e3",
           "full": "internlm2_5_chat_7b_full_alpaca_e3"}
SMALL = ["max_steps=2", "max_length=256", "replay_general=False", "evaluation_max_new_tokens=8",
         "save_steps=2", "lr=1e-3"]


def run(*args: str, cwd, stdin: str | None = None, seconds: float = 900) -> subprocess.CompletedProcess:
    """One command, within the scaled limit (tests/waits.py: TUNEFORGE_TEST_TIMEOUT_FACTOR)."""
    proc = tuneforge(*args, seconds=seconds, cwd=cwd, input=stdin, stdin=None if stdin else subprocess.DEVNULL)
    assert proc.returncode == 0, f"tuneforge {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def edit_copy(path, model_dir) -> None:
    """What the tutorial has users do: point the copy at the model and the data."""
    text = path.read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("pretrained_model_name_or_path ="):
            line = f"pretrained_model_name_or_path = '{model_dir}'"
        elif line.startswith("alpaca_en_path ="):
            line = "alpaca_en_path = './data/assistant.jsonl'"
        lines.append(line)
    assert lines != text.splitlines(), "the preset no longer has the settings the tutorial edits"
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    root = tmp_path_factory.mktemp("tutorial")
    base = make_internlm2(root / "internlm2_5-7b-chat", fmt="bin", shards=2)
    run("data", "self-cognition", "--name", "龙", "--name-en", "Long", "-o", "./data/assistant.jsonl", cwd=root)
    for method, preset in PRESETS.items():
        run("copy-cfg", preset, "./", cwd=root)
        copy = f"./{preset}_copy.py"
        edit_copy(root / copy, base)
        extra = ["--deepspeed", "deepspeed_zero2"] if method == "lora" else []
        train = run("train", copy, *extra, "--work-dir", f"./work_dirs/{method}", "--cfg-options", *SMALL, cwd=root)
        assert "step 2/2" in train.stdout + train.stderr
        run("convert", "pth_to_hf", copy, f"./work_dirs/{method}/iter_2.pth", f"./hf_{method}", cwd=root)
    for method in ("qlora", "lora"):
        for layout in ("llama", "original"):
            run("convert", "merge", str(base), f"./hf_{method}", f"./merged_{method}_{layout}",
                "--layout", layout, cwd=root)
    run("convert", "pth_to_hf", f"./{PRESETS['full']}_copy.py", "./work_dirs/full/iter_2.pth", "./hf_full_original",
        "--layout", "original", "--fp32", cwd=root)
    return root, base


@pytest.mark.slow
def test_the_llama_layout_merge_loads_in_plain_transformers_and_equals_base_plus_adapter(tutorial):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.models.adapters import attach_adapter
    from tuneforge.models.load import load_model

    root, base = tutorial
    for method in ("qlora", "lora"):
        merged_dir = root / f"merged_{method}_llama"
        assert not list(merged_dir.glob("*.py"))  # no remote code travels with it
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)  # no trust_remote_code
        assert type(merged).__name__ == "LlamaForCausalLM"
        tok = AutoTokenizer.from_pretrained(merged_dir)
        ids = tok.apply_chat_template([{"role": "user", "content": "你是谁？"}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]
        assert tok.convert_tokens_to_ids("<|im_start|>") in ids[0].tolist()
        native = load_model(base, torch.device("cpu"), torch.float32)
        tuned = attach_adapter(native, root / f"hf_{method}", base)
        with torch.no_grad():
            want = tuned(input_ids=ids, use_cache=False).logits
            got = merged(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_original_layout_merge_round_trips_bit_exactly(tutorial):
    import json

    from tuneforge.models import internlm2

    root, base = tutorial
    for method in ("qlora", "lora"):
        original_dir = root / f"merged_{method}_original"
        config = json.loads((original_dir / "config.json").read_text())
        assert config["architectures"] == ["InternLM2ForCausalLM"] and "auto_map" in config
        assert (original_dir / "modeling_internlm2.py").is_file() and (original_dir / "tokenizer.model").is_file()
        fused = read_state(original_dir)
        assert any(k.endswith("attention.wqkv.weight") for k in fused)
        llama = read_state(root / f"merged_{method}_llama")
        split = internlm2.to_llama(fused, config)
        assert split.keys() == llama.keys()
        assert all(torch.equal(split[k], llama[k]) for k in llama)
    full = root / "hf_full_original"
    assert any(k.endswith("attention.wqkv.weight") for k in read_state(full))


@pytest.mark.slow
def test_chat_answers_piped_questions_on_every_result_without_asking_anything(tutorial):
    root, base = tutorial
    targets = [["./merged_qlora_llama"], ["./merged_lora_original"], ["./hf_full"],
               [str(base), "--adapter", "./hf_lora"]]
    for target in targets:
        proc = run("chat", *target, "--max-new-tokens", "6", cwd=root, stdin="你是谁？\nWho are you?\n")
        assert proc.stdout.count(">>> Assistant:") == 2, proc.stdout
        assert "[y/N]" not in proc.stdout + proc.stderr
