"""Merge a PEFT adapter into its base model and save a self-contained HF directory.

The result has sharded safetensors, the tokenizer with the chat template the model was trained
with, and a generation config that stops at the template's end-of-turn token, so plain
``transformers``, vLLM or LMDeploy chat with it correctly without tuneforge.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.data.templates import load_template, save_template, stop_token_ids
from tuneforge.errors import UserError
from tuneforge.models.load import load_tokenizer, pick_device
from tuneforge.models.resolve import resolve_model


def merge_adapter(base: str, adapter: str | Path, out: str | Path, max_shard_size: str = "2GB",
                  device: str = "cpu", trust_remote_code: bool = False) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"'{adapter}' is not a PEFT adapter directory (no adapter_config.json); "
            "create it with `tuneforge convert pth_to_hf CONFIG iter_N.pth DIR`"
        )
    base_path = resolve_model(base)
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto",
                                                 trust_remote_code=trust_remote_code).to(dev)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    has_tok = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tok else base_path, trust_remote_code)
    template = load_template(adapter)
    if template is not None:
        tokenizer.chat_template = template.chat_template
        stops = stop_token_ids(template, tokenizer)
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        save_template(out, template)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to("cpu").save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    (out / "tuneforge_merge.json").write_text(json.dumps(
        {"base": base, "adapter": str(adapter.resolve())}, ensure_ascii=False, indent=2))
    return out
