"""`convert gguf` on tiny random models of each supported architecture, read back by readers that
are not ours: transformers' GGUF loader (Llama, Qwen2, Llama-layout InternLM2) and, for
llama.cpp's own `internlm2` architecture that transformers cannot load, the gguf reader with
transformers' inverse of llama.cpp's row order and InternLM2's reference forward."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_config

from tuneforge.cli import main
from tuneforge.convert import gguf_arch
from tuneforge.convert.gguf import convert_gguf
from tuneforge.convert.ollama import convert_ollama
from tuneforge.errors import UserError

TEXTS = ["Please introduce yourself", "你是谁？我是龙的小助手。", "Tell me 5 spots, 12 345 and 6.7!",
         "  two  spaces\nand a line", "<|im_start|>user\nhi<|im_end|>\n"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rounded_to_f16(model):
    """MODEL with every matrix rounded to float16 and computed in float32, as a reader of an f16
    GGUF computes: the one change an f16 file makes (norms and biases stay float32 in it)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return model


def gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 400, 17]])


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory):
    from internlm2_checkpoint import make_internlm2

    return make_internlm2(tmp_path_factory.mktemp("internlm2"), rope_scaling=None, hidden=64, heads=4,
                          kv_heads=2)


@pytest.fixture(scope="module")
def small_llama(internlm2_dir, tmp_path_factory):
    """A 2-layer random Llama with a 500-token vocabulary (InternLM2's tiny sentencepiece one, with
    its chat template): small enough that every reader opens its GGUF at once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models.load import load_tokenizer, save_tokenizer

    tok = load_tokenizer(internlm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="module")
def llama_f16(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    convert_gguf(tiny_model_dir, out, "f16", progress=False)
    return out


def test_llama_f16_loads_in_transformers_with_the_same_logits(small_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert_gguf(small_llama, tmp_path / "m.gguf", "f16", progress=False).path
    ref = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32)
    back = gguf_model(out)
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 2
    got = logits(back, IDS)
    torch.testing.assert_close(got, logits(rounded_to_f16(ref), IDS), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), logits(ref, IDS).argmax(-1))
    types = tensor_types(out)
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses the embedding


def test_llama_f32_is_exact(small_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert_gguf(small_llama, tmp_path / "m.gguf", "f32", progress=False).path
    ref = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32).state_dict()
    back = gguf_model(out).state_dict()
    for name, tensor in ref.items():
        if name != "lm_head.weight":
            torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)


def test_the_vocabulary_encodes_as_the_tokenizer_does(tokenizer, llama_f16):
    meta = fields(llama_f16)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    back = gguf_tokenizer(llama_f16)
    for text in TEXTS:
        assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == im_end
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL


def test_quantized_types_load_and_keep_the_output_layer_wider(small_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32)
    weights, ref_logits = ref.state_dict(), logits(ref, IDS)
    # (type, the embedding's type, the weights' relative RMS error, the logits' largest error relative
    # to the largest logit: the tiny model's weights are drawn wide, so errors grow through it, and
    # at 4 bits they grow past saying anything; its weights are checked alone)
    for kind, embedding, rms, tol in (("q8_0", "Q8_0", 0.01, 0.1), ("q4_0", "Q8_0", 0.12, None),
                                      ("bf16", "BF16", 0.005, 0.05)):
        out = convert_gguf(small_llama, tmp_path / f"{kind}.gguf", kind, progress=False).path
        types = tensor_types(out)
        assert types["blk.1.ffn_down.weight"] == kind.upper() and types["token_embd.weight"] == embedding
        assert fields(out)["general.file_type"] == gguf_type(kind)
        back = gguf_model(out)
        for name, w in back.state_dict().items():
            if w.dim() > 1 and name != "lm_head.weight":
                assert ((w - weights[name]).pow(2).mean() / weights[name].pow(2).mean()).sqrt() <= rms, name
        error = (logits(back, IDS) - ref_logits).abs().max() / ref_logits.abs().max()
        assert tol is None or error <= tol, (kind, float(error))


def gguf_type(kind: str) -> int:
    return {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16}[kind]


@pytest.fixture(scope="module")
def qwen2_dir(internlm2_dir, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tuneforge.models.load import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(internlm2_dir)

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=1e6, initializer_range=0.2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


def test_qwen2_keeps_its_biases_and_rotation(qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert_gguf(qwen2_dir, tmp_path / "q.gguf", "f16", progress=False).path
    assert fields(out)["general.architecture"] == "qwen2"
    types = tensor_types(out)
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= set(types)
    ref = rounded_to_f16(AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32))
    torch.testing.assert_close(logits(gguf_model(out), IDS), logits(ref, IDS), rtol=1e-5, atol=1e-5)


_BACK = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def read_back_as_llama(path, config: dict) -> dict[str, torch.Tensor]:
    """The GGUF's tensors under transformers' Llama names, in transformers' row order, undone by
    transformers' own inverse of llama.cpp's q/k order."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor({"num_attention_heads": config["num_attention_heads"],
                                 "num_key_value_heads": config["num_key_value_heads"]})
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        data = gguf.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        data = undo.process(np.array(data), t.name).weights
        m = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", t.name)
        if m:
            state[f"model.layers.{m[1]}.{_BACK[m[2]]}.{m[3]}"] = torch.from_numpy(np.array(data))
        else:
            stem, kind = t.name.rsplit(".", 1)
            state[f"{_BACK[stem]}.{kind}"] = torch.from_numpy(np.array(data))
    return state


