"""The training recipe: ``setup()`` builds every piece in the order each needs the one before,
``train()`` is the loop, ``save_checkpoint()`` and ``resume()`` write and read a run's state.

    recipe = Recipe(cfg, work_dir, RunOptions(...))
    recipe.setup()
    last_checkpoint = recipe.train()

``tuneforge train`` runs exactly this (``train()`` below), and so do the benchmarks. Under
torchrun every rank builds its own recipe; rank 0 alone logs, evaluates and saves. The engine
(one process, data parallel, FSDP2, DeepSpeed) is picked once in ``_pick_engine``; nothing else
here knows which one runs.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tuneforge import compat, fast
from tuneforge.config.schema import Config, DataSource
from tuneforge.data.batching import collate, micro_batches, model_inputs, padded_tokens
from tuneforge.data.dataset import build_pair_rows, build_rows
from tuneforge.data.identity_pairs import config_samples, last_questions, pairs_file
from tuneforge.data.replay import (
    answer_prompts,
    missing,
    prompts_for,
    read_answers,
    replay_path,
    replay_prompts,
    training_file,
)
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError
from tuneforge.fast.apply import Target
from tuneforge.fast.compiled import allow_compiling
from tuneforge.fast.path import FastPath
from tuneforge.models import probe
from tuneforge.models.generate import unquantized_on_cpu
from tuneforge.models.load import load_model, load_tokenizer, pick_device, training_dtypes
from tuneforge.models.lora import apply_lora, initial_adapter, trainable_parameters
from tuneforge.models.resolve import resolve_model
from tuneforge.train import checks, parallel, stages, trackers, zero
from tuneforge.train.checkpoint import (
    Checkpoint,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from tuneforge.train.checkpoint import save_checkpoint as write_checkpoint
from tuneforge.train.engines.base import LocalEngine
from tuneforge.train.engines.data_parallel import DataParallelEngine
from tuneforge.train.engines.deepspeed import DeepSpeedEngine
from tuneforge.train.engines.fsdp import FSDPEngine
from tuneforge.train.hooks import Evaluation, NoLog, plot_loss
from tuneforge.train.objective import ReferenceRun, objective_for, reference_key
from tuneforge.train.optim import build_optimizer, build_scheduler, first_step_bytes, in_group_order
from tuneforge.train.options import RunOptions
from tuneforge.train.profile import StepProfiler, phase
from tuneforge.train.stop import StopRequest, TrainingStopped
from tuneforge.train.trackers.log import TrackedLog

MAX_BAD_STEPS_IN_A_ROW = 5
LIBRARIES = {"torch", "transformers", "peft"}


def speaker(main: bool) -> Callable[[str], None]:
    """The run's voice: under torchrun every rank runs the recipe, and rank 0 speaks for all."""
    def say(msg: str) -> None:
        if main:
            tqdm.write(f"[tuneforge] {msg}")
    return say


