"""``iter_N.pth`` -> a PEFT adapter directory (LoRA/QLoRA) or a HF model directory (full)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.templates import Template, save_template
from tuneforge.errors import UserError
from tuneforge.train.checkpoint import load_checkpoint


def peft_key(name: str) -> str:
    """Trained-model parameter name -> the key PEFT stores in adapter_model.safetensors."""
    return name.replace(".default.", ".").replace(".default", "")


def _save_tokenizer(base: str, out: Path, template: Template, trust_remote_code: bool) -> bool:
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_model

    try:
        path = resolve_model(base)
    except UserError:
        return False
    tok = load_tokenizer(path, trust_remote_code)
    tok.chat_template = template.chat_template
    tok.save_pretrained(out)
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
                       fp32: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write the checkpoint as a standard directory; returns OUT."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path)
    cfg: dict[str, Any] = ckpt["config"]
    base = _pick_base(cfg["pretrained_model_name_or_path"], base_model)
    template = Template(**{**ckpt["template"], "stop_words": tuple(ckpt["template"]["stop_words"])})
    dtype = torch.float32 if fp32 else torch.float16
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    if ckpt["method"] == "full":
        _write_full(ckpt, base, out, dtype, max_shard_size, template,
                    bool(cfg.get("trust_remote_code")))
    else:
        tensors = {peft_key(k): v.to(dtype).contiguous() for k, v in ckpt["state_dict"].items()}
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        peft_config = {**ckpt["peft_config"], "base_model_name_or_path": base,
                       "inference_mode": True}
        (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, default=str))
        _save_tokenizer(base, out, template, bool(cfg.get("trust_remote_code")))
    save_template(out, template)
    return out


def _write_full(ckpt: dict[str, Any], base: str, out: Path, dtype: torch.dtype,
                max_shard_size: str, template: Template, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM

    from tuneforge.models.resolve import resolve_model

    path = resolve_model(base)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    _, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected:
        raise UserError(f"checkpoint does not fit base model '{base}': unexpected {unexpected[:3]}")
    model.to(dtype).save_pretrained(out, max_shard_size=max_shard_size)
    _save_tokenizer(base, out, template, trust_remote_code)
