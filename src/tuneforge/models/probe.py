"""What a loaded model's code can do, found out by asking it rather than assuming.

transformers' own models keep packed samples apart through restarting position ids, accept
``logits_to_keep`` and take our attention functions. A model that runs its own (remote) code may
do none of that: it may build a plain causal mask over the whole row, so packed samples attend
to each other, with no error anywhere. ``isolates_packed_samples`` runs a two-sample row and
compares it with the second sample alone.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import torch


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def runs_own_code(model: Any) -> bool:
    """True when MODEL's class came from the checkpoint (trust_remote_code), not transformers."""
    return type(_causal_lm(model)).__module__.startswith("transformers_modules")


def needs_own_code(model_dir: Path, trust_remote_code: bool) -> bool:
    """Before loading: will MODEL_DIR's own code run? (InternLM2 never: tuneforge loads it as Llama.)"""
    from tuneforge.models import internlm2

    config = internlm2.read_config(model_dir) or {}
    return bool(trust_remote_code and config.get("auto_map") and not internlm2.is_internlm2(config))


def accepts(model: Any, argument: str) -> bool:
    """Whether MODEL's forward takes ARGUMENT (remote code often has no ``logits_to_keep``).
    Asked every micro-batch, so the answer is kept per model class."""
    return _accepts(type(_causal_lm(model)), argument)


@functools.cache
def _accepts(cls: type, argument: str) -> bool:
    return argument in inspect.signature(cls.forward).parameters


@torch.no_grad()
def isolates_packed_samples(model: Any, tol: float = 1e-3) -> bool:
    """Run [sample A | sample B] as one row with restarting positions, then B alone: equal
    logits for B mean the model keeps packed samples apart."""
    lm = _causal_lm(model)
    device = next(lm.parameters()).device
    vocab = lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (1, 7), generator=g), torch.randint(3, vocab, (1, 5), generator=g)
    row = torch.cat([a, b], dim=1).to(device)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    was_training = lm.training
    lm.eval()
    try:
        packed = lm(input_ids=row, position_ids=pos, use_cache=False).logits[:, 7:].float()
        alone = lm(input_ids=b.to(device), position_ids=pos[:, 7:], use_cache=False).logits.float()
    finally:
        lm.train(was_training)
    return bool((packed - alone).abs().max() <= tol * max(1.0, alone.abs().max().item()))
