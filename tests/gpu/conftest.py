"""The GPU path's own tests: skipped without CUDA, except under `make test-gpu`
(TUNEFORGE_REQUIRE_GPU=1), where a machine without a GPU is a failure, not a silent pass."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpu.gpu_support import VOCAB, word_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    if os.environ.get("TUNEFORGE_REQUIRE_GPU") == "1":
        raise pytest.UsageError("make test-gpu: no CUDA device here (torch.cuda.is_available() is False)")
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on the GPU machine)")
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory) -> Path:
    """A random Llama big enough for the GPU kernels and the memory plan to matter (8 layers,
    hidden 1024, GQA), saved in bf16 as users' checkpoints are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("gpu-llama")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path
