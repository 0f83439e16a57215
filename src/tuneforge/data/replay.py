"""Replay data: the base model's own answers to general requests, mixed into identity training.

Training on identity data alone moves every answer towards the identity sentence. Training at
the same time on what the base model already says to ordinary requests holds those answers in
place, at no cost in new data: the targets come from the model itself (self-distillation). The
answers are generated once per base model, template, system prompt and prompt, then cached; a
short run answers only the prompts it can train on (``prompts_for``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
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


def prompts_for(fraction: float) -> list[str]:
    """The prompts a run that trains FRACTION of its data needs: the run sees about that part of
    the replay samples too, so answering more is work nobody trains on. Which ones: the first of
    one fixed shuffled order (so any share mixes English and Chinese requests of every kind, and
    a longer run's share contains a shorter one's), listed in the shipped order (so a whole-epoch
    run trains the same file as before shares existed)."""
    prompts = replay_prompts()
    k = max(1, min(len(prompts), math.ceil(fraction * len(prompts))))
    chosen = set(random.Random(0).sample(prompts, len(prompts))[:k])
    return [p for p in prompts if p in chosen]


def model_fingerprint(model_dir: Path) -> str:
    """Identifies a model folder by its config and its weight files' names and sizes."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def replay_path(model_dir: Path, template: Template, system: str, max_new_tokens: int) -> Path:
    """The answer cache of one base model, template, system prompt and answer length: one JSON
    line per prompt answered so far (runs that need more prompts add theirs)."""
    key = hashlib.sha256(json.dumps(
        [model_fingerprint(model_dir), template.chat_template, system, max_new_tokens],
        ensure_ascii=False).encode()).hexdigest()[:24]
    return cache_dir() / "replay" / f"{key}.answers.jsonl"


def read_answers(cache: Path) -> dict[str, dict[str, Any]]:
    """Prompt -> {"answer", "finished"} for every prompt CACHE holds."""
    if not cache.is_file():
        return {}
    records = (json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line)
    return {r["prompt"]: r for r in records}


def missing(cache: Path, prompts: list[str]) -> list[str]:
    have = read_answers(cache)
    return [p for p in prompts if p not in have]


def training_file(cache: Path, prompts: list[str], out: Path) -> Path:
    """PROMPTS' cached answers as conversation jsonl at OUT, the file the run trains on.

    Answers cut off at the length limit are kept, marked ``output_truncated`` so that only their
    text is learned, not an end-of-turn after it: the opening of an answer is what identity
    training would otherwise overwrite. Empty answers are left out."""
    answers = read_answers(cache)
    with atomic_write(out) as f:
        for p in prompts:
            r = answers[p]
            if r["answer"].strip():
                turn = {"input": p, "output": r["answer"], **({} if r["finished"] else {"output_truncated": True})}
                f.write(json.dumps({"conversation": [turn]}, ensure_ascii=False) + "\n")
    return out


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


def answer_prompts(model: Any, tokenizer: Any, template: Template, cache: Path, prompts: list[str],
                   system: str = "", max_new_tokens: int = 64, batch_size: int = 64,
                   say: Callable[[str], None] | None = None, progress: bool = True) -> None:
    """Answer PROMPTS with MODEL (greedy) and add the answers to CACHE, written whole.

    PROGRESS shows the answers so far with an ETA on stderr; SAY hears the estimated total time
    once the first batch is done. Batches of 64: the 314 prompts took 91s on 2 CPU cores with the
    bundled model against 117s in batches of 32 (and 93s in batches of 160).
    """
    chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    bar = _Progress(len(chats), math.ceil(len(chats) / batch_size), say, progress)
    try:
        answers, finished = generate_batch(model, tokenizer, template, chats,
                                           Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size,
                                           with_finished=True, on_batch=bar)
    finally:
        bar.close()
    known = read_answers(cache)
    known.update({p: {"prompt": p, "answer": a, "finished": done}
                  for p, a, done in zip(prompts, answers, finished, strict=True)})
    with atomic_write(cache) as f:
        for r in known.values():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
