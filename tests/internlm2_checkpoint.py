"""Tiny random InternLM2 / InternLM2.5 checkpoints in the original layout, and a reference forward.

The checkpoint is what `internlm/internlm2_5-7b-chat` ships, shrunk: config.json with
`architectures: InternLM2ForCausalLM` and remote-code `auto_map`, fused `wqkv` weights (.bin or
safetensors, optionally sharded), a sentencepiece tokenizer (trained here) whose chat tokens are
`[UNUSED_TOKEN_14x]` pieces renamed by tokenizer_config.json, and InternLM2's chat template.
The reference forward is written from the architecture (InternLM2's modelling file), reading the
fused weights directly, so it checks tuneforge's split rather than reusing it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' "
                 "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
               "<|im_start|>"]
_WORDS_EN = ["who", "are", "you", "please", "introduce", "yourself", "tell", "me", "five", "scenic", "spots", "in", "shanghai", "hello", "world", "the", "assistant", "of", "long", "i", "am", "a", "helpful", "model", "answer", "question", "what", "is", "your", "name", "how", "can", "help", "today", "good", "morning", "thanks"]
_WORDS_ZH = list("你是谁请介绍一下自己我是龙的小助手上海五个景点很高兴为您服务名字什么今天好谢谢")


def train_sentencepiece(out_dir: Path, vocab_size: int = 500) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    lines = []
    for _ in range(1500):
        lines.append(" ".join(rng.choice(_WORDS_EN) for _ in range(8)) + rng.choice(["?", ".", "!"]))
        lines.append("".join(rng.choice(_WORDS_ZH) for _ in range(10)) + "。")
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        user_defined_symbols=[f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", minloglevel=2)
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return out_dir / "tokenizer.model"


def _tokenizer_config(unused_ids: list[int]) -> dict:
    def tok(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {"0": tok("<unk>"), "1": tok("<s>"), "2": tok("</s>")}
    decoder.update({str(i): tok(name) for i, name in zip(unused_ids, CHAT_TOKENS, strict=True)})
    return {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": CHAT_TOKENS[::-1],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "pad_token": "</s>",
        "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }


def make_internlm2(out: Path, *, version: str = "2.5", fmt: str = "safetensors", shards: int = 1,
                   rope_scaling: dict | None = "default", hidden: int = 64, layers: int = 2,
                   heads: int = 4, kv_heads: int = 2, max_position: int = 256, seed: int = 0,
                   tokenizer_from: Path | None = None) -> Path:
    """Write a random InternLM2(.5)-layout checkpoint to OUT; returns OUT."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        (out / "tokenizer.model").write_bytes((tokenizer_from / "tokenizer.model").read_bytes())
    else:
        train_sentencepiece(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    unused = [sp.piece_to_id(f"[UNUSED_TOKEN_{i}]") for i in range(141, 147)]
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(unused), indent=1))
    if rope_scaling == "default":  # InternLM2.5's own settings
        rope_scaling = {"type": "dynamic", "factor": 2.0} if version == "2.5" else None
    vocab = sp.get_piece_size()
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": hidden * 2, "max_position_embeddings": max_position,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": rope_scaling,
        "rope_theta": 1000000.0 if version == "2.5" else 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.41.0", "use_cache": True,
        "vocab_size": vocab,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, unused[4]], "pad_token_id": 2}))
    # Stand-ins for the remote-code files, which the original-layout merge copies.
    for name in ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                 "tokenization_internlm2_fast.py"):
        (out / name).write_text(f"# stand-in for InternLM2's {name}\n")

    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"model.tok_embeddings.weight": rand(vocab, hidden, scale=0.5),
             "model.norm.weight": 1 + rand(hidden, scale=0.1), "output.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "attention.wqkv.weight"] = rand((heads + 2 * kv_heads) * head_dim, hidden)
        state[p + "attention.wo.weight"] = rand(hidden, heads * head_dim)
        state[p + "feed_forward.w1.weight"] = rand(hidden * 2, hidden)
        state[p + "feed_forward.w3.weight"] = rand(hidden * 2, hidden)
        state[p + "feed_forward.w2.weight"] = rand(hidden, hidden * 2)
        state[p + "attention_norm.weight"] = 1 + rand(hidden, scale=0.1)
        state[p + "ffn_norm.weight"] = 1 + rand(hidden, scale=0.1)
    _write_weights(out, state, fmt, shards)
    return out


def _write_weights(out: Path, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    from safetensors.torch import save_file

    names = list(state)
    per = math.ceil(len(names) / shards)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for s in range(shards):
        part = {n: state[n].contiguous() for n in names[s * per:(s + 1) * per]}
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        if fmt == "safetensors":
            save_file(part, str(out / fname), metadata={"format": "pt"})
        else:
            torch.save(part, out / fname)
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}))


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for f in sorted(model_dir.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state


def reference_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward for one unpacked sequence [1, T], fp32, from the fused weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    w = read_state(model_dir)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, groups, eps = hidden // heads, heads // kv, cfg["rms_norm_eps"]
    seq = input_ids.shape[1]

    base, scaling = cfg["rope_theta"], cfg.get("rope_scaling")
    positions = torch.arange(seq, dtype=torch.float32)
    if scaling and scaling["type"] == "dynamic" and seq > cfg["max_position_embeddings"]:
        f, m = scaling["factor"], cfg["max_position_embeddings"]
        base = base * ((f * seq / m) - (f - 1)) ** (d / (d - 2))
    if scaling and scaling["type"] == "linear":
        positions = positions / scaling["factor"]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    x = w["model.tok_embeddings.weight"][input_ids[0]]  # [T, H]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        qkv = (h @ w[p + "attention.wqkv.weight"].T).reshape(seq, kv, groups + 2, d)
        q = qkv[:, :, :groups].reshape(seq, heads, d).transpose(0, 1)  # [heads, T, d]
        k = qkv[:, :, -2].transpose(0, 1)  # [kv, T, d]
        v = qkv[:, :, -1].transpose(0, 1)
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1)
        o = (att @ v).transpose(0, 1).reshape(seq, hidden)
        x = x + o @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    x = rms(x, w["model.norm.weight"])
    return (x @ w["output.weight"].T)[None]
