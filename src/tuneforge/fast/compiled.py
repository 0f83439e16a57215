"""Elementwise maths fused into one kernel by torch.compile on a GPU.

The norm and MLP functions read and write whole activations several times when run op by op
(fp32 upcasts, sigmoid, products); compiled, each becomes one pass over memory. On a CPU, with
TUNEFORGE_COMPILE=0, or where compiling fails (no Triton), the same function runs eagerly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch


def on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    state: dict[str, Callable[..., Any]] = {}

    def call(*args: Any) -> Any:
        if not args[0].is_cuda or os.environ.get("TUNEFORGE_COMPILE", "1") == "0":
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