@pytest.mark.parametrize("kind,tol", [("f32", 1e-5), ("f16", 2e-3)])
def test_internlm2_splits_wqkv_as_llama_cpp_expects(internlm2_dir, tmp_path, kind, tol):
    from internlm2_checkpoint import reference_logits
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import internlm2

    out = convert_gguf(internlm2_dir, tmp_path / "i.gguf", kind, progress=False).path
    meta = fields(out)
    assert meta["general.architecture"] == "internlm2" and meta["tokenizer.ggml.model"] == "llama"
    original = json.loads((internlm2_dir / "config.json").read_text())
    config = internlm2.llama_config(original)
    config.pop("dtype", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = model.load_state_dict(read_back_as_llama(out, original), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 250]])
    got, ref = logits(model, ids), reference_logits(internlm2_dir, ids)
    assert (got - ref).abs().max() <= tol * ref.abs().max()  # f16: rounding, relative to the logits' scale


def test_internlm2_vocabulary_is_sentencepiece_with_its_chat_tokens(internlm2_dir, tmp_path):
    import sentencepiece as spm

    from tuneforge.models.load import load_tokenizer

    out = convert_gguf(internlm2_dir, tmp_path / "i.gguf", "f16", progress=False).path
    meta = fields(out)
    tok = load_tokenizer(internlm2_dir)
    sp = spm.SentencePieceProcessor(model_file=str(internlm2_dir / "tokenizer.model"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.tokens"][im_end] == "<|im_end|>"
    assert meta["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.eos_token_id"] == im_end and meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.scores"][:50] == pytest.approx([sp.get_score(i) for i in range(50)])
    assert meta["tokenizer.ggml.token_type"][sp.piece_to_id("<0x0A>")] == gguf.TokenType.BYTE
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_internlm2_in_the_llama_layout_is_llama_with_a_sentencepiece_vocabulary(internlm2_dir, tmp_path):
    from tuneforge.models.load import load_model, load_tokenizer, save_tokenizer

    llama_dir = tmp_path / "llama-layout"
    model = load_model(internlm2_dir, torch.device("cpu"), torch.float32)
    model.save_pretrained(llama_dir)
    tok = load_tokenizer(internlm2_dir)
    save_tokenizer(tok, llama_dir)
    report = convert_gguf(llama_dir, tmp_path / "l.gguf", "f32", progress=False)
    assert any("scores derived from the merge order" in n for n in report.notes)  # no tokenizer.model
    (llama_dir / "tuneforge_merge.json").write_text(json.dumps({"base": str(internlm2_dir)}))
    report = convert_gguf(llama_dir, tmp_path / "l.gguf", "f32", force=True, progress=False)
    assert not report.notes  # a merge: the base's tokenizer.model gives sentencepiece's own scores
    out = report.path
    meta = fields(out)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "llama"
    assert meta["general.base_model.0.name"] == str(internlm2_dir)
    back = gguf_tokenizer(out)
    # Text right after a special token is left out: llama.cpp and InternLM2's own tokenizer put ▁ in
    # front of it, transformers' GGUF reader does not (test_gguf_llama_cpp checks llama.cpp's).
    for text in ["who are you?", "你是谁请介绍一下自己", "hello  world\n", "hi<|im_end|>"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 250]])
    torch.testing.assert_close(logits(gguf_model(out), ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_is_a_rope_freqs_tensor():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10,
              "max_position_embeddings": 8192, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    (name, factors), = gguf_arch.rope_tensors(config).items()
    assert name == "rope_freqs.weight" and factors.shape == (16,)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)  # fast ones kept, slow ones /8


def test_the_tensor_plan_permutes_q_and_k_for_llama_but_not_qwen2():
    base = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
            "intermediate_size": 8, "vocab_size": 4}
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
              "model.layers.0.self_attn.v_proj.weight": (4, 8)}
    llama = {p.name: p.heads for p in gguf_arch.plan({**base, "architectures": ["LlamaForCausalLM"]}, shapes)}
    qwen = {p.name: p.heads for p in gguf_arch.plan({**base, "architectures": ["Qwen2ForCausalLM"]}, shapes)}
    assert llama == {"blk.0.attn_q.weight": 2, "blk.0.attn_k.weight": 1, "blk.0.attn_v.weight": None}
    assert set(qwen.values()) == {None}
    rows = torch.arange(8.0)[:, None]  # one head of 8: halves [0..3 | 4..7] -> pairs (0,4), (1,5) ...
    assert gguf_arch.pairwise_rope_rows(rows, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_an_unsupported_architecture_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UserError, match="GPT2LMHeadModel cannot be written as GGUF.*LlamaForCausalLM, Qwen2ForCausalLM"):
        convert_gguf(tmp_path, tmp_path / "o.gguf")


