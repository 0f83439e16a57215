"""DeepSpeed ZeRO as the training engine: ``--deepspeed deepspeed_zero2`` (a shipped preset) or a
user's DeepSpeed JSON.

tuneforge keeps what it owns: the data each rank trains, the loss (a sum over every rank's
labelled tokens), AdamW and the lr schedule, the checkpoint format. DeepSpeed gets the model and
that optimizer and does what it is for: partitioned optimizer state (ZeRO-1), gradients (ZeRO-2)
and weights (ZeRO-3), optionally offloaded to the CPU. Checkpoints are gathered into the
one-process format, so they resume on any number of ranks, with or without DeepSpeed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tuneforge import compat
from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.train import parallel
from tuneforge.train.parallel import LossModule

PRESET_DIR = Path(__file__).resolve().parent.parent / "config" / "deepspeed"
MOMENTS = ("exp_avg", "exp_avg_sq")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def resolve(name_or_path: str) -> tuple[dict[str, Any], str]:
    """A shipped preset (``deepspeed_zero2``) or a user's DeepSpeed JSON file, and where it came from."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path.removesuffix('.json')}.json"
    if not path.is_file():
        raise UserError(f"--deepspeed '{name_or_path}': not a file and not a preset; presets: "
                        + ", ".join(presets()))
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid DeepSpeed JSON: {err.msg}") from err


def fill_auto(ds: dict[str, Any], source: str, cfg: Config, world: int, dtype: torch.dtype) -> dict[str, Any]:
    """DS with every ``"auto"`` replaced by what the config says. A value that is set and
    disagrees with the config is an error: two places saying different things is a bug."""
    ds = copy.deepcopy(ds)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UserError(f"{source}: remove the '{section}' section; tuneforge builds AdamW and the lr "
                            "schedule from the config (lr, betas, weight_decay, warmup_ratio)")
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        "train_batch_size": cfg.batch_size * cfg.accumulative_counts * world,
        "gradient_clipping": cfg.max_norm,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise UserError(f"{source}: {key} = {have}, but the config gives {value}; set it to \"auto\" "
                            "(filled from the config) or change the config")
    for section, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        block = ds.setdefault(section, {})
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = on
        elif bool(enabled) != on:
            raise UserError(f"{source}: {section}.enabled = {enabled}, but the model trains in {dtype}; "
                            f"set it to \"auto\" or set dtype in the config")
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW, not DeepSpeed's fused one
    ds.setdefault("steps_per_print", 1 << 30)  # tuneforge logs every step itself
    return ds


def stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """True when DS keeps the optimizer state in CPU memory (the _offload presets)."""
    return (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") == "cpu"


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require() -> None:
    if not available():
        raise UserError("--deepspeed needs DeepSpeed: pip install 'tuneforge[deepspeed]' "
                        "(or train with --fsdp, which needs nothing more than PyTorch)")


def wrap(model: torch.nn.Module, loss_fn: Callable[[Any, dict], torch.Tensor],
         optimizer: torch.optim.Optimizer, ds: dict[str, Any]) -> Any:
    """The DeepSpeed engine around MODEL (whose forward now returns LOSS_FN's loss). Call with
    the process group made (parallel.init or init_single): DeepSpeed then takes it, and never
    goes looking for MPI."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=parallel.backend(), auto_mpi_discovery=False, verbose=False)
    engine, *_ = deepspeed.initialize(model=LossModule(model, loss_fn), optimizer=optimizer, config=ds)
    return engine


def full_state(engine: Any, params: dict[str, torch.nn.Parameter], keep: bool,
               group_sizes: list[int] | None = None) -> tuple[dict, dict] | None:
    """The trainable weights (fp32 master copies) and AdamW's state, gathered whole, in the shapes
    a one-process run writes; None where not KEEP. A collective: every rank calls it, in the same
    order, and only the one that keeps the result copies it to CPU memory. GROUP_SIZES: the
    parameters in each optimizer group, which hold PARAMS one group after the other (None: one)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, state = {}, {}
    step = _step(engine)
    _relink_groups(engine)
    for i, (name, p) in enumerate(params.items()):
        weight = safe_get_full_fp32_param(p)
        moments = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        if not keep:
            continue
        weights[name] = weight.detach().cpu().clone()
        if step is not None and all(m is not None for m in moments.values()):
            state[i] = {"step": torch.tensor(float(step)),
                        **{k: m.detach().cpu().clone() for k, m in moments.items()}}
    if not keep:
        return None
    groups, start = [], 0
    for group, size in zip(_client(engine).param_groups, group_sizes or [len(params)], strict=True):
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + size))})
        start += size
    return weights, {"state": state, "param_groups": groups}


def load_full_state(engine: Any, params: dict[str, torch.nn.Parameter], weights: dict, optim: dict) -> None:
    """Put a one-process checkpoint's weights and AdamW state into the engine's partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    client = _client(engine)
    state = optim["state"]
    if state:
        # torch's AdamW creates its state at the first step; make it now so there is a place to load into
        step = next(iter(state.values()))["step"]
        for flat in _fp32_partitions(engine):
            client.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                                  **{k: torch.zeros_like(flat) for k in MOMENTS}}
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link it
            engine.optimizer._lazy_init_hp_params_optimizer_state()
    for i, (name, p) in enumerate(params.items()):
        safe_set_full_fp32_param(p, weights[name].to(p.device))
        if i in state:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, state[i][k].to(p.device), k)
    saved = optim["param_groups"]
    for i, group in enumerate(client.param_groups):  # as optimizer.load_state_dict would: the next step's lr
        group["lr"] = saved[min(i, len(saved) - 1)]["lr"]
    # The 16-bit weights forward uses were loaded into the model before wrapping: they are these
    # fp32 values rounded, as a step would have left them.


def _relink_groups(engine: Any) -> None:
    """ZeRO-1/2 links each weight to its optimizer state once, right after the first group's
    first step, when a second group (LoRA+'s) has no state yet: its weights' moments then read as
    missing ('exp_avg not found in optimizer state fragment'). Linking again now finds them."""
    zero = engine.optimizer
    if len(_client(engine).param_groups) < 2 or not hasattr(zero, "_hp_optimizer_states_linked"):
        return
    if _step(engine) is not None:
        zero._hp_optimizer_states_linked = False
        compat.attr(zero, "_lazy_init_hp_params_optimizer_state", "deepspeed",
                    "saving a ZeRO-1/2 run with two parameter groups (train/zero.py)")()


def _client(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer tuneforge built, under DeepSpeed's wrapper."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _fp32_partitions(engine: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master weights, which the optimizer state is keyed by."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(zero.fp32_partitioned_groups_flat)
    return list(compat.attr(zero, "single_partition_of_fp32_groups", "deepspeed",  # ZeRO-1/2
                            "resuming a ZeRO run from a checkpoint (train/zero.py)"))


def _step(engine: Any) -> int | None:
    for st in _client(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return None
