"""Write a model trained as Llama back in InternLM2's original layout (``--layout original``).

For users of LMDeploy's InternLM2 path, XTuner or the remote-code model: fused ``wqkv`` and
InternLM2's names, the base's config.json and its code files, the base's own sentencepiece
tokenizer files with the trained chat template, and the generation config that stops at the
template's end-of-turn token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tuneforge.models import internlm2
from tuneforge.models.load import context_length, portable_tokenizer_settings

_TOKENIZER_FILES = ("tokenizer.model", "special_tokens_map.json", "added_tokens.json")


def save_original_layout(model: Any, base_dir: Path, out: Path, max_shard_size: str,
                         chat_template: str | None) -> None:
    """MODEL (the natively loaded Llama form of the InternLM2 in BASE_DIR) -> OUT, original layout."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    config = internlm2.read_config(base_dir) or {}
    state = internlm2.to_internlm2({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)
    if config.get("tie_word_embeddings"):
        state.pop("output.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": split.tensor_to_filename}, indent=2))
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype, "dtype": dtype}, indent=2))
    internlm2.copy_code_files(base_dir, out)
    for name in _TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    settings_path = base_dir / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    if chat_template:
        settings["chat_template"] = chat_template
    settings = portable_tokenizer_settings(settings, context_length(base_dir))
    (out / "tokenizer_config.json").write_text(json.dumps(settings, ensure_ascii=False, indent=2))
    model.generation_config.save_pretrained(out)
