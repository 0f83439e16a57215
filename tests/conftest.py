"""Shared fixtures: the bundled model's tokenizer, and a tiny random Llama that trains in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.models.resolve import BUNDLED_MODEL, resolve_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def bundled_path() -> Path:
    return resolve_model(BUNDLED_MODEL)


@pytest.fixture(scope="session")
def assistant_run(tmp_path_factory) -> Path:
    """The folder after the README's pipeline on the bundled model (tests/pipeline.py), trained once
    for every test that reads it. Read it, do not change what is there: other tests share it."""
    from pipeline import assistant_pipeline

    return assistant_pipeline(tmp_path_factory.mktemp("assistant"))


@pytest.fixture
def bf16_gpu_dtypes(monkeypatch) -> torch.device:
    """pick_dtype as it answers on a GPU with bf16, without one; returns a CUDA device to ask about."""
    from tuneforge.models import load

    monkeypatch.setattr(load, "pick_dtype",
                        lambda setting, device: torch.bfloat16 if setting == "auto" else getattr(torch, setting))
    return torch.device("cuda")


@pytest.fixture(scope="session")
def tokenizer(bundled_path):
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(bundled_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the bundled tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture
def identity_data(tmp_path) -> Path:
    from tuneforge.data.selfcog import write_self_cognition

    out = tmp_path / "data" / "assistant.jsonl"
    write_self_cognition(out, "龙", "Long")
    return out


def tiny_config(model_dir: Path, data: Path, **overrides):
    """A validated config for fast CPU runs on the tiny model."""
    from tuneforge.config.load import build_config

    settings = dict(
        pretrained_model_name_or_path=str(model_dir), method="lora", lora_r=8, lora_alpha=16,
        lora_dropout=0.0, data_files=str(data), max_length=128, pack_to_max_length=True,
        batch_size=2, accumulative_counts=2, max_steps=6, lr=5e-3, warmup_ratio=0.0,
        save_steps=3, save_total_limit=2, evaluation_freq=100, evaluation_inputs=[], seed=0,
        replay_general=False, identity_guard=False,
    )
    settings.update(overrides)
    return build_config(settings)
