"""The training loop, top to bottom: config -> rows -> model -> steps -> checkpoints.

One process, one device. Rows are shuffled per epoch from ``seed + epoch``, so the data position
is just the optimizer step: resuming restores weights, optimizer, scheduler and RNG, then carries
on from the very next micro-batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tuneforge import __version__
from tuneforge.config.schema import Config, DataSource
from tuneforge.data.dataset import TrainRows, build_rows
from tuneforge.data.encode import IGNORE
from tuneforge.data.pack import Row
from tuneforge.data.replay import build_replay, replay_path, replay_prompts
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError
from tuneforge.fast import attention, recompute
from tuneforge.fast.compiled import compile_layers, compiling_allowed
from tuneforge.fast.path import FastPath, enable, plan_recompute
from tuneforge.fast.path import loss_sum as fast_loss_sum
from tuneforge.models import probe
from tuneforge.models.generate import unquantized_on_cpu
from tuneforge.models.load import (
    load_model,
    load_tokenizer,
    pick_device,
    training_dtypes,
)
from tuneforge.models.lora import apply_lora, trainable_parameters
from tuneforge.models.resolve import resolve_model
from tuneforge.train import parallel, zero
from tuneforge.train.checkpoint import (
    check_space,
    checkpoint_bytes,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tuneforge.train.hooks import Evaluation, JsonlLog, plot_loss
from tuneforge.train.optim import build_optimizer, build_scheduler, moment_bytes
from tuneforge.train.profile import StepProfiler, phase

MAX_BAD_STEPS_IN_A_ROW = 5


class TrainingStopped(UserError):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the step boundary."""


class StopRequest:
    """Turns SIGINT/SIGTERM into a request that the loop honours at the next step boundary,
    after saving a checkpoint; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: the user means now
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        say(f"{self.requested}: saving a checkpoint at the end of this step")

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def say(msg: str) -> None:
    # Under torchrun or Slurm every rank runs this code; one of them speaks for all.
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(f"[tuneforge] {msg}")


class _NoLog:
    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []


def labelled(rows: list[Row]) -> int:
    """How many tokens of ROWS count in the loss (labels shift by one)."""
    return sum(sum(1 for t in r.labels[1:] if t != IGNORE) for r in rows)


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to one length. Padding gets its own restarting positions, so it forms a
    separate block that no real token attends to, and labels of -100, so it costs no loss."""
    width = max(len(r) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        pad = width - len(r)
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE] * pad)
        pos.append(r.position_ids + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "position_ids": torch.tensor(pos)}


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def micro_batches(rows: TrainRows, cfg: Config, step: int, world: int = 1) -> list[list[Row]]:
    """All micro-batches of optimizer step STEP (0-based): ``accumulative_counts`` per rank.
    Rank r trains those at positions r, r + world, ...; so world W with accumulation k trains
    exactly what one process with accumulation W * k trains."""
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    per_step = cfg.accumulative_counts * world
    out = []
    for k in range(per_step):
        g = step * per_step + k
        epoch, index = divmod(g, per_epoch)
        order = epoch_order(len(rows), cfg.seed, epoch)
        out.append([rows[i] for i in order[index * cfg.batch_size:(index + 1) * cfg.batch_size]])
    return out


def total_steps(n_rows: int, cfg: Config, world: int = 1) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_rows / cfg.batch_size) / (cfg.accumulative_counts * world))
    return per_epoch * cfg.max_epochs


