"""What the loop writes besides checkpoints: the jsonl log (trackers/ adds the experiment
trackers to it), evaluation answers (with the identity guard's check), the loss plot."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.data.templates import Template
from tuneforge.evaluate.guard import GUARD_GENERAL, GUARD_IDENTITY, leaks, overlap
from tuneforge.fast.lora import dense_4bit_weights
from tuneforge.files import atomic_write
from tuneforge.models.generate import Sampling, generate_batch


class NoLog:
    """The log of a rank other than 0: rank 0 writes for all (and it alone reports to trackers)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def open(self, config: dict[str, Any], start: int) -> None:
        pass

    def close(self, error: BaseException | None = None) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []

    def resume_at(self, step: int) -> None:
        pass


class JsonlLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append RECORD with the time; returns it as written."""
        stamped = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(stamped, ensure_ascii=False) + "\n")
        return stamped

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def resume_at(self, step: int) -> None:
        """Drop the records of steps after STEP: a run resumed from STEP's checkpoint trains them
        again (a kill -9 or a failed save leaves the log ahead of the last checkpoint)."""
        if not self.path.is_file():
            return
        lines = [x for x in self.path.read_text(encoding="utf-8").splitlines() if x]
        kept = [x for x in lines if json.loads(x).get("step", 0) <= step]
        if len(kept) < len(lines):
            with atomic_write(self.path) as f:
                f.write("".join(x + "\n" for x in kept))


def evaluate(model: Any, tokenizer: Any, template: Template, questions: list[str], system: str,
             max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers to QUESTIONS, each asked on its own (generated as one batch)."""
    head = [{"role": "system", "content": system}] if system else []
    chats = [[*head, {"role": "user", "content": q}] for q in questions]
    replies = generate_batch(model, tokenizer, template, chats, Sampling(max_new_tokens=max_new_tokens))
    return [{"question": q, "answer": a} for q, a in zip(questions, replies, strict=True)]


def write_eval(path: Path, step: int, answers: list[dict[str, str]]) -> str:
    """Append the answers to a readable text file; returns the text block."""
    lines = [f"===== step {step} ====="]
    for a in answers:
        lines += [f"Q: {a['question']}", f"A: {a['answer']}", ""]
    block = "\n".join(lines)
    with path.open("a", encoding="utf-8") as f:
        f.write(block + "\n")
    return block


class Evaluation:
    """Called with a step number: answers the config's evaluation_inputs (printed and written to
    PATH) and, with identity_guard, the guard's general and identity questions, warning when the
    new identity leaks into general answers. Does nothing where not ENABLED (other ranks; sharded
    weights, where generating would need every rank)."""

    def __init__(self, cfg: Any, model: Any, tokenizer: Any, template: Template, log: Any, path: Path,
                 say: Callable[[str], None], enabled: bool = True) -> None:
        self.cfg, self.model, self.tokenizer, self.template = cfg, model, tokenizer, template
        self.log, self.path, self.say = log, path, say
        self.guard = GUARD_GENERAL + GUARD_IDENTITY if cfg.identity_guard else []
        self.enabled = enabled and bool(cfg.evaluation_inputs or self.guard)
        self.baseline: int | None = None  # general/identity word overlap before training

    def __call__(self, step: int) -> None:
        if not self.enabled:
            return
        asked = self.cfg.evaluation_inputs
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        with dense_4bit_weights() if on_cpu else contextlib.nullcontext():
            answers = evaluate(self.model, self.tokenizer, self.template, asked + self.guard,
                               self.cfg.SYSTEM, self.cfg.evaluation_max_new_tokens)
        if asked:
            self.say(write_eval(self.path, step, answers[:len(asked)]))
        self.log.write({"step": step, "eval": answers})
        if not self.guard:
            return
        general = [a["answer"] for a in answers[len(asked):][:len(GUARD_GENERAL)]]
        identity = [a["answer"] for a in answers[-len(GUARD_IDENTITY):]]
        if self.baseline is None:
            self.baseline = overlap(general, identity)
        leaked = leaks(general, identity, self.baseline)
        if leaked:
            self.say(f"warning: step {step}: the identity leaks into answers to general questions "
                     f"({leaked[0][:60]!r}); mix in general data (replay_general=True) or train less")
            self.log.write({"step": step, "identity_leak": leaked})


def plot_loss(log: list[dict[str, Any]], out: Path) -> Path | None:
    steps = [r["step"] for r in log if "loss" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    if not steps:
        return None
    try:
        import matplotlib
    except ImportError:  # a GPU image without it: the jsonl log still has every loss
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preference = [r for r in log if "margin" in r]
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), squeeze=False)
    ax = axes[0][0]
    # raw per-step loss is noisy (a step is a few packed rows); the smoothed line shows the trend
    smooth, avg = [], losses[0]
    for x in losses:
        avg = 0.8 * avg + 0.2 * x
        smooth.append(avg)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="per step")
    ax.plot(steps, smooth, lw=1.8, label="smoothed (EMA 0.8)")
    ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("tuneforge training loss")
    ax.grid(alpha=0.3)
    if preference:  # the preference objectives: does the chosen answer win, and by how much
        right = axes[0][1]
        at = [r["step"] for r in preference]
        right.plot(at, [r["margin"] for r in preference], label="reward margin (chosen - rejected)")
        right.set_xlabel("optimizer step")
        right.set_ylabel("reward margin")
        right.grid(alpha=0.3)
        acc = right.twinx()
        acc.plot(at, [r["accuracy"] for r in preference], color="tab:green", lw=0.8, label="accuracy")
        acc.set_ylim(-0.05, 1.05)
        acc.set_ylabel("accuracy (chosen > rejected)")
        right.set_title("preference: margin and accuracy per step")
        right.legend(loc="upper left")
        acc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
