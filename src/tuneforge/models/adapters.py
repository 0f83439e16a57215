"""PEFT LoRA adapters for InternLM2 in either layout, and attaching any adapter to a loaded model.

tuneforge trains InternLM2 as Llama, so its adapters name Llama modules (q_proj ... lm_head).
Adapters made by XTuner or peft on the original remote-code model name InternLM2's (wqkv, wo,
w1/w2/w3, output). Both convert exactly:
- original -> Llama: a LoRA on wqkv is ``B @ A``; q, k and v each keep A and take their rows of
  B (``split_wqkv`` on B's rows).
- Llama -> original: three LoRAs of rank r (q, k, v) are one of rank 3r on wqkv: A stacks the
  three A's, B holds each B in its own block of columns, its rows interleaved as wqkv's are
  (``fuse_wqkv``), and alpha scales by the same factor so the update is unchanged.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import UserError
from tuneforge.models import internlm2

PREFIX = "base_model.model."
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_ORIGINAL_MODULES = set(internlm2.MODULE_NAMES)
_LLAMA_TO_ORIGINAL = {new: old for old, news in internlm2.MODULE_NAMES.items() for new in news}


def read_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (adapter_dir / ADAPTER_WEIGHTS[0]).is_file():
        return load_file(str(adapter_dir / ADAPTER_WEIGHTS[0])), config
    if (adapter_dir / ADAPTER_WEIGHTS[1]).is_file():
        return torch.load(adapter_dir / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True), config
    raise UserError(f"'{adapter_dir}' has adapter_config.json but no adapter_model.safetensors")


def write_adapter(out: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS[0]),
              metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(dict(config), indent=2, default=str))


def _targets(config: Mapping[str, Any]) -> set[str]:
    """The target modules by their last name (peft may store full paths; every layer's module of
    that name is adapted in the adapters tuneforge writes and converts)."""
    targets = config.get("target_modules") or []
    return {t.rpartition(".")[2] for t in ([targets] if isinstance(targets, str) else targets)}


def is_original_layout(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> bool:
    """True for an adapter on InternLM2's own module names (XTuner's, or peft on remote code)."""
    return bool(_targets(config) & _ORIGINAL_MODULES) or any(
        ".attention.wqkv." in k or ".feed_forward.w" in k for k in tensors)


def _check_plain_lora(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    odd = [k for k in tensors if not _LORA.match(k)]
    if odd or config.get("use_dora"):
        raise UserError(f"cannot convert this adapter between InternLM2 layouts: only plain LoRA "
                        f"weights are supported (found {odd[:2] or 'DoRA'})")


def _scale_alpha(alpha: float, factor: int, rslora: bool) -> float:
    return alpha * (math.sqrt(factor) if rslora else factor)


def to_llama_layout(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    base: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An original-layout InternLM2 adapter as one on the Llama model tuneforge loads."""
    _check_plain_lora(tensors, config)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _LORA.match(key)
        module, kind = m["module"], m["kind"]
        inner = module[len(PREFIX):] if module.startswith(PREFIX) else module
        if inner.endswith(".attention.wqkv"):
            stem = inner[: -len("attention.wqkv")]
            parts = internlm2.split_wqkv(t, base) if kind == "lora_B" else (t, t, t)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                out[f"{PREFIX}{stem}self_attn.{name}.{kind}.weight"] = part.clone()
        else:
            out[f"{PREFIX}{_module(internlm2.to_llama, inner, base)}.{kind}.weight"] = t
    targets = sorted({n for m in _targets(config) for n in internlm2.MODULE_NAMES.get(m, (m,))})
    new_config = {**config, "target_modules": targets,
                  "rank_pattern": _rename_patterns(config.get("rank_pattern"), internlm2.MODULE_NAMES),
                  "alpha_pattern": _rename_patterns(config.get("alpha_pattern"), internlm2.MODULE_NAMES)}
    return out, new_config


def _module(rename: Any, module: str, base: Mapping[str, Any]) -> str:
    """A module's name through a state-dict renaming (which works on parameter names)."""
    (name,) = rename({module + ".weight": torch.empty(0)}, base)
    return name[: -len(".weight")]


def _rename_patterns(patterns: Mapping[str, Any] | None,
                     names: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern keys (module names, last part matched) in the new names."""
    out: dict[str, Any] = {}
    for key, value in (patterns or {}).items():
        head, _, last = key.rpartition(".")
        for new in names.get(last, (last,)):
            out[f"{head}.{new}" if head else new] = value
    return out


def to_original_layout(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                       base: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Llama-layout adapter (tuneforge's) for peft users of the original remote-code model."""
    _check_plain_lora(tensors, config)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("cannot write an adapter with rank_pattern/alpha_pattern in InternLM2's layout")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _LORA.match(key)
        module, kind = m["module"], m["kind"]
        inner = module[len(PREFIX):] if module.startswith(PREFIX) else module
        found = re.match(r"^(.*\.)self_attn\.([qkv])_proj$", inner)
        if found:
            qkv.setdefault(found[1], {}).setdefault(found[2], {})[kind] = t
        else:
            out[f"{PREFIX}{_module(internlm2.to_internlm2, inner, base)}.{kind}.weight"] = t
    present: set[int] = set()
    for stem, parts in qkv.items():
        names = [p for p in "qkv" if p in parts]
        present.add(len(names))
        a = torch.cat([parts[p]["lora_A"] for p in names])  # [len(names) * r, in]
        kv, g, d = internlm2._groups(base)
        rows = {"q": kv * g * d, "k": kv * d, "v": kv * d}
        blocks = {}
        for p in "qkv":
            b = torch.zeros(rows[p], a.shape[0], dtype=a.dtype)
            if p in names:
                i = names.index(p)
                b[:, i * r:(i + 1) * r] = parts[p]["lora_B"]
            blocks[p] = b
        out[f"{PREFIX}{stem}attention.wqkv.lora_A.weight"] = a
        out[f"{PREFIX}{stem}attention.wqkv.lora_B.weight"] = internlm2.fuse_wqkv(
            blocks["q"], blocks["k"], blocks["v"], base)
    if len(present) > 1:
        raise UserError("cannot fuse q/k/v adapters that target different projections in different layers")
    targets = sorted({_LLAMA_TO_ORIGINAL.get(m, m) for m in _targets(config)})
    new_config = {**config, "target_modules": targets}
    if present:
        (n,) = present
        new_config["rank_pattern"] = {"wqkv": r * n}
        new_config["alpha_pattern"] = {"wqkv": _scale_alpha(alpha, n, bool(config.get("use_rslora")))}
    return out, new_config


def attach_adapter(model: Any, adapter_dir: Path, base_dir: Path, trainable: bool = False) -> Any:
    """MODEL with the adapter in ADAPTER_DIR; an original-layout InternLM2 adapter on the natively
    loaded (Llama) model is converted on the way."""
    from peft import PeftModel

    tensors, config = read_adapter(adapter_dir)
    base = internlm2.read_config(base_dir)
    if not (internlm2.is_internlm2(base) and is_original_layout(tensors, config)):
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    converted, new_config = to_llama_layout(tensors, config, base)
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(Path(tmp), converted, new_config)
        return PeftModel.from_pretrained(model, tmp, is_trainable=trainable)
