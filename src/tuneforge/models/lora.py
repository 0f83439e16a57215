"""Wrap a model with LoRA adapters (peft), in the standard PEFT layout."""

from __future__ import annotations

from typing import Any

from tuneforge.config.schema import Config
from tuneforge.models import internlm2


def target_modules(targets: str | list[str]) -> str | list[str]:
    """CFG's targets with InternLM2's module names (wqkv, wo, w1/w2/w3, output: an XTuner config's)
    as the Llama modules tuneforge loads InternLM2 as."""
    if isinstance(targets, str):
        return list(internlm2.MODULE_NAMES[targets]) if targets in internlm2.MODULE_NAMES else targets
    out: list[str] = []
    for t in targets:
        out += [n for n in internlm2.MODULE_NAMES.get(t, (t,)) if n not in out]
    return out


def lora_config(cfg: Config, tied_head: bool = False) -> Any:
    """TIED_HEAD: the model's head is its input embedding. A LoRA on it would, once merged, change
    the embeddings too; XTuner never adapts a head named lm_head, so neither does tuneforge then."""
    from peft import LoraConfig

    targets = target_modules(cfg.lora_target_modules)
    if tied_head and isinstance(targets, list) and "lm_head" in targets:
        print("[tuneforge] lm_head is tied to the input embeddings here: not adapted", flush=True)
        targets = [t for t in targets if t != "lm_head"]
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )


def apply_lora(model: Any, cfg: Config) -> Any:
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        # Frozen embeddings would give checkpointed blocks inputs without grad, so nothing flows back.
        model.enable_input_require_grads()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    return get_peft_model(model, lora_config(cfg, tied_head=tied))


def trainable_parameters(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
