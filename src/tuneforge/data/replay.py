"""Replay data: the base model's own answers to general requests, mixed into identity training.

Training on identity data alone moves every answer towards the identity sentence. Training at
the same time on what the base model already says to ordinary requests holds those answers in
place, at no cost in new data: the targets come from the model itself (self-distillation). The
answers are generated once per base model, template and prompt set, then cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tuneforge.data.general_prompts import GENERAL_EN, GENERAL_ZH
from tuneforge.data.templates import Template
from tuneforge.files import atomic_write
from tuneforge.models.generate import Sampling, generate_batch
from tuneforge.models.resolve import cache_dir


def replay_prompts() -> list[str]:
    """The shipped general prompts the base model answers."""
    return GENERAL_EN + GENERAL_ZH


def model_fingerprint(model_dir: Path) -> str:
    """Identifies a model folder by its config and its weight files' names and sizes."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def replay_path(model_dir: Path, template: Template, system: str, max_new_tokens: int) -> Path:
    prompts = replay_prompts()
    key = hashlib.sha256(json.dumps(
        [model_fingerprint(model_dir), template.chat_template, system, max_new_tokens, prompts],
        ensure_ascii=False).encode()).hexdigest()[:24]
    return cache_dir() / "replay" / f"{key}.jsonl"


class _Progress:
    """Answers so far, with an ETA: a live tqdm bar on a terminal, a plain line per batch in a
    log file (where a bar's carriage returns would pile up on one line). SAY, if given, hears
    once after the first batch how long all of it will take, roughly."""

    def __init__(self, total: int, batches: int, say: Callable[[str], None] | None, show: bool) -> None:
        self.total, self.batches, self.say = total, batches, say
        self.live = show and sys.stderr.isatty()
        self.lines = show and not self.live
        self.bar = tqdm(total=total, desc="replay", unit="prompt", dynamic_ncols=True,
                        disable=not self.live)
        self.t0 = time.time()

    def __call__(self, done: int, size: int) -> None:
        elapsed = time.time() - self.t0
        if done == size and self.say and self.batches > 1:  # the first batch (longest prompts)
            self.say(f"replay: the first batch of {size} took {_clock(elapsed)}; all {self.total} "
                     f"prompts will take about {_clock(elapsed * self.total / size)}")
        self.bar.update(size)
        if self.lines:
            print(tqdm.format_meter(done, self.total, elapsed, prefix="replay", unit="prompt",
                                    bar_format="{desc}: {n_fmt}/{total_fmt} prompts "
                                               "[{elapsed} elapsed, ~{remaining} left]"),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def build_replay(model: Any, tokenizer: Any, template: Template, out: Path, system: str = "",
                 max_new_tokens: int = 64, batch_size: int = 64,
                 say: Callable[[str], None] | None = None, progress: bool = True) -> Path:
    """Answer the shipped general prompts with MODEL and write them as conversation jsonl.

    Answers cut off at ``max_new_tokens`` are kept, marked ``output_truncated`` so that only
    their text is learned, not an end-of-turn after it: the opening of an answer is what identity
    training would otherwise overwrite. Empty answers are left out. PROGRESS shows the answers
    so far with an ETA on stderr; SAY hears the estimated total time once the first batch is done.
    Batches of 64: the 314 prompts took 91s on 2 CPU cores with the bundled model against 117s in
    batches of 32 (and 93s in batches of 160).
    """
    prompts = replay_prompts()
    chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    bar = _Progress(len(chats), math.ceil(len(chats) / batch_size), say, progress)
    try:
        answers, finished = generate_batch(model, tokenizer, template, chats,
                                           Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size,
                                           with_finished=True, on_batch=bar)
    finally:
        bar.close()
    with atomic_write(out) as f:
        for p, a, done in zip(prompts, answers, finished, strict=True):
            if a.strip():
                turn = {"input": p, "output": a, **({} if done else {"output_truncated": True})}
                f.write(json.dumps({"conversation": [turn]}, ensure_ascii=False) + "\n")
    return out
