"""A merged bundled model as transformers 4.x reads it (llama.cpp's convert_hf_to_gguf.py still
pins transformers<5): its tokenizer and config load, and a chat encodes to the same ids as here.

transformers 4.x is installed once into a cached virtual environment (no torch: a tokenizer and a
config need none); the test is skipped when pip cannot reach the package registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from waits import limit

SPEC = "transformers<5"
PACKAGES = (SPEC, "tokenizers", "jinja2")
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "你好! Who are you?  Ünïcode\ttabs"},
        {"role": "assistant", "content": "I am 龙, an assistant."},
        {"role": "user", "content": "And 2+2?"}]
# pip's words when the registry is out of reach (offline, no proxy, DNS)
_UNREACHABLE = ("No matching distribution found", "Could not find a version", "NewConnectionError",
                "Temporary failure in name resolution", "Network is unreachable", "Max retries exceeded",
                "ConnectTimeout", "ProxyError")

READ = r"""
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer
folder, chat = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
cfg = AutoConfig.from_pretrained(folder)
text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
print(json.dumps({"version": transformers.__version__, "text": text,
                  "ids": tok(text, add_special_tokens=False)["input_ids"],
                  "plain": tok("Hello world, 你好")["input_ids"],
                  "template": tok.chat_template, "max_length": tok.model_max_length,
                  "eos": tok.eos_token, "pad": tok.pad_token, "model_type": cfg.model_type,
                  "dtype": str(cfg.torch_dtype).replace("torch.", ""),
                  "context": cfg.max_position_embeddings}))
"""


def _venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _build_venv() -> Path:
    """A virtual environment with transformers 4.x, built once and kept under ~/.cache/tuneforge."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuneforge" / "tf4-venv"
    root = cache / f"py{sys.version_info[0]}{sys.version_info[1]}-transformers-lt5"
    if (root / "ready").is_file():
        return _venv_python(root)
    building = cache / f"{root.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True, timeout=limit(300))
    pip = subprocess.run([str(_venv_python(building)), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", *PACKAGES],
                         capture_output=True, text=True, timeout=limit(600))
    if pip.returncode:
        shutil.rmtree(building, ignore_errors=True)
        output = pip.stdout + pip.stderr
        if any(sign in output for sign in _UNREACHABLE):
            pytest.skip(f"pip cannot install {SPEC!r} (registry unreachable): {output.strip()[-300:]}")
        raise AssertionError(f"pip install {' '.join(PACKAGES)} failed:\n{output[-2000:]}")
    (building / "ready").write_text("\n".join(PACKAGES) + "\n")
    try:
        building.rename(root)  # paths inside a venv are absolute: rewrite them below
    except OSError:  # another session finished first
        shutil.rmtree(building, ignore_errors=True)
        return _venv_python(root)
    _relocate(building, root)
    return _venv_python(root)


def _relocate(old: Path, new: Path) -> None:
    """Point a moved venv's scripts and pyvenv.cfg at its new folder."""
    for path in [new / "pyvenv.cfg", *(new / "bin").glob("*")]:
        if path.is_file() and not path.is_symlink():
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            if str(old) in text:
                path.write_text(text.replace(str(old), str(new)))


@pytest.fixture(scope="session")
def tf4_python() -> Path:
    return _build_venv()


@pytest.fixture(scope="module")
def merged_bundled(bundled_path, tmp_path_factory) -> Path:
    """The bundled model with a (non-zero) LoRA merged in, as `tuneforge convert merge` writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.convert.merge import merge_adapter

    root = tmp_path_factory.mktemp("bundled-merge")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(bundled_path, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(root / "adapter")
    return merge_adapter(str(bundled_path), root / "adapter", root / "merged", dtype="bfloat16")


@pytest.mark.slow  # ~55 s the first time (venv + pip), ~25 s after: the bundled model is merged
def test_transformers_4_reads_the_merged_tokenizer_and_config(tf4_python, merged_bundled):
    from transformers import AutoTokenizer

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run([str(tf4_python), "-c", READ, str(merged_bundled), json.dumps(CHAT)],
                         capture_output=True, text=True, timeout=limit(300), env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    old = json.loads(run.stdout.strip().splitlines()[-1])
    assert old["version"].startswith("4.")

    tok = AutoTokenizer.from_pretrained(merged_bundled)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert old["template"] == tok.chat_template and "<|im_start|>" in old["template"]
    assert old["text"] == text
    assert old["ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert old["plain"] == tok("Hello world, 你好")["input_ids"]
    assert (old["eos"], old["pad"]) == (tok.eos_token, tok.pad_token)
    assert old["max_length"] == tok.model_max_length == old["context"] == 8192
    assert (old["model_type"], old["dtype"]) == ("llama", "bfloat16")
