"""``tuneforge data self-cognition --pairs``: the identity job as preference pairs, made with the
base model's own answers (what the identity must replace, and what it must leave alone).

The base model answers the identity questions and the shipped general prompts once; the answers
go into the same cache as the replay answers (keyed by model, template, system prompt and answer
length), so a later SFT run with replay, or a second call, answers nothing again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tuneforge.data.replay import answer_prompts, missing, read_answers, replay_path, replay_prompts
from tuneforge.data.selfcog import identity_questions, preference_records
from tuneforge.data.templates import get_template
from tuneforge.files import atomic_write


def write_identity_pairs(out: Path, model_dir: Path, name: str, name_en: str | None = None,
                         author: str | None = None, author_en: str | None = None, seed: int = 0,
                         system: str = "", max_new_tokens: int = 48, say: Callable[[str], None] = print,
                         progress: bool = True) -> int:
    """Write the pairs to OUT (TRL's prompt/chosen/rejected jsonl); returns how many."""
    from tuneforge.models.load import load_model, load_tokenizer, pick_device, pick_dtype

    tokenizer = load_tokenizer(model_dir)
    template = get_template("auto", tokenizer)
    cache = replay_path(model_dir, template, system, max_new_tokens)
    prompts = identity_questions() + replay_prompts()
    todo = missing(cache, prompts)
    if todo:
        device = pick_device()
        model = load_model(model_dir, device, pick_dtype("auto", device))
        say(f"the base model answers {len(todo)} prompts, up to {max_new_tokens} tokens each (cached in {cache})")
        answer_prompts(model, tokenizer, template, cache, todo, system, max_new_tokens, say=say, progress=progress)
    answers = {p: r["answer"] for p, r in read_answers(cache).items()}
    records = preference_records(name, answers, replay_prompts(), name_en, author, author_en, seed)
    with atomic_write(Path(out)) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)
