"""Merge a PEFT adapter into its base model and save a self-contained HF directory.

The result has sharded safetensors, the tokenizer with the chat template the model was trained
with, and a generation config that stops at the template's end-of-turn token, so plain
``transformers``, vLLM or LMDeploy chat with it correctly without tuneforge. The weights are written in the base's dtype (bf16 stays bf16)
unless DTYPE says otherwise, and the tokenizer so that transformers 4.x reads it too (llama.cpp's
GGUF converter still needs transformers<5). An InternLM2 base is
written as Llama by default (every serving stack reads it without remote code), or with
``layout='original'`` in InternLM2's own layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tuneforge.convert.layout import save_original_layout
from tuneforge.data.templates import (
    Template,
    get_template,
    load_template,
    save_template,
    stop_token_ids,
)
from tuneforge.errors import UserError
from tuneforge.files import atomic_directory
from tuneforge.models import internlm2
from tuneforge.models.adapters import attach_adapter
from tuneforge.models.load import (
    context_length,
    load_model,
    load_tokenizer,
    pick_device,
    remote_code_allowed,
    save_tokenizer,
    write_meta,
)
from tuneforge.models.resolve import resolve_model

MERGE_FILE = "tuneforge_merge.json"
LAYOUTS = ("llama", "original")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _check_out(out: Path) -> None:
    """Refuse to overwrite a folder that is not an earlier merge: nothing of the user's is lost."""
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_FILE).is_file():
        raise UserError(f"'{out}' exists and is not an earlier merge; choose an empty or new folder")


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype BASE_DIR's config.json records (torch_dtype or dtype), fp32 when none or odd."""
    config = internlm2.read_config(base_dir) or {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def output_dtype(requested: str, base_dir: Path) -> torch.dtype:
    """The dtype the merged weights are written in: REQUESTED, or the base's for 'auto'."""
    if requested not in DTYPES:
        raise UserError(f"--dtype {requested!r}: expected one of {', '.join(DTYPES)}")
    return base_dtype(base_dir) if requested == "auto" else getattr(torch, requested)


def _record_dtype(out: Path, dtype: torch.dtype) -> None:
    """config.json says the dtype written, under both names (4.x reads torch_dtype, 5.x dtype)."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    config.update(dtype=name, torch_dtype=name)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _merged(base_path: Path, adapter: Path, device: str, trust: bool, dtype: torch.dtype) -> Any:
    """The base with the adapter merged in, on the CPU in DTYPE; the merge itself runs in fp32."""
    model = load_model(base_path, pick_device(device), torch.float32, trust_remote_code=trust)
    model = attach_adapter(model, adapter, base_path).merge_and_unload().to("cpu", dtype)
    model.config.dtype = dtype
    return model


def _own_template(tokenizer: Any) -> Template | None:
    """The tokenizer's own chat template, for an adapter without tuneforge's template file (a
    foreign PEFT adapter): the merged model chats with it, so its end of turn ends generation."""
    try:
        return get_template("auto", tokenizer)
    except UserError:  # no chat template at all: end of text is all there is
        return None


def merge_adapter(base: str, adapter: str | Path, out: str | Path, max_shard_size: str = "2GB",
                  device: str = "cpu", trust_remote_code: bool | None = None,
                  layout: str = "llama", dtype: str = "auto") -> Path:
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"'{adapter}' is not a PEFT adapter directory (no adapter_config.json); "
            "create it with `tuneforge convert pth_to_hf CONFIG iter_N.pth DIR`"
        )
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    base_path = resolve_model(base)
    native = internlm2.is_internlm2_dir(base_path)  # InternLM2 in either layout needs no remote code
    if layout == "original" and not native:
        raise UserError(f"--layout original is for InternLM2 bases; '{base}' is not one")
    written = output_dtype(dtype, base_path)
    _check_out(out)
    trust = remote_code_allowed(trust_remote_code, adapter, base_path)
    model = _merged(base_path, adapter, device, trust, written)

    has_tok = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tok else base_path, trust)
    template = load_template(adapter)
    if template is not None:
        tokenizer.chat_template = template.chat_template
    chats_with = template or _own_template(tokenizer)
    if chats_with is not None:  # generate() stops where the turn ends, not only at end of text
        stops = stop_token_ids(chats_with, tokenizer)
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # Written beside OUT and moved into place whole: a crash leaves no folder without weights.
    with atomic_directory(out, replace=True) as tmp:
        if layout == "original":
            save_original_layout(model, base_path, tmp, max_shard_size, tokenizer.chat_template)
        else:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            _record_dtype(tmp, written)
            save_tokenizer(tokenizer, tmp, context_length(base_path))
        if template is not None:
            save_template(tmp, template)
        write_meta(tmp, trust_remote_code=trust and not native, layout=layout)
        (tmp / MERGE_FILE).write_text(json.dumps(
            {"base": base, "adapter": str(adapter.resolve()), "layout": layout,
             "dtype": str(written).replace("torch.", "")}, ensure_ascii=False,
            indent=2))
    return out
