"""``tuneforge data self-cognition --pairs``: the identity job as preference pairs, made with the
base model's own answers (what the identity must replace, and what it must leave alone).

The base model answers the identity questions and the shipped general prompts once; the answers
go into the same cache as the replay answers (keyed by model, template, system prompt and answer
length), so a later SFT run with replay, or a second call, answers nothing again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.data.formats import Message, Sample, load_samples
from tuneforge.data.replay import answer_prompts, missing, read_answers, replay_path, replay_prompts
from tuneforge.data.selfcog import identity_questions, preference_records
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError
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


def _message_dict(m: Message) -> dict:
    return {"role": m.role, "content": m.content}


def sample_pairs(samples: list[Sample], base_answers: dict[str, str], general: list[str],
                 repeat: int = 1, seed: int = 0) -> list[dict]:
    """The identity job as pairs, from the SFT identity data itself (TRL's conversational
    ``prompt``/``chosen``/``rejected`` records): each sample's last answer over the base model's
    own answer to its last question, and, REPEAT times over, each general prompt's base answer
    over one of the data's answers in the prompt's language (the hijack). BASE_ANSWERS: question
    -> the base model's answer, to the question alone (no history); a sample whose question has
    no base answer, or the same one, gives no pair."""
    rng = random.Random(seed)
    out: list[dict] = []
    identity: dict[bool, list[str]] = {True: [], False: []}
    for s in samples:
        *context, answer = s.messages
        question = next((m.content for m in reversed(context) if m.role == "user"), None)
        if answer.role != "assistant" or question is None:
            continue
        identity[question.isascii()].append(answer.content)
        own = base_answers.get(question, "").strip()
        if own and own != answer.content.strip():
            out.append({"prompt": [_message_dict(m) for m in context],
                        "chosen": [_message_dict(answer)], "rejected": [{"role": "assistant", "content": own}]})
    for _ in range(repeat):
        for p in general:
            own = base_answers.get(p, "").strip()
            pool = identity[p.isascii()] or identity[not p.isascii()]
            if own and pool:
                out.append({"prompt": [{"role": "user", "content": p}],
                            "chosen": [{"role": "assistant", "content": own}],
                            "rejected": [{"role": "assistant", "content": rng.choice(pool)}]})
    rng.shuffle(out)
    return out


def last_questions(samples: list[Sample]) -> list[str]:
    """The distinct last questions of SAMPLES, in order: what the base model answers for them."""
    seen: dict[str, None] = {}
    for s in samples:
        q = next((m.content for m in reversed(s.messages) if m.role == "user"), None)
        if q is not None:
            seen.setdefault(q)
    return list(seen)


def config_samples(cfg: Config) -> list[Sample]:
    """The conversations of CFG's data_files, every entry once (what the pairs are made from)."""
    from tuneforge.data.dataset import resolve_source

    out: list[Sample] = []
    for src in cfg.data_sources:
        for path in resolve_source(src, cfg):
            out.extend(load_samples(path, src.format or cfg.data_format)[: src.max_samples])
    return out


def pairs_file(out: Path, samples: list[Sample], base_answers: dict[str, str], seed: int) -> int:
    """Write ``sample_pairs`` of SAMPLES to OUT (jsonl, atomically); returns how many pairs. The
    general prompts go in once: twice (replay's share in SFT) weakened the Chinese identity from
    100% to 73% of held-out questions (docs/preference.md#the-identity-job)."""
    pairs = sample_pairs(samples, base_answers, replay_prompts(), repeat=1, seed=seed)
    if not pairs:
        raise UserError("identity_pairs: no pair could be made (no sample's last answer differs from the "
                        "base model's own answer); check data_files")
    with atomic_write(out) as f:
        for r in pairs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(pairs)
