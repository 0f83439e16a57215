"""Load a tokenizer and a causal LM for training or chat: device, dtype and 4-bit choices."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import UserError
from tuneforge.models import internlm2


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    return torch.device(requested)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast is
    ~1.6x faster than fp32 (ad hoc, AMD EPYC); elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Compute dtype for torch.autocast around forward passes, or None for none.

    On a GPU the weights are already bf16. On a CPU they stay fp32 (the master copy the optimizer
    updates) and matmuls run in bf16 when the CPU does that natively and dtype is 'auto'.
    """
    if device.type == "cpu" and setting == "auto" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def training_dtypes(setting: str, device: torch.device, method: str,
                    master_weights_elsewhere: bool = False) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype the weights are kept in, autocast dtype or None) for training.

    A full fine-tune updates the weights themselves, and bf16 keeps 8 significant bits: a weight
    of 0.02 moves in steps of ~1.2e-4 while AdamW changes it by about lr (2e-5) per step, so most
    updates would round away. With dtype='auto' its weights stay fp32 (the master copy) and the
    matmuls run in bf16 under autocast, as on a CPU. DeepSpeed keeps fp32 master weights of its
    own (MASTER_WEIGHTS_ELSEWHERE), and adapters (LoRA, QLoRA) are fp32 already.
    """
    dtype, amp = pick_dtype(setting, device), autocast_dtype(setting, device)
    if method == "full" and setting == "auto" and dtype == torch.bfloat16 and not master_weights_elsewhere:
        return torch.float32, torch.bfloat16
    return dtype, amp


# Written beside adapters and merged models: what loading them needs (remote code) and the layout
# of their weights, so that every later command reads it instead of asking again.
META_FILE = "tuneforge_model.json"


def write_meta(directory: str | Path, **fields: Any) -> None:
    path = Path(directory, META_FILE)
    path.write_text(json.dumps({**read_meta(directory), **fields}, ensure_ascii=False, indent=2))


def read_meta(directory: str | Path | None) -> dict[str, Any]:
    if directory is None:
        return {}
    try:
        return json.loads(Path(directory, META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def remote_code_allowed(requested: bool | None, *directories: str | Path | None) -> bool:
    """The user's --trust-remote-code if given, else what the model's own metadata recorded."""
    if requested is not None:
        return requested
    return any(read_meta(d).get("trust_remote_code") for d in directories)


@contextlib.contextmanager
def _remote_code_errors(path: str | Path) -> Iterator[None]:
    """transformers' remote-code refusals and missing packages, as one line each."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err) and "custom code" not in str(err):
            raise
        raise UserError(
            f"'{path}' ships its own model code (remote code), which runs only when allowed: pass "
            "--trust-remote-code (or set trust_remote_code = True in the config) if you trust it") from err
    except ImportError as err:
        missing = re.search(r"following packages that were not found in your environment: ([^.]+)", str(err))
        if not missing:
            raise
        names = missing.group(1).replace(",", " ")
        raise UserError(f"the model code in '{path}' needs {missing.group(1)}: pip install {names}") from err


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if internlm2.is_internlm2_dir(path):  # its own code breaks on transformers 5; never needed
        tok = internlm2.load_tokenizer(Path(path))
    else:
        with _remote_code_errors(path):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Tokenizer classes only transformers 5 has: recorded under one of them, a folder fails to load in
# transformers 4.x ("Tokenizer class TokenizersBackend does not exist"), e.g. in llama.cpp's
# convert_hf_to_gguf.py, which still needs transformers<5.
_V5_ONLY_TOKENIZERS = frozenset({"TokenizersBackend", "SentencePieceBackend", "PythonBackend",
                                 "MistralCommonBackend"})
_PORTABLE_TOKENIZER = "PreTrainedTokenizerFast"  # reads tokenizer.json as it is, in 4.x and 5.x
_ABSURD_LENGTH = 10**12  # transformers' VERY_LARGE_INTEGER (1e30) means "no limit was set"
_LOADER_STATE = ("is_local", "local_files_only")  # how it was loaded, not what it is


