"""InternLM2 / InternLM2.5 checkpoints as transformers' own Llama model, and back.

InternLM2 is the Llama architecture under other names, with one real difference: q, k and v are
one fused ``wqkv`` projection whose output rows are grouped per key/value head,
``[q_0 .. q_{g-1}, k, v]`` for each of the ``num_key_value_heads`` heads (g = heads per kv head).
Its modelling code lives in the checkpoint (remote code) and no longer runs on transformers 5, so
tuneforge never runs it: the weights are renamed and ``wqkv`` split on load (``to_llama``), and
fused again when a user wants the original layout back (``to_internlm2``). The split and the fuse
are exact inverses (pure row permutations), so a round trip is bit-exact.

The tokenizer is InternLM2's sentencepiece model. Its chat tokens (``<|im_start|>`` ...) are
pieces renamed by ``tokenizer_config.json``; ``load_tokenizer`` builds a plain fast tokenizer from
the sentencepiece model with those names, that encodes exactly as sentencepiece does.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import UserError

ARCHITECTURE = "InternLM2ForCausalLM"

# InternLM2 name part -> Llama name part (a leading "^" anchors it at the start of the name);
# wqkv is handled apart. Read left to right to load, right to left to write the original back.
_NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("^model.tok_embeddings.", "^model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    ("^output.", "^lm_head."),
)


def _rule(source: str, target: str) -> tuple[str, str]:
    anchored = source.startswith("^")
    return ("^" if anchored else "") + re.escape(source.lstrip("^")), target.lstrip("^")


_RENAMES = tuple(_rule(a, b) for a, b in _NAME_PAIRS)
_BACK = tuple(_rule(b, a) for a, b in _NAME_PAIRS)
_WQKV = re.compile(r"^(model\.layers\.\d+\.)attention\.wqkv\.(weight|bias)$")
_QKV = re.compile(r"^(model\.layers\.\d+\.)self_attn\.([qkv])_proj\.(weight|bias)$")
# The Llama module names each InternLM2 module becomes, for LoRA target lists and adapters.
MODULE_NAMES = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w1": ("gate_proj",),
                "w3": ("up_proj",), "w2": ("down_proj",), "output": ("lm_head",)}


def read_config(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_internlm2(config: Mapping[str, Any] | None) -> bool:
    if not config:
        return False
    return config.get("model_type") == "internlm2" or ARCHITECTURE in (config.get("architectures") or [])


def is_internlm2_dir(model_dir: str | Path) -> bool:
    return is_internlm2(read_config(model_dir))


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in ("dynamic", "linear"):
        raise UserError(f"InternLM2 rope_scaling type {kind!r} is not supported (InternLM2 knows "
                        "'dynamic' and 'linear'); check the checkpoint's config.json")
    return {"rope_type": kind, "factor": float(scaling["factor"]), "rope_theta": theta}


def llama_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Llama config.json equivalent to an InternLM2 one."""
    heads = config["num_attention_heads"]
    bias = bool(config.get("bias", False))
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"], "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config["hidden_size"] // heads,
        "hidden_act": config.get("hidden_act", "silu"),
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "initializer_range": config.get("initializer_range", 0.02),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention_bias": bias, "mlp_bias": bias,
        "rope_parameters": _rope(config),
        "bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2),
        "pad_token_id": config.get("pad_token_id", 2),
    }
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype:
        out["dtype"] = dtype
    return out


