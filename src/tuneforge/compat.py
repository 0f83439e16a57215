"""Every private (underscored or undocumented) part of torch, transformers, peft and DeepSpeed
that tuneforge touches, in one table, checked before training starts.

A library release that renames one of these would otherwise fail deep inside a step, or worse,
silently skip a patch. ``check`` turns that into one line naming the library, its installed
version, what is missing and what needs it. Parts that only exist on an object at run time
(an optimizer's partitions) are read through ``attr``, which fails the same way.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import UserError


@dataclass(frozen=True)
class Private:
    library: str  # the distribution, whose version the error names
    module: str
    path: str  # dotted attribute path inside MODULE
    used_by: str  # what breaks without it

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"


PRIVATE: tuple[Private, ...] = (
    Private("torch", "torch._dynamo", "config.cache_size_limit",
            "compiled decoder layers (fast/compiled.py: one cache entry per layer)"),
    Private("torch", "torch._dynamo.exc", "TorchDynamoException",
            "compiled decoder layers falling back to eager (fast/compiled.py)"),
    Private("torch", "torch._dynamo.exc", "BackendCompilerFailed",
            "the clear error for a failed compiled backward (train/recipe.py)"),
    Private("transformers", "transformers.modeling_layers", "GradientCheckpointingLayer.gradient_checkpointing",
            "recomputing some layers only (fast/recompute.py)"),
    Private("transformers", "transformers.integrations.sdpa_attention", "sdpa_attention_forward",
            "varlen attention's fallback for generation (fast/attention.py)"),
    Private("transformers", "transformers.masking_utils", "sdpa_mask",
            "varlen attention's masks for padded batches (fast/attention.py)"),
    Private("transformers", "transformers.masking_utils", "AttentionMaskInterface.register",
            "registering varlen attention's mask (fast/attention.py)"),
    Private("transformers", "transformers", "PreTrainedModel.set_attn_implementation",
            "switching a loaded model to varlen attention (fast/apply.py)"),
    Private("peft", "peft.tuners.lora", "LoraLayer.other_param_names",
            "the fused LoRA kernels and the chunked head (fast/lora.py, fast/path.py)"),
    Private("deepspeed", "deepspeed.runtime.zero.stage_1_and_2",
            "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
            "resuming a ZeRO-1/2 run from a checkpoint (train/zero.py)"),
    Private("deepspeed", "deepspeed.utils", "safe_get_full_optimizer_state",
            "gathering ZeRO partitions into a checkpoint (train/zero.py)"),
    Private("deepspeed", "deepspeed.utils", "safe_set_full_optimizer_state",
            "loading a checkpoint into ZeRO partitions (train/zero.py)"),
)

# ranges the table was last checked against (the project machine and the GPU image)
TESTED = {"torch": "2.11-2.13", "transformers": "5.17-5.24", "peft": "0.21", "deepspeed": "0.19"}


def version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def missing(entry: Private) -> bool:
    try:
        obj: Any = importlib.import_module(entry.module)
    except ImportError:
        return True
    for part in entry.path.split("."):
        if not hasattr(obj, part):
            return True
        obj = getattr(obj, part)
    return False


def _error(library: str, what: str, used_by: str) -> UserError:
    return UserError(f"{library} {version(library)} has no {what}, which {used_by} needs; tuneforge is "
                     f"tested with {library} {TESTED.get(library, '?')}: install a version in that range")


def check(libraries: set[str]) -> None:
    """Fail with one line when an installed library among LIBRARIES lacks a part tuneforge uses
    (a library that is not installed is not checked: what needs it says so itself)."""
    for entry in PRIVATE:
        if entry.library in libraries and importlib.util.find_spec(entry.library) is not None \
                and missing(entry):
            raise _error(entry.library, entry.name, entry.used_by)


def attr(obj: Any, name: str, library: str, used_by: str) -> Any:
    """OBJ.NAME, a private attribute that exists only at run time, or the same one-line error."""
    if not hasattr(obj, name):
        raise _error(library, f"{type(obj).__name__}.{name}", used_by)
    return getattr(obj, name)
