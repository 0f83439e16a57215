"""Replay data: the base model's own answers to general requests, mixed into identity training.

Training on identity data alone moves every answer towards the identity sentence. Training at
the same time on what the base model already says to ordinary requests holds those answers in
place, at no cost in new data: the targets come from the model itself (self-distillation). The
answers are generated once per base model, template and prompt set, then cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tuneforge.chat.engine import Sampling, generate_batch
from tuneforge.data.general_prompts import GENERAL_EN, GENERAL_ZH
from tuneforge.data.templates import Template
from tuneforge.models.resolve import cache_dir


def model_fingerprint(model_dir: Path) -> str:
    """Identifies a model folder by its config and its weight files' names and sizes."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def replay_path(model_dir: Path, template: Template, system: str, max_new_tokens: int) -> Path:
    prompts = GENERAL_EN + GENERAL_ZH
    key = hashlib.sha256(json.dumps(
        [model_fingerprint(model_dir), template.chat_template, system, max_new_tokens, prompts],
        ensure_ascii=False).encode()).hexdigest()[:24]
    return cache_dir() / "replay" / f"{key}.jsonl"


def build_replay(model: Any, tokenizer: Any, template: Template, out: Path, system: str = "",
                 max_new_tokens: int = 64, batch_size: int = 32) -> Path:
    """Answer the shipped general prompts with MODEL and write them as conversation jsonl.

    Answers cut off at ``max_new_tokens`` are kept, marked ``output_truncated`` so that only
    their text is learned, not an end-of-turn after it: the opening of an answer is what identity
    training would otherwise overwrite. Empty answers are left out.
    """
    prompts = GENERAL_EN + GENERAL_ZH
    chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    answers, finished = generate_batch(model, tokenizer, template, chats,
                                       Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size,
                                       with_finished=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for p, a, done in zip(prompts, answers, finished, strict=True):
            if a.strip():
                turn = {"input": p, "output": a, **({} if done else {"output_truncated": True})}
                f.write(json.dumps({"conversation": [turn]}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out
