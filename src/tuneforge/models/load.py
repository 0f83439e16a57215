"""Load a tokenizer and a causal LM for training or chat: device, dtype and 4-bit choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import UserError


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


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


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


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, *,
               load_in_4bit: bool = False, quant_type: str = "nf4", double_quant: bool = True,
               trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                              "attn_implementation": attn_implementation}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(4, dtype, "method='qlora'", quant_type,
                                                            double_quant)
        kwargs["device_map"] = device_map(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "attn_implementation" not in str(err) and attn_implementation not in str(err).lower():
            raise
        kwargs.pop("attn_implementation")  # custom (remote-code) models without SDPA
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    return model