def test_outtypes_the_gguf_library_cannot_make_name_the_llama_cpp_tool(small_llama, tmp_path):
    with pytest.raises(UserError, match="llama-quantize OUT-f16.gguf OUT-Q4_K_M.gguf Q4_K_M"):
        convert_gguf(small_llama, tmp_path / "o.gguf", "q4_k_m")
    with pytest.raises(UserError, match="expected one of f32, f16, bf16, q8_0"):
        convert_gguf(small_llama, tmp_path / "o.gguf", "int3")


def test_an_existing_file_needs_force_and_survives_a_failed_write(small_llama, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists; pass --force"):
        convert_gguf(small_llama, out, "f16", progress=False)
    calls = {"n": 0}
    real = gguf_arch.produce

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_arch, "produce", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_gguf(small_llama, out, "f16", force=True, progress=False)
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.setattr(gguf_arch, "produce", real)
    convert_gguf(small_llama, out, "f16", force=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"


def test_the_command_prints_one_line_on_bad_input_and_writes_on_good(small_llama, tmp_path, capsys):
    assert main(["convert", "gguf", str(tmp_path / "nowhere"), str(tmp_path / "o.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tuneforge: error:") and "Traceback" not in err
    assert main(["convert", "gguf", str(small_llama), str(tmp_path / "o.gguf"), "--outtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "o.gguf").is_file()
    assert main(["convert", "gguf", str(small_llama), str(tmp_path / "o.gguf")]) == 1
    assert "--force" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_adapter(small_llama, tmp_path_factory):
    from tuneforge.convert.pth_to_hf import convert_checkpoint
    from tuneforge.data.selfcog import write_self_cognition
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import train

    root = tmp_path_factory.mktemp("lora")
    write_self_cognition(root / "id.jsonl", "龙", "Long")
    cfg = tiny_config(small_llama, root / "id.jsonl", max_steps=2, lr=5e-2, prompt_template="chatml")
    return convert_checkpoint(train(cfg, root / "work", RunOptions(progress=False)), root / "hf", fp32=True)


def test_a_base_with_an_adapter_is_the_merged_model(small_llama, tiny_adapter, tmp_path):
    from tuneforge.convert.merge import merge_adapter
    from tuneforge.data.templates import NAMED_TEMPLATES

    merged = merge_adapter(str(small_llama), tiny_adapter, tmp_path / "merged")
    a = convert_gguf(merged, tmp_path / "a.gguf", "f32", progress=False).path
    b = convert_gguf(small_llama, tmp_path / "b.gguf", "f32", adapter=tiny_adapter, progress=False).path
    ta = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(b)).tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_allclose(ta[name], tb[name], rtol=0, atol=1e-6, err_msg=name)
    for path in (a, b):  # the trained template, not the base's own
        assert fields(path)["tokenizer.chat_template"] == NAMED_TEMPLATES["chatml"].chat_template


def test_ollama_folder_holds_the_gguf_and_a_modelfile(small_llama, tmp_path, capsys):
    out = tmp_path / "ollama"
    report = convert_ollama(small_llama, out, "q8_0", system="Be brief.", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    text = (out / "Modelfile").read_text()
    assert 'SYSTEM """Be brief."""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "ollama create ollama -f" in report.summary()
    with pytest.raises(UserError, match="not empty; pass --force"):
        convert_ollama(small_llama, out, progress=False)
    assert main(["convert", "ollama", str(small_llama), str(out), "--force", "--quant", "q4_0"]) == 0
    assert tensor_types(out / "model.gguf")["blk.0.ffn_up.weight"] == "Q4_0"


def test_a_base_model_without_a_chat_template_converts_but_has_no_ollama_template(small_llama, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(small_llama, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)  # where transformers 5 writes it
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    out = convert_gguf(base, tmp_path / "b.gguf", "q8_0", progress=False).path
    meta = fields(out)
    assert "tokenizer.chat_template" not in meta and "tokenizer.ggml.eot_token_id" not in meta
    with pytest.raises(UserError, match="no chat template"):
        convert_ollama(base, tmp_path / "ollama", progress=False)


def test_byte_level_pre_tokenizers_get_the_llama_cpp_name_that_splits_alike():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from tuneforge.convert.gguf_vocab import bpe_pre_tokenizer

    def split(regex: str) -> dict:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    assert bpe_pre_tokenizer(split(_LLAMA3_SPLIT), [], False) == "llama-bpe"
    assert bpe_pre_tokenizer(split(PRETOKENIZE_REGEX), [], False) == "qwen2"
    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert bpe_pre_tokenizer(byte_level, ["Ġ t"], False) == "smollm"  # no merge joins digits
    assert bpe_pre_tokenizer(byte_level, ["1 2"], False) == "gpt-2"
    assert bpe_pre_tokenizer(byte_level, [], True) == "gpt-2"  # it cleans up spaces when decoding
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert bpe_pre_tokenizer(digits, [], False) == "smollm"
    with pytest.raises(UserError, match=r"pre-tokenizer \(Split, ByteLevel\) is not one llama.cpp"):
        bpe_pre_tokenizer(split(r"\w+"), [], False)
