"""InternLM2 / 2.5 loaded natively: logits equal InternLM2's own forward, the tokenizer equals
sentencepiece, packed rows stay apart, and the layout conversion is exact both ways."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from internlm2_checkpoint import CHAT_TOKENS, make_internlm2, reference_logits

from tuneforge.errors import UserError
from tuneforge.models import internlm2
from tuneforge.models.load import load_model, load_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer_source(tmp_path_factory):
    """One trained sentencepiece model, shared by the checkpoints of this module."""
    return make_internlm2(tmp_path_factory.mktemp("il2-tok"), layers=1)


def _load(path):
    return load_model(path, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(("version", "fmt", "shards", "rope"), [
    ("2.5", "safetensors", 1, "default"),   # InternLM2.5: dynamic NTK, factor 2.0, theta 1e6
    ("2.5", "bin", 3, "default"),
    ("2", "safetensors", 2, None),          # InternLM2: plain rope, theta 1e4
    ("2", "bin", 1, {"type": "linear", "factor": 2.0}),
])
def test_native_logits_equal_internlm2s_own_forward(tmp_path, tokenizer_source, version, fmt, shards, rope):
    path = make_internlm2(tmp_path / "m", version=version, fmt=fmt, shards=shards, rope_scaling=rope,
                          max_position=32, tokenizer_from=tokenizer_source)
    model = _load(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(3, model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (20, 80):  # inside and past max_position_embeddings (dynamic NTK engages)
            want = reference_logits(path, ids[:, :length])
            got = model(input_ids=ids[:, :length]).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_reference_sees_dynamic_scaling_so_the_comparison_can_fail(tmp_path, tokenizer_source):
    scaled = make_internlm2(tmp_path / "a", max_position=32, tokenizer_from=tokenizer_source)
    plain = make_internlm2(tmp_path / "b", max_position=32, rope_scaling=None, tokenizer_from=tokenizer_source)
    ids = torch.randint(3, 400, (1, 80), generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(reference_logits(scaled, ids), reference_logits(plain, ids), atol=1e-3)
    torch.testing.assert_close(reference_logits(scaled, ids[:, :30]), reference_logits(plain, ids[:, :30]))


def test_packed_rows_equal_samples_run_alone(tmp_path, tokenizer_source):
    model = _load(make_internlm2(tmp_path / "m", tokenizer_from=tokenizer_source))
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(3, 400, (1, n), generator=g) for n in (9, 14, 6))
    row = torch.cat([a, b, c], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(14), torch.arange(6)])[None]
    with torch.no_grad():  # use_cache=False as in training: transformers then masks by positions
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits
        for start, sample in ((0, a), (9, b), (23, c)):
            alone = model(input_ids=sample, use_cache=False).logits
            torch.testing.assert_close(packed[:, start:start + sample.shape[1]], alone, atol=1e-5, rtol=1e-5)


TEXTS = ["Who are you?", "你是谁？请介绍一下你自己。", "  two leading spaces", "trailing  ", "a\tb\n\nc",
         "12345 67", "😀 emoji falls back to bytes", "\n", " ", "mixed 中文 and English!"]


def test_the_tokenizer_gives_sentencepieces_ids_without_remote_code(tokenizer_source):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_source / "tokenizer.model"))
    tok = load_tokenizer(tokenizer_source)  # trust_remote_code False: the remote code never runs
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text
    assert tok("hi")["input_ids"][0] == sp.bos_id()  # add_bos_token, as InternLM2's tokenizer
    # the chat tokens are the renamed [UNUSED_TOKEN_14x] pieces, and special
    unused = [sp.piece_to_id(f"[UNUSED_TOKEN_{i}]") for i in range(141, 147)]
    assert tok.convert_tokens_to_ids(CHAT_TOKENS) == unused
    chat = "<|im_start|>user\nWho are you?<|im_end|>\n"
    want = [unused[5]] + sp.encode("user\nWho are you?") + [unused[4]] + sp.encode("\n")
    assert tok(chat, add_special_tokens=False)["input_ids"] == want
    assert tok.decode(want, skip_special_tokens=True).strip() == "user\nWho are you?"


def test_the_saved_tokenizer_reloads_in_plain_transformers_with_the_same_ids(tokenizer_source, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_source)
    save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"], text


@settings(max_examples=40, deadline=None)
@given(kv=st.integers(1, 4), groups=st.integers(1, 4), head_dim=st.sampled_from([2, 4, 8]),
       cols=st.integers(1, 5), bias=st.booleans())
def test_split_then_fuse_is_bit_exact(kv, groups, head_dim, cols, bias):
    config = {"num_attention_heads": kv * groups, "num_key_value_heads": kv,
              "hidden_size": kv * groups * head_dim}
    rows = kv * (groups + 2) * head_dim
    wqkv = torch.randn(rows) if bias else torch.randn(rows, cols)
    q, k, v = internlm2.split_wqkv(wqkv, config)
    assert q.shape[0] == kv * groups * head_dim and k.shape[0] == v.shape[0] == kv * head_dim
    assert torch.equal(internlm2.fuse_wqkv(q, k, v, config), wqkv)


def test_split_follows_internlm2s_grouped_layout():
    # 2 kv heads, 2 query heads each, head_dim 1: rows are [q0 q1 k0 v0 | q2 q3 k1 v1]
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 4}
    q, k, v = internlm2.split_wqkv(torch.arange(8.0)[:, None], config)
    assert q.flatten().tolist() == [0, 1, 4, 5] and k.flatten().tolist() == [2, 6]
    assert v.flatten().tolist() == [3, 7]


def test_state_dict_round_trip_is_bit_exact(tmp_path, tokenizer_source):
    from internlm2_checkpoint import read_state

    path = make_internlm2(tmp_path / "m", tokenizer_from=tokenizer_source)
    config = json.loads((path / "config.json").read_text())
    original = read_state(path)
    back = internlm2.to_internlm2(internlm2.to_llama(original, config), config)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_unknown_rope_scaling_is_one_clear_error(tmp_path, tokenizer_source):
    path = make_internlm2(tmp_path / "m", rope_scaling={"type": "yarn", "factor": 4.0},
                          tokenizer_from=tokenizer_source)
    with pytest.raises(UserError, match="rope_scaling type 'yarn'"):
        _load(path)