def context_length(model_dir: str | Path | None) -> int | None:
    """The context length MODEL_DIR's config.json gives (max_position_embeddings), or None."""
    if model_dir is None:
        return None
    path = Path(model_dir, "config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def _tokenizer_class(settings: dict[str, Any]) -> str:
    """The class name to record: the tokenizer's own where transformers 4.x and 5.x both have it
    (GPT2Tokenizer, LlamaTokenizer, ...) or it is the model's own code, else PreTrainedTokenizerFast."""
    import transformers

    name = settings["tokenizer_class"]
    if not isinstance(name, str) or name in _V5_ONLY_TOKENIZERS:
        return _PORTABLE_TOKENIZER
    if "auto_map" in settings or hasattr(transformers, name):
        return name
    return _PORTABLE_TOKENIZER


def portable_tokenizer_settings(settings: dict[str, Any], max_length: int | None = None,
                                chat_template: str | None = None) -> dict[str, Any]:
    """tokenizer_config.json SETTINGS as every transformers since 4.x reads them: a class both
    know, extra special tokens where 4.x looks for them, MAX_LENGTH (the model's context) when
    no real model_max_length is set, and the chat template inside it too (for readers that do
    not open chat_template.jinja, e.g. older llama.cpp converters)."""
    out = {k: v for k, v in settings.items() if k not in _LOADER_STATE}
    if "tokenizer_class" in out:  # absent: readers go by config.json's model_type, as before
        out["tokenizer_class"] = _tokenizer_class(out)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x's list; 4.x expects a dict there and fails on a list
        out.pop("extra_special_tokens")
        if extra:
            out.setdefault("additional_special_tokens", extra)
    limit = out.get("model_max_length")
    if max_length and (not isinstance(limit, int) or limit >= _ABSURD_LENGTH):
        out["model_max_length"] = max_length
    if chat_template and isinstance(chat_template, str):
        out.setdefault("chat_template", chat_template)
    return out


def save_tokenizer(tokenizer: Any, out: str | Path, max_length: int | None = None) -> None:
    """save_pretrained, readable by transformers 4.x too (portable_tokenizer_settings); MAX_LENGTH
    (the model's context length) becomes model_max_length where the tokenizer has no real one."""
    tokenizer.save_pretrained(out)
    path = Path(out, "tokenizer_config.json")
    settings = json.loads(path.read_text())
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    path.write_text(json.dumps(portable_tokenizer_settings(settings, max_length, template),
                               ensure_ascii=False, indent=2))


def quantization_config(bits: int, compute_dtype: torch.dtype, needed_by: str, quant_type: str = "nf4",
                        double_quant: bool = True) -> Any:
    """bitsandbytes' 4- or 8-bit loading settings; NEEDED_BY names the setting that asked."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise UserError(f"{needed_by} needs bitsandbytes: pip install bitsandbytes") from err
    return BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                              bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def device_map(device: torch.device) -> dict[str, Any]:
    """Where from_pretrained puts a quantized model: all of it on DEVICE."""
    return {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype | str, *,
               load_in_4bit: bool = False, load_in_8bit: bool = False, quant_type: str = "nf4",
               double_quant: bool = True, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa") -> Any:
    """The one loader: any HF causal LM folder, InternLM2 as transformers' Llama (no remote
    code), 4- or 8-bit through bitsandbytes, on DEVICE."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": bool(trust_remote_code),
                              "attn_implementation": attn_implementation}
    bits = 4 if load_in_4bit else 8 if load_in_8bit else 0
    if bits:
        compute = dtype if isinstance(dtype, torch.dtype) else pick_dtype("auto", device)
        needed_by = "method='qlora'" if bits == 4 else "--bits 8"
        kwargs["quantization_config"] = quantization_config(bits, compute, needed_by, quant_type,
                                                            double_quant)
        kwargs["device_map"] = device_map(device)
    if internlm2.is_internlm2_dir(path):
        model = internlm2.load_model(Path(path), kwargs)
    else:
        with _remote_code_errors(path):
            try:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            except ValueError as err:
                if "attn_implementation" not in str(err) and attn_implementation not in str(err).lower():
                    raise
                kwargs.pop("attn_implementation")  # custom (remote-code) models without SDPA
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not bits:
        model.to(device)
    return model
