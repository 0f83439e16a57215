"""``iter_N.pth`` -> a PEFT adapter directory (LoRA/QLoRA) or a HF model directory (full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneforge.data.templates import Template, save_template
from tuneforge.errors import UserError
from tuneforge.models import internlm2
from tuneforge.models.adapters import to_original_layout, write_adapter
from tuneforge.models.load import load_model, save_tokenizer, write_meta
from tuneforge.models.lora import as_plain_lora
from tuneforge.train.checkpoint import Checkpoint, load_checkpoint


def peft_key(name: str) -> str:
    """Trained-model parameter name -> the key PEFT stores in adapter_model.safetensors (DoRA's
    magnitude vector without its module's '.weight', as peft writes it)."""
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return name.replace(".default.", ".").replace(".default", "")


def _save_tokenizer(base: str, out: Path, template: Template, trust_remote_code: bool) -> bool:
    from tuneforge.models.load import context_length, load_tokenizer
    from tuneforge.models.resolve import resolve_model

    try:
        path = resolve_model(base)
    except UserError:
        return False
    tok = load_tokenizer(path, trust_remote_code)
    tok.chat_template = template.chat_template
    save_tokenizer(tok, out, context_length(path))
    return True


def _pick_base(recorded: str, from_config: str | None) -> str:
    """The base model the checkpoint was trained on, unless it has moved and CONFIG says where.

    A run started with ``--cfg-options pretrained_model_name_or_path=...`` records the model it
    really used, which the config file on disk does not show.
    """
    from tuneforge.models.resolve import resolve_model

    if not from_config or from_config == recorded:
        return recorded
    try:
        resolve_model(recorded)
    except UserError:
        return from_config
    print(f"[tuneforge] using the base model the checkpoint was trained on, {recorded} "
          f"(the config says {from_config})")
    return recorded


def convert_checkpoint(ckpt_path: str | Path, out: str | Path, base_model: str | None = None,
                       fp32: bool = False, max_shard_size: str = "2GB", layout: str = "llama") -> Path:
    """Write the checkpoint as a standard directory; returns OUT.

    LAYOUT matters for InternLM2 bases only, which tuneforge trains as Llama: 'llama' (default)
    writes the adapter or model for the Llama form, 'original' for InternLM2's own remote code
    (fused wqkv; an adapter's q/k/v LoRAs become one LoRA of three times the rank on wqkv)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg: dict[str, Any] = ckpt.config
    base = _pick_base(cfg["pretrained_model_name_or_path"], base_model)
    template = ckpt.template
    dtype = torch.float32 if fp32 else torch.float16
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    trust = bool(cfg.get("trust_remote_code"))
    original = _internlm2_base(base)
    if layout == "original" and original is None:
        raise UserError(f"--layout original is for InternLM2 bases; '{base}' is not one")
    if ckpt.method == "full":
        _write_full(ckpt, base, out, dtype, max_shard_size, template, trust, layout)
    else:
        tensors = {peft_key(k): v for k, v in ckpt.state_dict.items()}
        peft_config = {**ckpt.peft_config, "base_model_name_or_path": base,
                       "inference_mode": True}
        if ckpt.initial_adapter is not None:  # PiSSA, OLoRA, LoftQ: the change from their start
            start = {peft_key(k): v for k, v in ckpt.initial_adapter.items()}
            tensors, peft_config = as_plain_lora({k: v.float() for k, v in tensors.items()}, start, peft_config)
            print(f"[tuneforge] {ckpt.config.get('lora_variant')}: the adapter is written as its change from "
                  f"where it started (a plain LoRA of rank {peft_config['r']}), for the original base")
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        if layout == "original":
            tensors, peft_config = to_original_layout(tensors, peft_config, original)
        write_adapter(out, tensors, peft_config)
        _save_tokenizer(base, out, template, trust)
    meta: dict[str, Any] = {"trust_remote_code": trust and original is None}
    if original is not None:
        meta.update(layout=layout, base_architecture=internlm2.ARCHITECTURE,
                    note="InternLM2 trained as Llama: " + (
                        "load the base with tuneforge (or as Llama), not with its remote code"
                        if layout == "llama" else "for peft on the original remote-code model"))
    write_meta(out, **meta)
    save_template(out, template)
    return out


def _internlm2_base(base: str) -> dict[str, Any] | None:
    """The InternLM2 config of BASE, or None when BASE is another architecture (or absent)."""
    from tuneforge.models.resolve import resolve_model

    try:
        config = internlm2.read_config(resolve_model(base))
    except UserError:
        return None
    return config if internlm2.is_internlm2(config) else None


def _write_full(ckpt: Checkpoint, base: str, out: Path, dtype: torch.dtype, max_shard_size: str,
                template: Template, trust_remote_code: bool, layout: str) -> None:
    from tuneforge.convert.layout import save_original_layout
    from tuneforge.models.resolve import resolve_model

    path = resolve_model(base)
    model = load_model(path, torch.device("cpu"), dtype, trust_remote_code=trust_remote_code)
    _, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    if unexpected:
        raise UserError(f"checkpoint does not fit base model '{base}': unexpected {unexpected[:3]}")
    model.to(dtype)
    if layout == "original":
        save_original_layout(model, path, out, max_shard_size, template.chat_template)
        return
    model.save_pretrained(out, max_shard_size=max_shard_size)
    _save_tokenizer(base, out, template, trust_remote_code)
