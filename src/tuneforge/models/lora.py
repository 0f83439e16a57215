"""Wrap a model with LoRA adapters (peft), in the standard PEFT layout.

The LoRA family goes through peft itself (docs/training.md#lora-variants): DoRA and rsLoRA are
LoraConfig switches, PiSSA and OLoRA are peft initialisations that move the top of each weight
into the adapter, and LoftQ is peft's ``replace_lora_weights_loftq`` on the 4-bit model. The
three that start the adapter away from zero keep its start (``initial_adapter``): an adapter
saved for the ORIGINAL base is the change from that start (``as_plain_lora``), as peft's own
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.models import internlm2

# Variants whose adapter does not start at B = 0; PiSSA and OLoRA also take B0 A0 out of the base.
STARTS_AWAY_FROM_ZERO = ("pissa", "olora", "loftq")
HEAD = "lm_head"


def target_modules(targets: str | list[str]) -> str | list[str]:
    """CFG's targets with InternLM2's module names (wqkv, wo, w1/w2/w3, output: an XTuner config's)
    as the Llama modules tuneforge loads InternLM2 as."""
    if isinstance(targets, str):
        return list(internlm2.MODULE_NAMES[targets]) if targets in internlm2.MODULE_NAMES else targets
    out: list[str] = []
    for t in targets:
        out += [n for n in internlm2.MODULE_NAMES.get(t, (t,)) if n not in out]
    return out


def _adapts_head(targets: str | list[str]) -> bool:
    if isinstance(targets, list):
        return HEAD in targets
    return targets != "all-linear" and re.fullmatch(targets, HEAD) is not None  # peft: all-linear skips it


def lora_config(cfg: Config, tied_head: bool = False) -> Any:
    """TIED_HEAD: the model's head is its input embedding. A LoRA on it would, once merged, change
    the embeddings too; XTuner never adapts a head named lm_head, so neither does tuneforge then."""
    from peft import LoraConfig

    targets = target_modules(cfg.lora_target_modules)
    if tied_head and _adapts_head(targets):
        print("[tuneforge] lm_head is tied to the input embeddings here: not adapted", flush=True)
        # a regex keeps peft's reading (a whole-name match) with the head's names ruled out first
        targets = [t for t in targets if t != HEAD] if isinstance(targets, list) else \
            rf"(?!(?:.*\.)?{HEAD}$)(?:{targets})"
    variant = cfg.lora_variant
    # LoftQ is set after wrapping (replace_lora_weights_loftq): peft's init_lora_weights='loftq'
    # would quantize a full-precision model itself, and tuneforge's qlora model is 4-bit already.
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
        use_dora=variant == "dora", use_rslora=variant == "rslora",
        init_lora_weights=variant if variant in ("pissa", "olora") else True,
    )


def apply_lora(model: Any, cfg: Config, base_dir: Path | None = None) -> Any:
    """MODEL with CFG's adapters; BASE_DIR (the base's folder) is where LoftQ reads the
    full-precision weights that the 4-bit ones approximate."""
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        # Frozen embeddings would give checkpointed blocks inputs without grad, so nothing flows back.
        model.enable_input_require_grads()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    try:
        wrapped = get_peft_model(model, lora_config(cfg, tied_head=tied))
    except ValueError as err:
        if "arget module" not in str(err) and "No modules were targeted" not in str(err):
            raise
        first = str(err).split(". ")[0]
        raise UserError(f"lora_target_modules {cfg.lora_target_modules!r}: {first}; a string is a regex that "
                        r"must match a module's whole name (e.g. '.*\.(q_proj|v_proj)'), a list names modules "
                        "(e.g. ['q_proj', 'v_proj'])") from err
    if cfg.lora_variant == "loftq":
        loftq(wrapped, base_dir)
    keep_4bit_layout(wrapped)  # (a no-op without 4-bit layers)
    return wrapped


def keep_4bit_layout(model: Any) -> None:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first forward in
    eval mode without grad (the evaluation hook's), and dequantize_4bit then misreads it: DoRA's
    weight norm, which peft computes from the dequantized weight, came out wrong after that on
    such a CPU (a 4-bit DoRA model started 0.08 in logits away from the plain 4-bit one on the
    tiny model). The fused LoRA (fast/lora.py) dequantizes the weights itself as well: QLoRA on two
    ranks ended 3.5x the fp32 rounding bound away from one process on such a CPU. The weights keep
    the layout dequantize_4bit reads."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def loftq(model: Any, base_dir: Path | None) -> int:
    """peft's LoftQ start for every 4-bit LoRA layer: B A becomes the best rank-r fit of what
    4-bit rounding took from the full-precision weight (read from BASE_DIR's safetensors).
    Returns the layers set."""
    from peft import replace_lora_weights_loftq
    from peft.tuners.lora import Linear4bit

    device = next(p.device for p in model.parameters())
    if device.type != "cuda":
        raise UserError("lora_variant='loftq' needs a CUDA GPU (peft computes LoftQ's decomposition there); "
                        "on a CPU use lora_variant='lora' or 'olora'")
    if base_dir is None or internlm2.is_internlm2_dir(base_dir):
        raise UserError("lora_variant='loftq' reads the base's full-precision weights by their names in "
                        "model.safetensors, which an InternLM2 checkpoint's fused wqkv does not have; "
                        "use lora_variant='lora'")
    try:
        replace_lora_weights_loftq(model, model_path=str(base_dir))
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"lora_variant='loftq': peft could not read the full-precision weights in "
                        f"'{base_dir}' ({str(err).splitlines()[0][:200]}); it needs (sharded) safetensors "
                        "under the model's own parameter names") from err
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            # peft fits B A to the error, but the layer adds scaling x B A (peft issue #1982):
            # split 1/scaling between the two so that the sum is the fit
            root = math.sqrt(module.scaling["default"])
            module.lora_A["default"].weight.data /= root
            module.lora_B["default"].weight.data /= root
            n += 1
    print(f"[tuneforge] LoftQ: {n} 4-bit layers' adapters start at their quantization error", flush=True)
    return n


def trainable_parameters(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def initial_adapter(model: Any, cfg: Config) -> dict[str, torch.Tensor] | None:
    """The LoRA weights as the variant started them (fp32, on the CPU), by parameter name, for
    the variants that do not start at zero; None for the others."""
    if cfg.method == "full" or cfg.lora_variant not in STARTS_AWAY_FROM_ZERO:
        return None
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
            if p.requires_grad and (".lora_A." in n or ".lora_B." in n)}


def as_plain_lora(tensors: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                  config: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter trained from START (same keys) as a standard LoRA on the original base.

    Trained, a layer computes W_res + s B A, where W_res = W - s B0 A0 for PiSSA and OLoRA (and
    the 4-bit W for LoftQ, where s B0 A0 is what 4-bit rounding took). Its change from W is
    s (B A - B0 A0) = s [B | -B0] [A ; A0]: a LoRA of twice the rank with the same scaling (alpha
    doubles with r, or grows by sqrt 2 under rsLoRA), as peft's LoraModel.subtract_mutated_init
    converts it."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("cannot convert an adapter with rank_pattern/alpha_pattern from its start")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if ".lora_A." in key:
            out[key] = torch.cat([t, start[key].to(t.dtype)], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([t, -start[key].to(t.dtype)], dim=1)
        else:
            out[key] = t
    alpha = float(config["lora_alpha"])
    new = {**config, "r": 2 * int(config["r"]), "init_lora_weights": True,
           "lora_alpha": alpha * (math.sqrt(2) if config.get("use_rslora") else 2)}
    return out, new
