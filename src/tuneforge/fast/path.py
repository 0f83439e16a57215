"""Turn the fast path on for a model about to be trained, and say what it did."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.fast import recompute
from tuneforge.fast.lora import fuse_lora, variant_layers
from tuneforge.fast.mlp import fuse_swiglu
from tuneforge.fast.norm import fuse_rmsnorm


@dataclass
class FastPath:
    """What fast.apply changed. Not FUSED: the model trains through its plain forward."""
    fused: bool = False
    lora_layers: int = 0
    peft_layers: dict[str, int] | None = None  # LoRA variants left on peft's forward (DoRA: x30)
    norms: int = 0
    mlps: int = 0
    varlen: bool = False
    linear_ce: bool = False
    compiled_layers: int = 0
    memory: recompute.Plan | None = None  # the layers recomputed to fit the memory budget

    def describe(self) -> str:
        if not self.fused:
            return "plain path (fast_path off or the model's own code)"
        parts = [f"fused LoRA x{self.lora_layers}"]
        parts += [f"peft's own {name} x{n}" for name, n in (self.peft_layers or {}).items()]
        parts += [f"RMSNorm x{self.norms}", f"SwiGLU x{self.mlps}",
                  "chunked linear cross-entropy" if self.linear_ce else "plain cross-entropy",
                  "varlen attention" if self.varlen else "SDPA attention"]
        if self.compiled_layers:
            parts.append(f"compiled layers x{self.compiled_layers}")
        return "fast path: " + ", ".join(parts)


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM under a peft wrapper, or MODEL itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class Head:
    """The output projection as the chunked cross-entropy sees it: the weight, and the peft LoRA
    layer on it when the head is adapted (XTuner adapts InternLM2's)."""
    weight: torch.Tensor
    lora: Any = None

    def low_rank(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(dropout(hidden) @ A.T, B, scaling) of the head's active adapter, or None."""
        lora = self.lora
        if lora is None or lora.disable_adapters or lora.merged:
            return None
        (name,) = [n for n in lora.active_adapters if n in lora.lora_A]
        a = lora.lora_A[name].weight
        low = lora.lora_dropout[name](hidden) @ a.t().to(hidden.dtype)
        return low, lora.lora_B[name].weight, lora.scaling[name]


def head_for_linear_ce(model: Any) -> Head | None:
    """The output projection, when the logits are nothing but ``hidden @ weight.T`` (plus a plain
    LoRA's update)."""
    from peft.tuners.lora import LoraLayer

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    cfg = lm.config
    lora = None
    if isinstance(head, LoraLayer):
        adapters = [n for n in head.active_adapters if n in head.lora_A]
        if len(adapters) != 1 or adapters[0] in getattr(head, "lora_variant", {}) \
                or head.use_dora.get(adapters[0]):
            return None
        lora, head = head, head.get_base_layer()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) \
            or getattr(cfg, "logits_scaling", None):
        return None
    return Head(head.weight, lora)


def enable(model: Any, varlen: bool, partitioned: bool = False) -> FastPath:
    """Fuse what the model allows; VARLEN says the model was loaded with the varlen attention.
    PARTITIONED (DeepSpeed ZeRO-3): a weight is whole only inside its own module's forward, so the
    fused LoRA, the fused MLP and the chunked head, which read their children's weights, stay off."""
    fast = FastPath(fused=True, varlen=varlen)
    fast.norms = fuse_rmsnorm(model)
    if partitioned:
        return fast
    fast.lora_layers = fuse_lora(model) if hasattr(model, "peft_config") else 0
    fast.peft_layers = variant_layers(model) if hasattr(model, "peft_config") else None
    fast.mlps = fuse_swiglu(model)
    fast.linear_ce = head_for_linear_ce(model) is not None
    return fast


def gathered_bytes(layer: torch.nn.Module, amp: torch.dtype | None) -> int:
    """A sharded engine holds one decoder layer gathered whole, and prefetches the next: two
    layers' weights, in the compute dtype they are gathered in."""
    return 2 * sum(p.numel() * (amp.itemsize if amp is not None else p.element_size()) for p in layer.parameters())


def host_memory() -> int:
    """CPU memory available now, in bytes (0 where the system does not say): what offloaded layer
    inputs may take half of."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def plan_recompute(model: Any, tokens: int, budget_gib: float | None, amp: torch.dtype | None,
                   later_bytes: int, weight_share: float = 1.0) -> recompute.Plan:
    """Pick how many layers to recompute so that TOKENS-token micro-batches fit in BUDGET_GIB
    (default: what the GPU has, less 5%). Call with the model on the GPU and gradient
    checkpointing enabled; LATER_BYTES is what the first step will add (gradients, optimizer
    moments). WEIGHT_SHARE < 1: the weights will be sharded, and each GPU keeps that part of them
    plus the layers being gathered. The per-layer cost is measured on a 128-token probe."""
    from tuneforge.fast.cross_entropy import CHUNK_ELEMENTS

    lm = causal_lm(model)
    layers = recompute.decoder_layers(model)
    probe_len = min(128, tokens)
    dev = next(model.parameters()).device
    ids = torch.randint(0, lm.config.vocab_size, (1, probe_len), device=dev)
    pos = torch.arange(probe_len, device=dev)[None]

    def probe(n: int) -> None:
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            lm.get_decoder()(input_ids=ids[:, :n], position_ids=pos[:, :n], use_cache=False)

    per_token = recompute.bytes_per_token(model, layers, probe, probe_len)
    # One chunk of logits (fp32, and its bf16 gradient) and the hidden-state gradient the head keeps.
    hidden = lm.config.hidden_size
    vocab = lm.config.vocab_size
    head = min(CHUNK_ELEMENTS, tokens * vocab) * 6 + tokens * hidden * 4
    free, total = torch.cuda.mem_get_info(dev)
    budget = int(budget_gib * recompute.GIB) if budget_gib else int(0.95 * (free + torch.cuda.memory_allocated(dev)))
    weights = torch.cuda.memory_allocated(dev)
    if weight_share < 1:
        weights = weights * weight_share + gathered_bytes(layers[0], amp)
    # + cuBLAS workspaces and small tensors the estimate does not see (measured on an H200, the
    # estimate without them was within 0.3 GiB of the real peak); the margin keeps room for the
    # allocator's fragmentation
    fixed = int(weights + later_bytes + (256 << 20))
    chosen = recompute.plan(len(layers), per_token, hidden, tokens, fixed, budget, margin_bytes=int(0.03 * budget),
                            head_bytes=head, host_bytes=host_memory() // 2)
    recompute.apply(layers, chosen.recomputed, chosen.offload)
    return chosen
