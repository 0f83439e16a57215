"""llama.cpp itself (llama-cpp-python) reads the GGUFs of the tiny models: the same logits as
transformers (Llama, Qwen2) and as InternLM2's reference forward (llama.cpp's `internlm2`), and
the same token ids as the tokenizer the model trained with, special tokens included. Skipped
without llama-cpp-python; `make test-gguf` installs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_gguf import internlm2_dir, qwen2_dir, small_llama  # noqa: F401 (fixtures)

from tuneforge.convert.gguf import convert_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-gguf)")


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    # an f32 KV cache (llama.cpp's default is f16), so that an f32 file is compared at f32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest logit difference relative to the largest logit (printed: `pytest -s` shows it)."""
    error = float((got - ref).abs().max() / ref.abs().max())
    print(f"llama.cpp vs reference: {error:.2e}")
    return error


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_llama_cpp_computes_the_llama_logits(small_llama, tmp_path, kind):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = convert_gguf(small_llama, tmp_path / "m.gguf", kind, progress=False).path
    ids = [1, 50, 60, 70, 80, 90, 400, 17]
    ref = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    assert relative_error(llama_cpp_logits(out, ids), expected) <= {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.1}[kind]


def test_llama_cpp_computes_the_qwen2_logits(qwen2_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = convert_gguf(qwen2_dir, tmp_path / "q.gguf", "f32", progress=False).path
    ids = [1, 50, 60, 70, 80, 90, 400, 17]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32)(
            input_ids=torch.tensor([ids])).logits[0]
    assert relative_error(llama_cpp_logits(out, ids), expected) <= 1e-4


def test_llama_cpp_runs_internlm2_with_the_split_wqkv(internlm2_dir, tmp_path):  # noqa: F811
    from internlm2_checkpoint import reference_logits

    out = convert_gguf(internlm2_dir, tmp_path / "i.gguf", "f32", progress=False).path
    assert json.loads((internlm2_dir / "config.json").read_text())["architectures"] == ["InternLM2ForCausalLM"]
    ids = [1, 5, 9, 30, 77, 120, 3, 250]
    assert relative_error(llama_cpp_logits(out, ids), reference_logits(internlm2_dir, torch.tensor([ids]))[0]) <= 1e-4


def test_llama_cpp_tokenizes_as_the_trained_tokenizer(internlm2_dir, tiny_model_dir, tokenizer, tmp_path):  # noqa: F811
    """SmolLM2's byte-level BPE, InternLM2's sentencepiece with its own scores, and the same without
    a tokenizer.model (a Llama-layout folder: scores from the merge order)."""
    from tuneforge.models.load import load_model, load_tokenizer, save_tokenizer

    sentencepiece = load_tokenizer(internlm2_dir)
    llama_layout = tmp_path / "llama-layout"
    load_model(internlm2_dir, torch.device("cpu"), torch.float32).save_pretrained(llama_layout)
    save_tokenizer(sentencepiece, llama_layout)
    texts = ["<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n", "Please introduce yourself",
             "hello  world\nwho are you?", "Tell me 5 spots, 12 345 and 6.7!"]
    for folder, tok in ((internlm2_dir, sentencepiece), (llama_layout, sentencepiece), (tiny_model_dir, tokenizer)):
        out = convert_gguf(folder, tmp_path / f"{folder.name}.gguf", "f16", progress=False).path
        llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(
                text, add_special_tokens=False)["input_ids"], (folder.name, text)
