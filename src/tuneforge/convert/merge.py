"""Merge a PEFT adapter into its base model and save a self-contained HF directory.

The result has sharded safetensors, the tokenizer with the chat template the model was trained
with, and a generation config that stops at the template's end-of-turn token, so plain
``transformers``, vLLM or LMDeploy chat with it correctly without tuneforge. An InternLM2 base is
written as Llama by default (every serving stack reads it without remote code), or with
``layout='original'`` in InternLM2's own layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.convert.layout import save_original_layout
from tuneforge.data.templates import load_template, save_template, stop_token_ids
from tuneforge.errors import UserError
from tuneforge.files import atomic_directory
from tuneforge.models import internlm2
from tuneforge.models.adapters import attach_adapter
from tuneforge.models.load import (
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


def _check_out(out: Path) -> None:
    """Refuse to overwrite a folder that is not an earlier merge: nothing of the user's is lost."""
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_FILE).is_file():
        raise UserError(f"'{out}' exists and is not an earlier merge; choose an empty or new folder")


def merge_adapter(base: str, adapter: str | Path, out: str | Path, max_shard_size: str = "2GB",
                  device: str = "cpu", trust_remote_code: bool | None = None,
                  layout: str = "llama") -> Path:
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
    _check_out(out)
    trust = remote_code_allowed(trust_remote_code, adapter, base_path)
    model = load_model(base_path, pick_device(device), "auto", trust_remote_code=trust)
    model = attach_adapter(model, adapter, base_path).merge_and_unload().to("cpu")

    has_tok = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tok else base_path, trust)
    template = load_template(adapter)
    if template is not None:
        tokenizer.chat_template = template.chat_template
        stops = stop_token_ids(template, tokenizer)
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # Written beside OUT and moved into place whole: a crash leaves no folder without weights.
    with atomic_directory(out, replace=True) as tmp:
        if layout == "original":
            save_original_layout(model, base_path, tmp, max_shard_size, tokenizer.chat_template)
        else:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            save_tokenizer(tokenizer, tmp)
        if template is not None:
            save_template(tmp, template)
        write_meta(tmp, trust_remote_code=trust and not native, layout=layout)
        (tmp / MERGE_FILE).write_text(json.dumps(
            {"base": base, "adapter": str(adapter.resolve()), "layout": layout}, ensure_ascii=False,
            indent=2))
    return out
