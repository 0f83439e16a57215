"""What llama.cpp calls each supported architecture, its hyperparameters and its tensors.

A model folder's config.json names its architecture; this module says which llama.cpp
architecture that is (Llama and SmolLM are ``llama``, Qwen2/Qwen2.5 ``qwen2``, InternLM2 in its
original layout ``internlm2``), writes the hyperparameters under llama.cpp's keys, and plans one
GGUF tensor per weight: its llama.cpp name (from the ``gguf`` library's own name tables) and the
row order llama.cpp wants. An InternLM2 folder that tuneforge merged in the Llama layout is plain
Llama here.

Two row orders differ from transformers':
- llama.cpp's ``llama`` and ``internlm2`` rotate adjacent pairs of each head's dimensions (GPT-J
  style), transformers rotates the two halves of the head against each other. The q and k rows of
  every head are reordered from ``[0..d/2, d/2..d]`` to ``[0, d/2, 1, d/2+1, ...]``, which is the
  same rotation in the other convention. ``qwen2`` rotates halves too, so it keeps the order.
- InternLM2's fused ``wqkv`` holds, per key/value head, that head's queries then its key and its
  value; llama.cpp's ``internlm2`` wants separate q, k and v, so it is split
  (``internlm2.split_wqkv``, the same split tuneforge loads these models with) and then permuted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from tuneforge.errors import UserError
from tuneforge.models import internlm2

# config.json "architectures" -> llama.cpp architecture
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    internlm2.ARCHITECTURE: gguf.MODEL_ARCH.INTERNLM2,
}
_MODEL_TYPES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                "internlm2": gguf.MODEL_ARCH.INTERNLM2}  # for configs built in memory, with no list
_PAIRWISE_ROPE = {gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.INTERNLM2}  # llama.cpp's "NORM" rope
_PERMUTED = {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K}
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed from rope.freq_base by every reader


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: made from SOURCE (part q/k/v of a fused wqkv, or the whole tensor),
    its rows reordered for HEADS heads when ``heads`` is set."""

    name: str
    source: str
    shape: tuple[int, ...]
    part: str | None = None
    heads: int | None = None


def architecture_of(config: Mapping[str, Any]) -> gguf.MODEL_ARCH:
    names = list(config.get("architectures") or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[config["model_type"]]
    found = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise UserError(f"{found} cannot be written as GGUF by tuneforge; supported: "
                    f"{', '.join(ARCHITECTURES)} (Llama, SmolLM, Qwen2/2.5, InternLM2/2.5)")


def _heads(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim)."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return heads, kv, head_dim


def rope_settings(config: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling settings or {}), from either spelling transformers has used."""
    params = config.get("rope_parameters") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = dict(config.get("rope_scaling") or {})
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = dict(params)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, ({} if kind == "default" else {**scaling, "rope_type": kind})


def write_hyperparameters(writer: gguf.GGUFWriter, config: Mapping[str, Any],
                          context: int | None) -> list[str]:
    """The model's shape under llama.cpp's keys; returns notes for the user (rope settings
    llama.cpp has no equivalent for)."""
    heads, kv, head_dim = _heads(config)
    hidden = int(config["hidden_size"])
    writer.add_context_length(int(context or config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_vocab_size(int(config["vocab_size"]))
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    return _write_rope_scaling(writer, scaling)


def _write_rope_scaling(writer: gguf.GGUFWriter, scaling: Mapping[str, Any]) -> list[str]:
    kind = scaling.get("rope_type")
    if not kind or kind == "llama3":  # llama3's factors are a tensor (rope_tensors)
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return []
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        return []
    if kind == "dynamic":
        # Dynamic NTK changes nothing until a sequence outgrows max_position_embeddings, and
        # llama.cpp has no such mode; within the trained context the two compute the same.
        return ["rope_scaling 'dynamic' has no llama.cpp equivalent: the GGUF uses plain rope, "
                "identical up to the model's max_position_embeddings"]
    raise UserError(f"rope scaling {kind!r} cannot be written as GGUF by tuneforge "
                    "(supported: linear, yarn, llama3, dynamic)")


def rope_tensors(config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Llama 3.1-style rope scaling, which llama.cpp reads as a ``rope_freqs`` tensor of
    per-frequency divisors: transformers' own inverse frequencies, divided into the plain ones."""
    _, scaling = rope_settings(config)
    if scaling.get("rope_type") != "llama3":
        return {}
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama, "cpu")
    theta, _ = rope_settings(config)
    dim = _heads(config)[2]
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": (plain / scaled.float())}


def _split_names(name: str, config: Mapping[str, Any], arch: gguf.MODEL_ARCH) -> list[tuple[str, str | None]]:
    """HF name -> the Llama-style names it becomes, with the wqkv part each one is."""
    if arch != gguf.MODEL_ARCH.INTERNLM2:
        return [(name, None)]
    if ".attention.wqkv." in name:
        stem, kind = name.split(".attention.wqkv.")
        return [(f"{stem}.self_attn.{p}_proj.{kind}", p) for p in "qkv"]
    return [(n, None) for n in internlm2.to_llama({name: torch.empty(0)}, config)]


def plan(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Planned]:
    """One ``Planned`` per GGUF tensor, in the folder's order. SHAPES: HF name -> shape."""
    arch = architecture_of(config)
    names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    heads, kv, head_dim = _heads(config)
    tied = bool(config.get("tie_word_embeddings"))
    out: list[Planned] = []
    for source, shape in shapes.items():
        if source.endswith(_SKIPPED_SUFFIXES):
            continue
        for llama_name, part in _split_names(source, config, arch):
            found = names.get_type_and_name(llama_name, try_suffixes=(".weight", ".bias"))
            if found is None:
                raise UserError(f"tensor '{source}' has no llama.cpp name in architecture "
                                f"'{gguf.MODEL_ARCH_NAMES[arch]}'; is this a plain {arch.name.lower()} model?")
            kind, gguf_name = found
            if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
                continue  # the embedding matrix is the output layer; llama.cpp reuses it
            rows = {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}
            part_shape = (rows[part], *shape[1:]) if part else tuple(shape)
            permute = heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv
            out.append(Planned(gguf_name, source, part_shape, part,
                               permute if arch in _PAIRWISE_ROPE and kind in _PERMUTED else None))
    return out


def pairwise_rope_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves-rotated to pairs-rotated (see the module docstring)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def produce(item: Planned, load: Callable[[str], torch.Tensor], config: Mapping[str, Any]) -> torch.Tensor:
    """The fp32 tensor for ITEM, its rows as llama.cpp wants them."""
    tensor = load(item.source).float()
    if item.part is not None:
        tensor = dict(zip("qkv", internlm2.split_wqkv(tensor, config), strict=True))[item.part]
    if item.heads is not None:
        tensor = pairwise_rope_rows(tensor, item.heads)
    return tensor