def _groups(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(kv heads, query heads per kv head, head dim)."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return kv, heads // kv, config["hidden_size"] // heads


def split_wqkv(wqkv: torch.Tensor, config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused rows -> Llama's q, k, v (weight [rows, in] or bias [rows])."""
    kv, g, d = _groups(config)
    grouped = wqkv.reshape(kv, g + 2, d, *wqkv.shape[1:])
    q = grouped[:, :g].reshape(kv * g * d, *wqkv.shape[1:])
    k = grouped[:, g].reshape(kv * d, *wqkv.shape[1:])
    v = grouped[:, g + 1].reshape(kv * d, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """The inverse of ``split_wqkv``."""
    kv, g, d = _groups(config)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(kv, g, d, *rest), k.reshape(kv, 1, d, *rest),
                         v.reshape(kv, 1, d, *rest)], dim=1)
    return grouped.reshape(kv * (g + 2) * d, *rest).contiguous()


def _rename(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def to_llama(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An InternLM2 state dict in Llama names, ``wqkv`` split."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _WQKV.match(name)
        if m:
            prefix, kind = m.groups()
            for part, t in zip("qkv", split_wqkv(tensor, config), strict=True):
                out[f"{prefix}self_attn.{part}_proj.{kind}"] = t
        elif not name.endswith("rotary_emb.inv_freq"):
            out[_rename(name, _RENAMES)] = tensor
    return out


def to_internlm2(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Llama-named state dict back in InternLM2 names, q/k/v fused into ``wqkv``."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _QKV.match(name)
        if m:
            prefix, part, kind = m.groups()
            parts.setdefault((prefix, kind), {})[part] = tensor
        else:
            out[_rename(name, _BACK)] = tensor
    for (prefix, kind), qkv in parts.items():
        out[f"{prefix}attention.wqkv.{kind}"] = fuse_wqkv(qkv["q"], qkv["k"], qkv["v"], config)
    return out


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors preferred, else PyTorch .bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (model_dir / index).is_file():
            shards = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise UserError(f"no weights in '{model_dir}': expected model.safetensors or pytorch_model.bin "
                    "(or their sharded .index.json)")


def read_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for f in weight_files(model_dir):
        if f.suffix == ".safetensors":
            yield from load_file(str(f)).items()
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


def load_model(model_dir: Path, kwargs: dict[str, Any]) -> Any:
    """An InternLM2 checkpoint as ``LlamaForCausalLM``: KWARGS are from_pretrained's (dtype,
    quantization, device map, attention), so 4-bit and every other loading option apply."""
    from transformers import LlamaConfig, LlamaForCausalLM

    original = read_config(model_dir) or {}
    llama = llama_config(original)
    llama.pop("dtype", None)
    config = LlamaConfig(**llama)
    state = to_llama(dict(read_weights(model_dir)), original)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    if kwargs.get("dtype") == "auto":
        kwargs["dtype"] = getattr(torch, str(original.get("torch_dtype") or "float32").replace("torch.", ""))
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, **kwargs)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


# --- tokenizer ---------------------------------------------------------------------------------

def _normalizer_and_decoder(proto: Any) -> tuple[Any, Any]:
    """What sentencepiece does to text before and after its pieces, as `tokenizers` steps."""
    from tokenizers import Regex, decoders, normalizers

    spec = proto.normalizer_spec
    norm: list[Any] = []
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    return normalizers.Sequence(norm), decoders.Sequence(dec)


def load_tokenizer(model_dir: Path) -> Any:
    """InternLM2's tokenizer without its remote code: a fast tokenizer built from
    ``tokenizer.model`` whose ids equal sentencepiece's, with the chat tokens named."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as err:  # protobuf or sentencepiece missing
        raise UserError("InternLM2's tokenizer needs sentencepiece and protobuf: "
                        "pip install sentencepiece protobuf") from err
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    model_file = model_dir / "tokenizer.model"
    if not model_file.is_file():
        raise UserError(f"'{model_dir}' is an InternLM2 checkpoint without tokenizer.model")
    settings = json.loads((model_dir / "tokenizer_config.json").read_text()) \
        if (model_dir / "tokenizer_config.json").is_file() else {}
    if settings.get("add_eos_token"):
        raise UserError(f"'{model_dir}': an InternLM2 tokenizer with add_eos_token = true is not "
                        "supported; set it to false in tokenizer_config.json (InternLM2's own is false)")
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    added = settings.get("added_tokens_decoder") or {}
    for index, token in added.items():
        proto.pieces[int(index)].piece = token["content"]
    specials = {k: settings.get(k, d) for k, d in
                (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "</s>"))}
    specials = {k: v["content"] if isinstance(v, dict) else v for k, v in specials.items()}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(proto.SerializeToString())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", **specials}))
        built = LlamaTokenizer.from_pretrained(tmp)
    backend = built.backend_tokenizer
    backend.normalizer, backend.decoder = _normalizer_and_decoder(proto)
    backend.pre_tokenizer = None
    extra = [t["content"] for i, t in sorted(added.items(), key=lambda kv: int(kv[0]))
             if t.get("special") and t["content"] not in specials.values()]
    # The converter adds sentencepiece's user-defined pieces as plain added tokens; the chat
    # tokens are special (skipped when decoding answers), as tokenizer_config.json says.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials,
                                  extra_special_tokens=extra, clean_up_tokenization_spaces=False,
                                  add_bos_token=settings.get("add_bos_token", True), add_eos_token=False,
                                  chat_template=settings.get("chat_template"))
    return tok


def copy_code_files(src: Path, dst: Path) -> list[str]:
    """The original remote-code files (configuration/modeling/tokenization *.py) beside DST."""
    copied = []
    for f in sorted(src.glob("*.py")):
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