class Recipe:
    def __init__(self, cfg: Config, work_dir: Path, options: RunOptions | None = None,
                 ranks: parallel.Ranks | None = None) -> None:
        self.cfg, self.work_dir = cfg, Path(work_dir)
        self.options, self.ranks = options or RunOptions(), ranks or parallel.Ranks()
        self.say = speaker(self.ranks.main)
        self.started = time.time()

    # ------------------------------------------------------------------ setup

    def setup(self, rows: Any = None) -> None:
        """Build everything the loop needs, each piece after what it depends on. ROWS: packed
        rows to train on instead of the config's data (the benchmarks' token workloads)."""
        cfg, ranks = self.cfg, self.ranks
        # a library release that renamed a private part we patch fails here, not mid-step
        compat.check(LIBRARIES | ({"deepspeed"} if self.options.deepspeed else set()))
        allow_compiling(self.options.compile)  # also the fused norm and MLP maths
        ds_file = self._deepspeed_file()  # a bad --deepspeed value fails before any work
        self.report_to = trackers.chosen(cfg.report_to)  # and a tracker whose package is missing
        trackers.check(self.report_to)
        random.seed(cfg.seed)  # every rank, and every rerun, starts from the same random state
        torch.manual_seed(cfg.seed)
        # the model path first: a missing model is the most common mistake
        self.model_path = resolve_model(cfg.pretrained_model_name_or_path)
        self.tokenizer = load_tokenizer(self.model_path, cfg.trust_remote_code)
        self.template = get_template(cfg.prompt_template, self.tokenizer)
        self.objective = objective_for(cfg)  # what the step minimises, and over what it averages
        if rows is None:
            self._build_rows()  # all data errors surface here, before the model loads
        else:
            self.rows, self.stats = rows, None
        self.ckpt = self._work_dir()  # and the checkpoint to resume from, if any
        # the SFT stage's last checkpoint starts the preference stage: its weights, not its optimizer
        self.stage_start = self.ckpt is not None and self.ckpt.config.get("objective", "sft") != cfg.objective
        # the device and dtypes decide the engine's settings (DeepSpeed's bf16 block)
        self.device = parallel.device(ranks) if ranks.world > 1 else pick_device()
        self.dtype, self.amp = training_dtypes(cfg.dtype, self.device, cfg.method,
                                               master_weights_elsewhere=ds_file is not None)
        self.engine = self._pick_engine(ds_file)
        checks.warn_lost_updates(cfg, self.dtype, ds_file is not None, self.say)
        self.model, self.fast = self._model(given_rows=rows is not None)  # loaded, adapted, patched
        # the engine wraps the patched model: FSDP shards its layers, DeepSpeed takes it whole
        self.engine.wrap(self.model, self._loss)
        # after wrapping: shards, where sharded; LoRA+'s two groups one after the other
        self.named = in_group_order(trainable_parameters(self.model), cfg)
        self._describe_model()
        self.steps = checks.total_steps(len(self.rows), cfg, ranks.world)
        checks.check_room(self.work_dir, list(self.named.values()), cfg, self.steps, ranks)
        self.optimizer = build_optimizer(self.named, cfg)
        # a preference stage after sft_steps of SFT schedules its own steps only
        self.scheduler = build_scheduler(self.optimizer, self.steps - (cfg.sft_steps or 0), cfg.warmup_ratio)
        self.engine.prepare(self.optimizer, list(self.named.values()))
        self.start = 0 if self.ckpt is None else self._stage_from(self.ckpt) if self.stage_start \
            else self.resume(self.ckpt)
        self._hooks()
        self.model.train()

    def _deepspeed_file(self) -> tuple[dict, str] | None:
        """The --deepspeed JSON and its source, or None when the built-in engines train (also
        for one process without DeepSpeed installed: nothing to shard, the maths is the same)."""
        name = self.options.deepspeed
        if not name:
            return None
        ds = zero.resolve(name)  # a bad name or file is an error either way
        if self.options.fsdp:
            raise UserError("--deepspeed and --fsdp are two engines for the same job; pick one")
        if self.ranks.world > 1:
            zero.require()
        if not zero.available():
            self.say(f"--deepspeed {name}: DeepSpeed is not installed; one process has nothing to "
                     "shard, so the built-in loop trains with the same settings")
            return None
        return ds

    def _build_rows(self, extra: list[DataSource] | None = None, pairs: Path | None = None) -> None:
        """The rows to train on. EXTRA: replay's sources beside data_files; PAIRS: the pairs file
        that identity_pairs made, instead of data_files (which are then conversations, built
        here first only to surface their errors before the model loads)."""
        cfg = self.cfg
        if pairs is not None:
            cfg = cfg.model_copy(update={"data_files": [DataSource(path=str(pairs))], "identity_pairs": False,
                                         "data_format": "auto"})
        elif cfg.identity_pairs:
            cfg = cfg.model_copy(update={"objective": "sft"})
        if not self.ranks.main:
            parallel.barrier(self.ranks)  # rank 0 encodes and caches the data; the others then read it
        build = build_pair_rows if cfg.preference else build_rows
        self.rows, self.stats = build(cfg, self.tokenizer, self.template, **({"extra": extra} if extra else {}))
        if self.ranks.main:
            parallel.barrier(self.ranks)
        what = " with replay" if extra else " (identity pairs)" if pairs else ""
        self.say(f"data{what}: {self.stats.summary()}")
        if self.stats.bad_lines and not extra:
            self.say(f"warning: skipped {self.stats.bad_lines} bad line(s) (skip_bad_lines); "
                     "`tuneforge check-dataset CONFIG` lists them")

    def _work_dir(self) -> Checkpoint | None:
        """Make the work dir, keep a copy of the config in it, and read the checkpoint to resume."""
        cfg, resume = self.cfg, self.options.resume
        if self.ranks.main:
            try:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create work dir '{self.work_dir}': {err.strerror}; "
                                "pick another with --work-dir") from err
        parallel.barrier(self.ranks)
        ckpt = load_checkpoint(find_resume(self.work_dir, resume if isinstance(resume, str) else None)) \
            if resume else None
        kept = self.work_dir / Path(cfg.config_file).name if cfg.config_file else None
        if kept and not resume and self.ranks.main and not (kept.exists() and kept.samefile(cfg.config_file)):
            shutil.copyfile(cfg.config_file, kept)
        return ckpt

    def _pick_engine(self, ds_file: tuple[dict, str] | None) -> LocalEngine:
        """The one place that knows the engines apart."""
        cfg, ranks = self.cfg, self.ranks
        if ds_file is not None:
            engine: LocalEngine = DeepSpeedEngine(ranks, zero.fill_auto(*ds_file, cfg, ranks.world, self.dtype))
            checks.check_deepspeed(cfg, engine.partitioned)
        elif self.options.fsdp:
            engine = FSDPEngine(ranks, self.amp)
        elif ranks.world > 1:
            engine = DataParallelEngine(ranks)
        else:
            engine = LocalEngine(ranks)
        return engine

    def _model(self, given_rows: bool = False) -> tuple[Any, FastPath]:
        """The base model as the config wants it trained (4-bit for qlora), the rows refitted to
        what its code can do, replay answers generated by it, then adapters, the checkpoint's
        weights (while they are whole) and the fast path's patches."""
        cfg = self.cfg
        model = load_model(self.model_path, self.device, self.dtype, load_in_4bit=cfg.method == "qlora",
                           quant_type=cfg.bnb_4bit_quant_type, double_quant=cfg.bnb_4bit_use_double_quant,
                           trust_remote_code=cfg.trust_remote_code, attn_implementation="sdpa")
        if cfg.pack_to_max_length and not given_rows and probe.runs_own_code(model) \
                and not probe.isolates_packed_samples(model):
            if cfg.preference:  # a pair's two answers share a row: they must not see each other
                raise UserError("preference training packs a pair's two answers into one row, and this model's "
                                "own code lets packed samples attend to each other; train it without "
                                "trust_remote_code (tuneforge loads InternLM2 natively) or with objective='sft'")
            self.say("the model's own code lets packed samples attend to each other: one sample per row")
            self.cfg = cfg = cfg.model_copy(update={"pack_to_max_length": False})
            self._build_rows()
        if cfg.replay_general and not given_rows and not cfg.preference:  # replay records are not pairs
            self._mix_replay(model)
        if cfg.identity_pairs and not given_rows:  # made with the base model, before the adapters
            self._make_pairs(model)
        if not given_rows:  # a full fine-tune's reference, before the checkpoint's weights go in
            self.objective.prepare(model, self.rows, ReferenceRun(
                self.work_dir, self.device, self.amp, self.tokenizer.pad_token_id, self.ranks, self.say,
                self.options.progress, reference_key(self.model_path, self.dtype, self.rows)))
        checks.warn_few_steps(len(self.rows), cfg, self.ranks.world, self.say)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.initial_adapter = None
        if cfg.method != "full":
            model = apply_lora(model, cfg, self.model_path)
            # PiSSA, OLoRA and LoftQ start away from zero: converting subtracts the start
            self.initial_adapter = initial_adapter(model, cfg) if self.ckpt is None or \
                self.ckpt.initial_adapter is None else self.ckpt.initial_adapter
        if self.ckpt is not None:
            self.ckpt.check_fits(set(trainable_parameters(model)), cfg.method)
            model.load_state_dict(self.ckpt.state_dict, strict=False)
        part = self.engine.shares(cfg)
        target = Target(self.device, self.amp, weight_share=part.weights, partitioned=self.engine.partitioned,
                        first_step_bytes=first_step_bytes(list(trainable_parameters(model).values()), cfg, part),
                        compile=self.options.compile)
        patched = fast.apply(model, cfg, target, self.say)
        if patched.memory:
            self.say(patched.memory.describe() + ("" if patched.memory.need_gib <= patched.memory.budget_gib
                                                  else "; that is over budget: lower max_length or use qlora"))
        if patched.fused:
            self.say(patched.describe())
        return model, patched

    def _mix_replay(self, model: Any) -> None:
        """The base model's answers to the general prompts mixed into the rows: as many prompts
        as the run can train on, answered once (by rank 0; by the unquantized base where the
        model is 4-bit on a CPU) and cached for later runs."""
        cfg, ranks = self.cfg, self.ranks
        cache = replay_path(self.model_path, self.template, cfg.SYSTEM, cfg.replay_max_new_tokens)
        consumed = cfg.max_steps * cfg.batch_size * cfg.accumulative_counts * ranks.world if cfg.max_steps else None
        share = min(1.0, consumed / max(1, len(self.rows))) if consumed else 1.0
        # Only a run that sees a small part of its data answers fewer prompts, and it repeats them
        # so that replay keeps its share of the data (fewer replay samples would let the identity
        # take over more answers: the demo's 60 of ~66 rows with 91% of the prompts hijacked 15%
        # of general questions instead of <= 10%).
        prompts = prompts_for(share if share <= 0.25 else 1.0)
        repeat = max(1, round(cfg.replay_repeat * len(replay_prompts()) / len(prompts)))
        out = self.work_dir / "replay.jsonl"
        if not ranks.main:
            parallel.barrier(ranks)
        else:
            self._answer_replay(model, cache, prompts)
            training_file(cache, prompts, out)
            parallel.barrier(ranks)
        self._build_rows(extra=[DataSource(path=str(out), repeat=repeat)])

    def _answer_replay(self, model: Any, cache: Path, prompts: list[str]) -> None:
        of_all = f"{len(prompts)} of the {len(replay_prompts())}" if len(prompts) < len(replay_prompts()) \
            else f"all {len(prompts)}"
        todo = missing(cache, prompts)
        if not todo:
            self.say(f"replay: base-model answers to {of_all} general prompts from {cache}")
            return
        self._answer_base(model, cache, todo, "replay",
                          f"{of_all} general prompts (what {self.steps_wanted()} can train on)")

    def _answer_base(self, model: Any, cache: Path, todo: list[str], tag: str, what: str) -> None:
        """The base model's answers to TODO into CACHE (by rank 0; by the unquantized base where
        the model is 4-bit on a CPU)."""
        cfg, t0 = self.cfg, time.time()
        with unquantized_on_cpu(model, self.model_path, cfg.trust_remote_code) as answerer:
            how = " (unquantized: 4-bit is slow on a CPU)" if answerer is not model else ""
            self.say(f"{tag}: {what}; the base model{how} answers the {len(todo)} not cached yet, up to "
                     f"{cfg.replay_max_new_tokens} tokens each")
            answer_prompts(answerer, self.tokenizer, self.template, cache, todo, cfg.SYSTEM,
                           cfg.replay_max_new_tokens, say=self.say, progress=self.options.progress)
            del answerer  # the unquantized copy goes before training starts
        self.say(f"{tag}: done in {time.time() - t0:.0f}s -> {cache}")

    def _make_pairs(self, model: Any) -> None:
        """identity_pairs: the data's conversations as pairs (work_dir/pairs.jsonl), each last
        answer over the base model's own answer to its question, and each general prompt's base
        answer over an identity answer; the rows are then these pairs."""
        cfg, out = self.cfg, self.work_dir / "pairs.jsonl"
        if self.ranks.main:
            samples = config_samples(cfg)
            cache = replay_path(self.model_path, self.template, cfg.SYSTEM, cfg.replay_max_new_tokens)
            todo = missing(cache, last_questions(samples) + replay_prompts())
            if todo:
                self._answer_base(model, cache, todo, "identity pairs",
                                  "the data's questions and the general prompts")
            answers = {p: r["answer"] for p, r in read_answers(cache).items()}
            self.say(f"identity pairs: {pairs_file(out, samples, answers, cfg.seed)} pairs from "
                     f"{len(samples)} conversations and {len(replay_prompts())} general prompts -> {out}")
        parallel.barrier(self.ranks)
        self._build_rows(pairs=out)

    def steps_wanted(self) -> str:
        return f"{self.cfg.max_steps} steps" if self.cfg.max_steps else "the whole run"

    def _loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return self.objective.loss(model, batch, self.fast)

    def _describe_model(self) -> None:
        cfg, ranks = self.cfg, self.ranks
        n_train = sum(p.numel() for p in self.named.values())
        n_all = sum(p.numel() for p in self.model.parameters())
        several = ranks.world > 1 or type(self.engine) is not LocalEngine
        self.say(f"model: {self.model_path} on {self.device} ({self.dtype}{', bf16 autocast' if self.amp else ''}), "
                 f"{cfg.method}, {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M parameters trainable"
                 + (f"; {ranks.world} rank(s), {self.engine.name}" if several else ""))

    def _hooks(self) -> None:
        """The log (with the trackers as its sinks), evaluation (with the identity guard), the
        profiler and the progress display."""
        main = self.ranks.main
        self.log = TrackedLog(self.work_dir / "train_log.jsonl", self.report_to, self.say) if main else NoLog()
        if self.start:
            self.log.resume_at(self.start)  # the log goes on from the checkpoint's step, not past it
        self.evaluate = Evaluation(self.cfg, self.model, self.tokenizer, self.template, self.log,
                                   self.work_dir / "eval_outputs.txt", self.say,
                                   enabled=main and self.engine.evaluates)
        # after two steps of warm-up (compilation, allocator growth) where the run is long enough
        first = self.start + min(2, max(0, self.steps - self.start - 1))
        self.profiler = StepProfiler(self.work_dir / "profile", first, min(3, self.steps - first),
                                     self.ranks.rank) if self.options.profile else None
        # a live bar on a terminal; in a log file, a plain line every tenth of the run instead
        self.live = self.options.progress and sys.stderr.isatty() and main
        self.bad_in_a_row = self.skipped = 0

    # ------------------------------------------------------------------ the loop

    def train(self) -> Path | None:
        """Run from self.start to the last step; returns the last checkpoint written. The trackers
        are open while it runs and closed after it, also when it fails or is stopped."""
        self.log.open(self.cfg.model_dump(mode="json"), self.start)
        try:
            last = self._train()
        except BaseException as err:
            self.log.close(err)
            raise
        self.log.close()
        return last

    def _train(self) -> Path | None:
        cfg, ranks = self.cfg, self.ranks
        if self.start == 0:
            self.log.write({"event": "start", "steps": self.steps, "rows": len(self.rows),
                            "data": self.stats.__dict__ if self.stats else {}})
            self.evaluate(0)
        bar = tqdm(total=self.steps, initial=self.start, desc="train", unit="step", disable=not self.live,
                   dynamic_ncols=True)
        self.t_loop, last, stop = time.time(), None, StopRequest(self.say)
        try:
            for step in range(self.start, self.steps):
                if self.profiler:
                    self.profiler.before(step)
                t0 = time.time()
                loss, grad_norm, tokens = self.step(step)
                done = step + 1
                self._log_step(done, loss, grad_norm, tokens, t0, bar)
                with phase("reduce"):
                    stopping = parallel.anyone(stop.requested is not None, ranks)
                if done % cfg.save_steps == 0 or (done == self.steps and cfg.save_last) or stopping:
                    last = self.save_checkpoint(done)
                if stopping:
                    parallel.barrier(ranks)
                    raise TrainingStopped(f"stopped by {stop.requested or 'another rank'} at step {done}/"
                                          f"{self.steps}; checkpoint {last}. Continue with the same command "
                                          "plus --resume")
                if done % cfg.evaluation_freq == 0 and done != self.steps:
                    self.evaluate(done)
        finally:
            stop.restore()
            bar.close()
        return self._finish(last)

    def step(self, step: int) -> tuple[float, float, int]:
        """Optimizer step STEP (0-based): its micro-batches forward and backward through the
        engine, the gradients reduced and clipped, the update made (or, for a non-finite loss or
        gradient, skipped). Returns the loss, the gradient norm and the tokens run."""
        cfg, ranks = self.cfg, self.ranks
        with phase("data"):
            every_rank = micro_batches(self.rows, cfg.batch_size, cfg.accumulative_counts, cfg.seed, step, ranks.world)
            n_labels = sum(self.objective.units(b) for b in every_rank)  # the loss: a mean over all ranks' tokens/pairs
            batches = [collate(b, self.tokenizer.pad_token_id) for b in every_rank[ranks.rank::ranks.world]]
        loss = self.forward_backward(batches, n_labels)
        with phase("reduce"):
            grad_norm = self.engine.reduce_and_clip(cfg.max_norm)
            loss = parallel.total(loss, ranks)
            self.step_metrics = step_metrics(self.objective.metrics(), ranks)
        self._update(step + 1, loss, grad_norm)
        return loss, grad_norm, padded_tokens(every_rank)

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], n_labels: int) -> float:
        """Accumulate the gradient of one optimizer step's micro-batches on this rank; returns
        this rank's part of the step's mean loss per labelled token."""
        total = 0.0
        amp = self.amp
        for i, b in enumerate(batches):
            with phase("data"):
                b = model_inputs(b, self.fast.varlen, self.device)
            with phase("forward"), torch.autocast(self.device.type, dtype=amp or torch.float32,
                                                  enabled=amp is not None):
                loss = self.engine.loss(b, more=i < len(batches) - 1) / max(1, n_labels)
            with phase("backward"), compiled_backward():
                self.engine.backward(loss)
            total = total + loss.detach()  # no .item() here: a sync per micro-batch stalls the GPU queue
        with phase("reduce"):
            return float(total)

    def _update(self, done: int, loss: float, grad_norm: float) -> None:
        """Step, or skip a non-finite step: one bad batch (overflow, a corrupt sample) must not
        poison the weights; only a run of them stops training."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_in_a_row = 0
            with phase("optimizer"):
                self.engine.step()
            self.scheduler.step()
        else:
            self.skipped += 1
            self.bad_in_a_row += 1
            self.log.write({"step": done, "skipped_update": "non-finite loss or gradient"})
            self.say(f"warning: step {done}: non-finite loss or gradient; update skipped ({self.skipped} so far)")
            if self.bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                good = find_resume(self.work_dir, None) if list_checkpoints(self.work_dir) else None
                raise UserError(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient; stopped. "
                    f"Lower lr or check the data; last good checkpoint: {good or 'none yet'}")
        with phase("optimizer"):
            self.engine.zero_grad()

    def _log_step(self, done: int, loss: float, grad_norm: float, n_tokens: int, t0: float, bar: Any) -> None:
        tps = n_tokens / max(1e-9, time.time() - t0)
        lr = self.scheduler.get_last_lr()[0]
        cuda = self.device.type == "cuda"
        self.log.write({"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
                        "tokens": n_tokens, "tokens_per_s": round(tps, 1), **self.step_metrics,
                        **({"peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)}
                           if cuda else {})})
        busy = self.profiler.after(done - 1) if self.profiler else None
        if busy:
            self.log.write({"step": done, "profile": busy.__dict__})
            self.say(f"profile of steps {self.profiler.first + 1}-{done} (rank {self.ranks.rank}): "
                     f"{busy.describe()}; operator tables and traces in {self.work_dir / 'profile'}")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        bar.update(1)
        every = max(1, self.steps // 10)
        if self.options.progress and not self.live and (done % every == 0 or done == self.steps):
            eta = (time.time() - self.t_loop) / (done - self.start) * (self.steps - done)
            pref = "".join(f" {k} {self.step_metrics[k]:.3f}" for k in ("margin", "accuracy") if k in self.step_metrics)
            self.say(f"step {done}/{self.steps} loss {loss:.4f}{pref} lr {lr:.2e} {tps:.0f} tok/s eta {eta:.0f}s")

    def _finish(self, last: Path | None) -> Path | None:
        parallel.barrier(self.ranks)  # the final checkpoint is on disk before any rank returns
        if last is None and list_checkpoints(self.work_dir):  # resumed from the final step, or save_last=False
            last = find_resume(self.work_dir, None)
        self.evaluate(self.steps)
        if not self.ranks.main:
            return last
        plot = plot_loss(self.log.read(), self.work_dir / "loss.png")
        self.log.write({"event": "end", "seconds": round(time.time() - self.started, 1)})
        self.say(f"done in {time.time() - self.started:.0f}s; last checkpoint {last}"
                 + (f"; loss plot {plot}" if plot else ""))
        return last

    # ------------------------------------------------------------------ state

    def save_checkpoint(self, step: int) -> Path:
        """Write the run's state after STEP steps (rank 0; every rank gathers, where the engine
        shards it); returns the checkpoint's path."""
        state = self.engine.full_state(self.named, keep=self.ranks.main)
        path = self.work_dir / f"iter_{step}.pth"
        if state is None:
            return path
        cfg = self.cfg
        peft_config = None
        if cfg.method != "full":
            peft_config = self.model.peft_config["default"].to_dict()
            peft_config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
        ckpt = Checkpoint(step=step, state_dict=state[0], optimizer=state[1], scheduler=self.scheduler.state_dict(),
                          rng=rng_state(), config=cfg.model_dump(mode="json"), method=cfg.method,
                          template=self.template, peft_config=peft_config, world_size=self.ranks.world,
                          initial_adapter=self.initial_adapter)
        path = write_checkpoint(self.work_dir, ckpt, cfg.save_total_limit)
        self.say(f"saved {path}")
        return path

    def _stage_from(self, ckpt: Checkpoint) -> int:
        """The preference stage from the SFT stage's last checkpoint (its weights went in with the
        adapters); a fresh optimizer and schedule. Returns the step to go on from."""
        if ckpt.step != self.cfg.sft_steps:
            when = f"after its sft_steps ({self.cfg.sft_steps}) of SFT" if self.cfg.sft_steps else \
                "only after sft_steps of SFT, and this run has none"
            raise UserError(f"the checkpoint at step {ckpt.step} trained objective "
                            f"'{ckpt.config.get('objective', 'sft')}', and this run trains '{self.cfg.objective}'; "
                            f"a run changes objective {when}: resume from one of its own checkpoints")
        self.say(f"{self.cfg.objective} from step {ckpt.step} (the end of the SFT stage) to {self.steps}")
        return ckpt.step

    def resume(self, ckpt: Checkpoint) -> int:
        """Optimizer, schedule and random state from CKPT (its weights went in before wrapping,
        while whole); returns the step to go on from. Whatever engine wrote it, the checkpoint
        is in the one-process format."""
        self.engine.load_state(self.named, ckpt.state_dict, ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        set_rng_state(ckpt.rng)
        self.say(f"resumed from step {ckpt.step}")
        now = self.ranks.world * self.cfg.accumulative_counts
        if ckpt.micro_batches_per_step != now:
            self.say(f"warning: the checkpoint trained {ckpt.micro_batches_per_step} micro-batches per step "
                     f"(ranks x accumulative_counts), this run {now}; the data order and the loss scale "
                     "change from here on")
        return ckpt.step


def step_metrics(sums: dict[str, float], ranks: parallel.Ranks) -> dict[str, float]:
    """The objective's per-step sums, over all ranks, as the means the log shows."""
    if not sums:
        return {}
    t = {k: parallel.total(v, ranks) for k, v in sums.items()}
    n = max(1.0, t["pairs"])
    chosen, rejected = t["reward_chosen"] / n, t["reward_rejected"] / n
    return {"reward_chosen": round(chosen, 6), "reward_rejected": round(rejected, 6),
            "margin": round(chosen - rejected, 6), "accuracy": round(t["correct"] / n, 4)}


@contextlib.contextmanager
def compiled_backward() -> Iterator[None]:
    """The compiled layers' backward is compiled at the first backward pass: a failure there
    cannot fall back to eager, so it becomes one line saying how to train without compiling."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as err:
        raise UserError(f"compiling the decoder layers' backward failed ({str(err).splitlines()[0][:200]}); "
                        "train without compiling: tuneforge train --no-compile ...") from err


def train(cfg: Config, work_dir: Path, options: RunOptions | None = None) -> Path | None:
    """What ``tuneforge train`` runs: join the ranks, set up, train; returns the last checkpoint
    written (None with save_last=False and no save_steps reached)."""
    ranks = parallel.init()
    options = options or RunOptions()
    try:
        if not stages.sft_stage_done(cfg, Path(work_dir), options):  # sft_steps: the SFT stage first
            first = Recipe(stages.sft_stage(cfg), work_dir, options, ranks)
            first.setup()
            options = replace(options, resume=str(first.train()))
            del first  # its model and optimizer go before the preference stage loads its own
        recipe = Recipe(cfg, work_dir, options, ranks)
        recipe.setup()
        last = recipe.train()
    except BaseException:
        # With other ranks, leave the group as it is: tearing NCCL down while another rank waits in
        # a collective can hang; the launcher stops the others once this one exits.
        if ranks.world == 1:
            parallel.shutdown(ranks)
        raise
    parallel.shutdown(ranks)
    return last