def loss_sum(model: Any, batch: dict[str, Any], fast: FastPath | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens of BATCH."""
    if fast is not None and fast.linear_ce:
        return fast_loss_sum(model, batch, fast)
    targets = batch["labels"][:, 1:]
    # Project to the vocabulary only where some row has a label: prompts are most of the tokens,
    # and the vocab projection is the largest matmul of a small model.
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    # No attention_mask: transformers then derives a block-diagonal causal mask from the
    # restarting position_ids, which keeps packed samples apart (or varlen attention does).
    extra = {k: v for k, v in batch.items() if k.startswith(("cu_seq_lens", "max_length"))}
    if probe.accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False, **extra).logits
    if "logits_to_keep" not in extra:  # remote code without it: all positions, then the kept ones
        logits = logits[:, :-1][:, keep]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                           targets[:, keep].reshape(-1), ignore_index=IGNORE, reduction="sum")


def load_for_training(cfg: Config, model_path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The base model as CFG wants it trained: 4-bit for qlora, varlen attention on a GPU."""
    # A model running its own code looks attention up in its own table, where ours is unknown.
    varlen = cfg.fast_path and device.type == "cuda" and attention.varlen_available() \
        and not probe.needs_own_code(model_path, cfg.trust_remote_code)
    return load_model(model_path, device, dtype, load_in_4bit=cfg.method == "qlora",
                      quant_type=cfg.bnb_4bit_quant_type, double_quant=cfg.bnb_4bit_use_double_quant,
                      trust_remote_code=cfg.trust_remote_code,
                      attn_implementation=attention.register() if varlen else "sdpa")


def prepare_for_training(model: Any, cfg: Config, partitioned: bool = False) -> tuple[Any, FastPath | None]:
    """Gradient checkpointing hooks, LoRA adapters and the fast path, as CFG says (PARTITIONED:
    the weights will be ZeRO-3 partitions)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method != "full":
        model = apply_lora(model, cfg)
    varlen = model.config._attn_implementation == attention.NAME
    if cfg.fast_path and probe.runs_own_code(model):
        say("the model runs its own code (trust_remote_code): trained through the plain path "
            "(no fused kernels, varlen attention or chunked head)")
        return model, None
    return model, enable(model, varlen=varlen, partitioned=partitioned) if cfg.fast_path else None


@dataclass(frozen=True)
class Shares:
    """The part of the weights, gradients and optimizer state (moments, and DeepSpeed's fp32
    master copy of 16-bit weights) that each GPU holds under an engine."""
    weights: float = 1.0
    gradients: float = 1.0
    optimizer: float = 1.0
    fp32_master: bool = False


def shares(cfg: Config, world: int, fsdp: bool, ds: dict | None) -> Shares:
    if ds is not None:
        stage = zero.stage(ds)
        return Shares(weights=1 / world if stage == 3 else 1.0, gradients=1 / world if stage >= 2 else 1.0,
                      optimizer=0.0 if zero.offloads_optimizer(ds) else 1 / world, fp32_master=True)
    if fsdp:  # with adapters the frozen base stays whole (parallel.shard)
        return Shares(weights=1 / world if cfg.method == "full" else 1.0, gradients=1 / world, optimizer=1 / world)
    return Shares()


def plan_memory(model: Any, cfg: Config, device: torch.device, amp: torch.dtype | None,
                part: Shares = Shares()) -> Any:
    """With gradient_checkpointing='auto': on a GPU, recompute as few layers as the memory budget
    allows (returns the plan); on a CPU, none. Call with the whole model on its device, before
    any sharding: PART says what each GPU will keep of it. What the optimizer adds at its first
    step is counted in."""
    if cfg.gradient_checkpointing != "auto":
        return None
    if device.type != "cuda":
        recompute.apply(recompute.decoder_layers(model), 0)
        return None
    later = first_step_bytes(list(trainable_parameters(model).values()), cfg, part)
    return plan_recompute(model, cfg.max_length * cfg.batch_size, cfg.memory_budget_gib, amp, later,
                          weight_share=part.weights)


def first_step_bytes(params: list[torch.nn.Parameter], cfg: Config, part: Shares = Shares()) -> int:
    """What the first optimizer step adds on each GPU: gradients, AdamW's moments and, under
    DeepSpeed, the fp32 master copy of 16-bit weights, each cut to PART."""
    grads = sum(p.numel() * p.element_size() for p in params)
    optimizer = moment_bytes(params, cfg)
    if part.fp32_master:
        optimizer += sum(p.numel() * 4 for p in params if p.element_size() < 4)
    return int(grads * part.gradients + optimizer * part.optimizer)


@contextlib.contextmanager
def compiled_backward() -> Iterator[None]:
    """The compiled layers' backward is compiled at the first backward pass: a failure there
    cannot fall back to eager, so it becomes one line saying how to train without compiling."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as err:
        raise UserError(f"compiling the decoder layers' backward failed ({str(err).splitlines()[0][:200]}); "
                        "train without compiling: TUNEFORGE_COMPILE=0 tuneforge train ...") from err


def forward_backward(model: Any, batches: list[dict[str, torch.Tensor]], fast: FastPath | None,
                     device: torch.device, amp: torch.dtype | None, n_labels: int,
                     scale: float = 1.0, wrapped: Any = None) -> float:
    """Accumulate the gradient of one optimizer step's micro-batches (of SCALE times the loss);
    returns the mean loss per labelled token. WRAPPED: MODEL behind a wrapper whose forward
    returns the loss, the FSDP root or a DeepSpeed engine (which also reduces the gradients and,
    after the last micro-batch, steps the optimizer)."""
    total = 0.0
    for i, b in enumerate(batches):
        if isinstance(wrapped, parallel.LossModule):
            wrapped.accumulating(i < len(batches) - 1)
        with phase("data"):
            if fast is not None and fast.varlen:
                b = {**b, **attention.varlen_kwargs(b["position_ids"])}
            b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        with phase("forward"), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = (wrapped(**b) if wrapped is not None else loss_sum(model, b, fast)) / max(1, n_labels)
        with phase("backward"), compiled_backward():
            if wrapped is None or isinstance(wrapped, parallel.LossModule):
                (loss * scale if scale != 1 else loss).backward()
            else:
                wrapped.backward(loss * scale, scale_wrt_gas=False)  # our loss is already a mean over the step
        if wrapped is not None and not isinstance(wrapped, parallel.LossModule):
            with phase("optimizer"):
                wrapped.step()
        total = total + loss.detach()  # no .item() here: a sync per micro-batch stalls the GPU queue
    with phase("reduce"):
        return float(total)


def _check_resumable(ckpt: dict[str, Any], model: Any, cfg: Config) -> None:
    missing = set(trainable_parameters(model)) - set(ckpt["state_dict"])
    if missing or ckpt["method"] != cfg.method:
        raise UserError(
            f"--resume: the checkpoint was written by a {ckpt['method']} run that does not match "
            f"this config ({cfg.method}, {len(missing)} trainable tensors missing); resume with "
            "the config it was trained with"
        )


def checkpoint_payload(model: Any, optimizer: Any, scheduler: Any, cfg: Config, step: int,
                       template: Any, world_size: int = 1,
                       gathered: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """What a checkpoint holds; GATHERED: the weights and optimizer state, when an engine
    (DeepSpeed) had to assemble them from its partitions."""
    peft_config = None
    if cfg.method != "full":
        peft_config = model.peft_config["default"].to_dict()
        peft_config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
    return {
        "step": step,
        "state_dict": gathered[0] if gathered else
        {n: parallel.full(p.detach()).cpu().clone() for n, p in trainable_parameters(model).items()},
        "optimizer": gathered[1] if gathered else parallel.full_optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "config": cfg.model_dump(mode="json"),
        "method": cfg.method,
        "peft_config": peft_config,
        "template": {"name": template.name, "chat_template": template.chat_template,
                     "stop_words": list(template.stop_words)},
        "tuneforge_version": __version__,
        "world_size": world_size,
    }


def _deepspeed_config(deepspeed: str | None, fsdp: bool, ranks: parallel.Ranks) -> tuple[dict, str] | None:
    """The --deepspeed JSON and its source, or None when the built-in loop trains (also for one
    process without DeepSpeed installed: there is nothing to shard, and the maths is the same)."""
    if not deepspeed:
        return None
    ds = zero.resolve(deepspeed)  # a bad name or file is an error either way
    if fsdp:
        raise UserError("--deepspeed and --fsdp are two engines for the same job; pick one")
    if ranks.world > 1:
        zero.require()
    if not zero.available():
        say(f"--deepspeed {deepspeed}: DeepSpeed is not installed; one process has nothing to "
            "shard, so the built-in loop trains with the same settings")
        return None
    return ds


def checkpoints_kept(cfg: Config, steps: int) -> int:
    """How many checkpoints a run of STEPS steps will have on disk at once (for save_total_limit
    -1, "keep all", the next three)."""
    written = steps // cfg.save_steps + (cfg.save_last and steps % cfg.save_steps != 0)
    return min(written, cfg.save_total_limit if cfg.save_total_limit > 0 else 3)


def _check_deepspeed(cfg: Config, partitioned: bool) -> None:
    if cfg.optim_type != "AdamW":
        raise UserError(f"--deepspeed with optim_type='{cfg.optim_type}': DeepSpeed partitions AdamW's "
                        "state itself; use optim_type='AdamW'")
    if partitioned and cfg.method == "qlora":
        raise UserError("--deepspeed ZeRO-3 with method='qlora': 4-bit weights cannot be partitioned; "
                        "use deepspeed_zero2 (what XTuner's QLoRA recipes use)")


def _with_replay(cfg: Config, model: Any, model_path: Path, tokenizer: Any,
                 template: Any, progress: bool = True) -> tuple[TrainRows, Any]:
    """Rows with the base model's answers to the general prompts mixed in (generated once; by
    the unquantized base where the training model is 4-bit on a CPU, see unquantized_on_cpu)."""
    path = replay_path(model_path, template, cfg.SYSTEM, cfg.replay_max_new_tokens)
    if path.is_file():
        say(f"replay: base-model answers to general prompts from {path}")
    else:
        t0 = time.time()
        with unquantized_on_cpu(model, model_path, cfg.trust_remote_code) as answerer:
            how = " (unquantized: 4-bit is slow on a CPU)" if answerer is not model else ""
            say(f"replay: the base model{how} answers {len(replay_prompts())} general prompts once, "
                f"up to {cfg.replay_max_new_tokens} tokens each (cached for later runs)")
            build_replay(answerer, tokenizer, template, path, cfg.SYSTEM, cfg.replay_max_new_tokens,
                         say=say, progress=progress)
            del answerer  # the unquantized copy goes before training starts
        say(f"replay: done in {time.time() - t0:.0f}s -> {path}")
    rows, stats = build_rows(cfg, tokenizer, template,
                             extra=[DataSource(path=str(path), repeat=cfg.replay_repeat)])
    say(f"data with replay: {stats.summary()}")
    return rows, stats


def _warn_few_steps(rows: TrainRows, cfg: Config, world: int = 1) -> None:
    per_epoch = total_steps(len(rows), cfg.model_copy(update={"max_steps": None, "max_epochs": 1}), world)
    if per_epoch < 20 and not cfg.max_steps:
        say(f"warning: only {per_epoch} optimizer step(s) per epoch ({len(rows)} rows of up to "
            f"{cfg.max_length} tokens, {cfg.batch_size}x{cfg.accumulative_counts} rows per step): "
            "too few to learn from; lower max_length or accumulative_counts, or set max_steps")


def _warn_lost_updates(cfg: Config, dtype: torch.dtype, deepspeed: bool) -> None:
    """dtype='bfloat16' asks a full fine-tune to update bf16 weights: less memory, but most of
    AdamW's updates round away (models.load.training_dtypes; measured on the 7B-shaped model, 6
    steps: loss 12.3 -> 9.1 with bf16 weights under FSDP2, 12.3 -> 4.0 under ZeRO-3's fp32
    master weights)."""
    if cfg.method == "full" and dtype == torch.bfloat16 and not deepspeed:
        say(f"warning: full fine-tune of bf16 weights: AdamW updates of about lr={cfg.lr:g} are below "
            "bf16's precision for most weights and round away, so it learns slowly; dtype='auto' keeps "
            "fp32 master weights (bf16 compute), as does --deepspeed")


def _check_room(work_dir: Path, params: list[torch.nn.Parameter], cfg: Config, steps: int,
                ranks: parallel.Ranks) -> None:
    """Room on disk for the checkpoints this run keeps. Rank 0 checks, every rank stops: an error
    on one rank alone leaves the others waiting forever in their next collective."""
    room = None
    if ranks.main:
        try:
            check_space(work_dir, checkpoint_bytes(params), checkpoints_kept(cfg, steps))
        except UserError as err:
            room = err
    if parallel.anyone(room is not None, ranks):
        raise room or UserError("rank 0 found no room for the checkpoints (its error is above)")


def _restore(ckpt: dict[str, Any], engine: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
             named: dict[str, torch.nn.Parameter], fsdp: bool, cfg: Config, ranks: parallel.Ranks) -> int:
    """Optimizer, schedule and random state from CKPT (the weights are in already); returns the
    step to go on from. The checkpoint is in the one-process format whatever wrote it."""
    if engine is not None:
        zero.load_full_state(engine, named, ckpt["state_dict"], ckpt["optimizer"])
    else:
        optimizer.load_state_dict(parallel.sharded_optimizer_state(ckpt["optimizer"], list(named.values()))
                                  if fsdp else ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    say(f"resumed from step {ckpt['step']}")
    before = ckpt.get("world_size", 1) * ckpt["config"]["accumulative_counts"]
    if before != ranks.world * cfg.accumulative_counts:
        say(f"warning: the checkpoint trained {before} micro-batches per step (ranks x "
            f"accumulative_counts), this run {ranks.world * cfg.accumulative_counts}; the data "
            "order and the loss scale change from here on")
    return ckpt["step"]


def train(cfg: Config, work_dir: Path, resume: str | bool | None = None,
          deepspeed: str | None = None, progress: bool = True, fsdp: bool = False,
          profile: bool = False) -> Path | None:
    """Run training as CFG says; returns the last checkpoint written (None with save_last=False
    and no save_steps reached). Under torchrun, every
    rank calls this; rank 0 alone logs, evaluates and saves. PROFILE: record a few steps with
    torch.profiler (train/profile.py)."""
    ranks = parallel.init()
    try:
        last = _train(cfg, work_dir, ranks, resume, deepspeed, progress, fsdp, profile)
    except BaseException:
        # With other ranks, leave the group as it is: tearing NCCL down while another rank waits in
        # a collective can hang; the launcher stops the others once this one exits.
        if ranks.world == 1:
            parallel.shutdown(ranks)
        raise
    parallel.shutdown(ranks)
    return last


def _train(cfg: Config, work_dir: Path, ranks: parallel.Ranks, resume: str | bool | None,
           deepspeed: str | None, progress: bool, fsdp: bool, profile: bool) -> Path | None:
    started = time.time()
    ds_file = _deepspeed_config(deepspeed, fsdp, ranks)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Model path first: a missing model is the most common mistake, so fail before any work.
    model_path = resolve_model(cfg.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    template = get_template(cfg.prompt_template, tokenizer)
    if not ranks.main:
        parallel.barrier(ranks)  # rank 0 encodes and caches the data; the others then read it
    rows, stats = build_rows(cfg, tokenizer, template)  # all data errors surface here, early
    if ranks.main:
        parallel.barrier(ranks)
    say(f"data: {stats.summary()}")
    if stats.bad_lines:
        say(f"warning: skipped {stats.bad_lines} bad line(s) (skip_bad_lines); "
            "`tuneforge check-dataset CONFIG` lists them")

    if ranks.main:
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create work dir '{work_dir}': {err.strerror}; pick another with --work-dir") from err
    parallel.barrier(ranks)
    ckpt = load_checkpoint(find_resume(work_dir, resume if isinstance(resume, str) else None)) \
        if resume else None
    kept = work_dir / Path(cfg._source).name if cfg._source else None
    if kept and not resume and ranks.main and not (kept.exists() and kept.samefile(cfg._source)):
        shutil.copyfile(cfg._source, kept)

    device = parallel.device(ranks) if ranks.world > 1 else pick_device()
    dtype, amp = training_dtypes(cfg.dtype, device, cfg.method, master_weights_elsewhere=ds_file is not None)
    ds = zero.fill_auto(*ds_file, cfg, ranks.world, dtype) if ds_file else None
    partitioned = ds is not None and zero.stage(ds) == 3
    if ds is not None:
        _check_deepspeed(cfg, partitioned)
    _warn_lost_updates(cfg, dtype, ds is not None)
    if (ds is not None or fsdp) and ranks.world == 1:
        parallel.init_single()
    model = load_for_training(cfg, model_path, device, dtype)
    if cfg.pack_to_max_length and probe.runs_own_code(model) and not probe.isolates_packed_samples(model):
        say("the model's own code lets packed samples attend to each other: one sample per row")
        cfg = cfg.model_copy(update={"pack_to_max_length": False})
        rows, stats = build_rows(cfg, tokenizer, template)
    if cfg.replay_general:
        if not ranks.main:
            parallel.barrier(ranks)  # rank 0 generates the replay answers once
        rows, stats = _with_replay(cfg, model, model_path, tokenizer, template, progress)
        if ranks.main:
            parallel.barrier(ranks)
    _warn_few_steps(rows, cfg, ranks.world)
    model, fast = prepare_for_training(model, cfg, partitioned)
    if ckpt is not None:  # weights first, while they are whole; the optimizer state below
        _check_resumable(ckpt, model, cfg)
        model.load_state_dict(ckpt["state_dict"], strict=False)
    plan = plan_memory(model, cfg, device, amp, shares(cfg, ranks.world, fsdp, ds))
    if plan:
        say(plan.describe() + ("" if plan.need_gib <= plan.budget_gib else
                               "; that is over budget: lower max_length or use qlora"))
    # after the memory plan, whose probe forward would otherwise compile for its own shapes.
    # Not ZeRO-3 (its hooks gather weights inside the layer) nor 4-bit weights (bitsandbytes
    # calls are opaque to the compiler) yet.
    if fast and device.type == "cuda" and compiling_allowed() and not partitioned and cfg.method != "qlora":
        fast.compiled_layers = compile_layers(recompute.decoder_layers(model))
    if fast:
        say(fast.describe())
    def loss_of(m: Any, b: dict) -> torch.Tensor:  # what the FSDP root or DeepSpeed's engine returns
        return loss_sum(m, b, fast)

    root = parallel.LossModule(model, loss_of) if fsdp else None
    if root is not None:
        parallel.shard(root, recompute.decoder_layers(model), ranks, compute=amp)
    named = trainable_parameters(model)
    params = list(named.values())
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    engine_name = (f"DeepSpeed ZeRO-{zero.stage(ds)}" if ds is not None else "FSDP2 (weights sharded)"
                   if fsdp else "data parallel")
    say(f"model: {model_path} on {device} ({dtype}{', bf16 autocast' if amp else ''}), {cfg.method}, "
        f"{n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M parameters trainable"
        + (f"; {ranks.world} rank(s), {engine_name}" if ranks.world > 1 or ds is not None or fsdp else ""))

    steps = total_steps(len(rows), cfg, ranks.world)
    _check_room(work_dir, params, cfg, steps, ranks)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, steps, cfg.warmup_ratio)
    engine = zero.wrap(model, loss_of, optimizer, ds) if ds is not None else None
    start = _restore(ckpt, engine, optimizer, scheduler, named, fsdp, cfg, ranks) if ckpt is not None else 0
    if not fsdp and engine is None:  # (DeepSpeed broadcasts rank 0's weights itself)
        parallel.broadcast_parameters(params, ranks)

    log = JsonlLog(work_dir / "train_log.jsonl") if ranks.main else _NoLog()
    # With sharded weights every forward is a collective: rank 0 cannot generate alone.
    run_eval = Evaluation(cfg, model, tokenizer, template, log, work_dir / "eval_outputs.txt", say,
                          enabled=ranks.main and not fsdp and not partitioned)

    if start == 0:
        log.write({"event": "start", "steps": steps, "rows": len(rows), "data": stats.__dict__})
        run_eval(0)

    model.train()
    last = None
    # A live bar on a terminal; in a log file, a plain line every tenth of the run instead.
    live = progress and sys.stderr.isatty() and ranks.main
    every = max(1, steps // 10)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not live,
               dynamic_ncols=True)
    t_loop = time.time()
    skipped = bad_in_a_row = 0
    stop = StopRequest()
    # after two steps of warm-up (compilation, allocator growth) where the run is long enough
    first = start + min(2, max(0, steps - start - 1))
    profiler = StepProfiler(work_dir / "profile", first, min(3, steps - first), ranks.rank) if profile else None
    try:
        for step in range(start, steps):
            if profiler:
                profiler.before(step)
            t0 = time.time()
            with phase("data"):
                every_rank = micro_batches(rows, cfg, step, ranks.world)
                n_labels = sum(labelled(b) for b in every_rank)  # the loss is a mean over all ranks' tokens
                batches = [collate(b, tokenizer.pad_token_id) for b in every_rank[ranks.rank::ranks.world]]
            # FSDP and DeepSpeed average gradients over ranks; each rank's loss is its part of the sum
            total = forward_backward(model, batches, fast, device, amp, n_labels,
                                     scale=ranks.world if fsdp or engine else 1, wrapped=engine or root)
            with phase("reduce"):
                if not fsdp and engine is None:
                    parallel.sum_gradients(params, ranks)
                total = parallel.total(total, ranks)
                if engine is not None:  # it clipped and stepped already (or skipped a non-finite step)
                    grad_norm = float(engine.get_global_grad_norm() or 0.0)
                else:
                    grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_norm)).item()
            done = step + 1
            if math.isfinite(total) and math.isfinite(grad_norm):
                bad_in_a_row = 0
                if engine is None:
                    with phase("optimizer"):
                        optimizer.step()
                scheduler.step()
            else:
                # One bad batch (overflow, a corrupt sample) must not poison the weights: skip the
                # update, count it, and stop only if it keeps happening.
                skipped += 1
                bad_in_a_row += 1
                log.write({"step": done, "skipped_update": "non-finite loss or gradient"})
                say(f"warning: step {done}: non-finite loss or gradient; update skipped ({skipped} so far)")
                if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                    stop.restore()
                    good = find_resume(work_dir, None) if list_checkpoints(work_dir) else None
                    raise UserError(
                        f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; stopped. "
                        f"Lower lr or check the data; last good checkpoint: {good or 'none yet'}")
            if engine is None:
                with phase("optimizer"):
                    optimizer.zero_grad(set_to_none=True)

            n_tokens = sum(len(b) * max(map(len, b)) for b in every_rank)  # as collate pads them
            tps = n_tokens / max(1e-9, time.time() - t0)
            lr = scheduler.get_last_lr()[0]
            log.write({"step": done, "loss": round(total, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
                       "tokens": n_tokens, "tokens_per_s": round(tps, 1),
                       **({"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
                          if device.type == "cuda" else {})})
            busy = profiler.after(step) if profiler else None
            if busy:
                log.write({"step": done, "profile": busy.__dict__})
                say(f"profile of steps {first + 1}-{done} (rank {ranks.rank}): {busy.describe()}; "
                    f"operator tables and traces in {work_dir / 'profile'}")
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if progress and not live and (done % every == 0 or done == steps):
                eta = (time.time() - t_loop) / (done - start) * (steps - done)
                say(f"step {done}/{steps} loss {total:.4f} lr {lr:.2e} {tps:.0f} tok/s eta {eta:.0f}s")

            with phase("reduce"):
                stopping = parallel.anyone(stop.requested is not None, ranks)
            if done % cfg.save_steps == 0 or (done == steps and cfg.save_last) or stopping:
                last = work_dir / f"iter_{done}.pth"
                # gathering FSDP shards or ZeRO partitions takes every rank
                gathered = zero.full_state(engine, named, keep=ranks.main) if engine is not None else None
                payload = checkpoint_payload(model, optimizer, scheduler, cfg, done, template, ranks.world,
                                             gathered) if ranks.main or fsdp else None
                if ranks.main:
                    last = save_checkpoint(work_dir, done, payload, cfg.save_total_limit)
                    say(f"saved {last}")
            if stopping:
                bar.close()
                stop.restore()
                parallel.barrier(ranks)
                raise TrainingStopped(f"stopped by {stop.requested or 'another rank'} at step {done}/{steps}; checkpoint {last}. "
                                      "Continue with the same command plus --resume")
            if done % cfg.evaluation_freq == 0 and done != steps:
                run_eval(done)
    finally:
        stop.restore()
    bar.close()

    parallel.barrier(ranks)  # the final checkpoint is on disk before any rank returns
    if last is None and list_checkpoints(work_dir):  # resumed from the final step, or save_last=False
        last = find_resume(work_dir, None)
    run_eval(steps)
    if not ranks.main:
        return last
    plot = plot_loss(log.read(), work_dir / "loss.png")
    log.write({"event": "end", "seconds": round(time.time() - started, 1)})
    say(f"done in {time.time() - started:.0f}s; last checkpoint {last}"
        + (f"; loss plot {plot}" if plot else ""))
    return last
