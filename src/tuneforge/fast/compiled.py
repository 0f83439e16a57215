"""Elementwise maths fused into one kernel by torch.compile on a GPU.

The norm and MLP functions read and write whole activations several times when run op by op
(fp32 upcasts, sigmoid, products); compiled, each becomes one pass over memory. On a CPU, with
compiling switched off (--no-compile), or where compiling fails (no Triton), the same function runs eagerly.
On a GPU the decoder layers are compiled whole as well (compile_layers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._functorch.config as functorch_config


def on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    state: dict[str, Callable[..., Any]] = {}

    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():  # inside a compiled layer: part of its graph
            return fn(*args)
        if not args[0].is_cuda or not compiling_allowed():
            return fn(*args)
        if "fn" not in state:
            state["fn"] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return state["fn"](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}); running eagerly",
                          stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    call.__name__ = fn.__name__
    return call


def compile_layers(layers: list[torch.nn.Module], backend: str = "inductor") -> int:
    """Compile each decoder layer's forward (and, through AOTAutograd, its backward) for training.

    Run op by op, a 7B LoRA step launches ~30k kernels and the GPU sits idle 40% of the time
    waiting for Python (measured with --profile on an H200); a compiled layer is a few fused
    kernels launched from C++. The layers share their code, so one compilation serves all of
    them. Hooks (FSDP2's gathers, recomputation) stay outside, on the module's __call__; calls
    without gradients (generation for evaluation) run eagerly rather than compile for every new
    shape. Returns how many layers were compiled; a compiler failure turns them all back to eager."""
    if not layers:
        return 0
    # each layer is one more entry in the cache of the same code object
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 4 * len(layers))
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 8 * len(layers))
    broken: list[str] = []
    for layer in layers:
        eager = layer.forward
        fast = torch.compile(eager, backend=backend)
        # A 4-bit weight is dequantised in the fused LoRA's forward and again in its backward, so
        # that no dense copy stays alive between them. AOTAutograd's common-subexpression pass
        # sees the same op on the same inputs twice and keeps one, whose dense output is then
        # saved for the backward: a bf16 copy of every weight (+13 GiB at 7B, measured on an
        # H200). Without the pass both stay.
        config = functorch_config.patch(cse=not _has_4bit(layer))

        def forward(*args: Any, _fast: Any = fast, _eager: Any = eager, _layer: Any = layer,
                    _config: Any = config, **kwargs: Any) -> Any:
            if broken or not torch.is_grad_enabled() or not _layer.training:
                return _eager(*args, **kwargs)
            try:
                with _config:
                    return _fast(*args, **kwargs)
            # only the compiler's own errors: recomputation stops a layer's forward early with an
            # exception of its own (torch.utils.checkpoint), and OOM or bad input are the user's
            except torch._dynamo.exc.TorchDynamoException as err:
                broken.append(type(err).__name__)
                warnings.warn(f"torch.compile of the decoder layers failed ({type(err).__name__}: "
                              f"{str(err)[:300]}); running them eagerly (--no-compile skips compiling)",
                              stacklevel=2)
                return _eager(*args, **kwargs)

        layer.forward = forward
    return len(layers)


def _has_4bit(layer: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in layer.modules())


_ALLOWED = [True]


def allow_compiling(allowed: bool) -> None:
    """Switch torch.compile off (or on again) for this process: the run option ``compile``
    (``tuneforge train --no-compile``, or TUNEFORGE_COMPILE=0, which the CLI reads)."""
    _ALLOWED[0] = allowed


def compiling_allowed() -> bool:
    return _ALLOWED[0]
