"""Encode a data file once, keep the tokens on disk, and load them back in a blink.

A file's samples are stored flat (int32 token and label arrays plus offsets, memory-mapped on
load), keyed by the file's content and everything that changes the tokens: tokenizer, template,
system prompt, max_length, format. Large files are encoded in parallel worker processes. A
dataset read through ``datasets`` is keyed by its name, split and the Arrow files ``datasets``
keeps it in; a streamed one is encoded as far as the run reads it (``ReadLimit``) and not kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.encode import Encoded, encode
from tuneforge.data.formats import Message, Sample, Source, iter_samples
from tuneforge.data.pairs import Pair, iter_pairs
from tuneforge.data.templates import Template, split_for_training
from tuneforge.errors import UserError
from tuneforge.files import atomic_directory
from tuneforge.models.resolve import cache_dir

FORMAT_VERSION = 4  # 4: KTO/multimodal refusals, content parts, ms-swift, tool use, XTuner map fns
PARALLEL_MIN_SAMPLES = 20_000
_CHUNK = 5_000


@dataclass
class EncodeSettings:
    template: Template
    system: str
    max_length: int
    data_format: str
    skip_bad_lines: bool
    pairs: bool = False  # preference pairs: samples 2i and 2i+1 are pair i's chosen and rejected


@dataclass
class TokenStore:
    """The encoded samples of one file: sample i is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    truncated: np.ndarray
    trained: np.ndarray  # labelled tokens per sample
    bad: list[str]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> Encoded:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Encoded(self.input_ids[a:b].tolist(), self.labels[a:b].tolist(), bool(self.truncated[i]))


def with_system(messages: tuple[Message, ...], system: str) -> list[Message]:
    if system and (not messages or messages[0].role != "system"):
        return [Message("system", system), *messages]
    return list(messages)


def encode_sample(s: Sample, tokenizer: Any, settings: EncodeSettings) -> Encoded:
    try:
        segments = split_for_training(settings.template, tokenizer, with_system(s.messages, settings.system))
    except UserError as err:
        raise UserError(f"{s.where}: {err}") from err
    return encode(segments, tokenizer, settings.max_length)


def _cut(e: Encoded, n: int) -> Encoded:
    return e if len(e.input_ids) <= n else Encoded(e.input_ids[:n], e.labels[:n], True)


def encode_pair(p: Pair, tokenizer: Any, settings: EncodeSettings) -> tuple[Encoded, Encoded]:
    """Chosen and rejected, each encoded like a sample; both go into one packed row, so together
    they fit max_length: the longer is cut first, to no less than half of it."""
    sides = [encode_sample(Sample(side, p.where), tokenizer, settings) for side in (p.chosen, p.rejected)]
    limit = settings.max_length
    short, long = sorted(range(2), key=lambda i: len(sides[i].input_ids))
    if len(sides[0].input_ids) + len(sides[1].input_ids) > limit:
        room = max(limit - len(sides[short].input_ids), limit - limit // 2)
        sides[long] = _cut(sides[long], room)
        sides[short] = _cut(sides[short], limit - len(sides[long].input_ids))
    return sides[0], sides[1]


def _encode_chunk(args: tuple[list[Sample] | list[Pair], Any, EncodeSettings]) -> list[Encoded]:
    samples, tokenizer, settings = args
    if settings.pairs:
        return [e for p in samples for e in encode_pair(p, tokenizer, settings)]
    return [encode_sample(s, tokenizer, settings) for s in samples]


@dataclass(frozen=True)
class ReadLimit:
    """How far to read a streamed source: the first ITEMS samples (or pairs) at most, and no more
    once its usable ones (with an answer token left, and not truncated where those are dropped)
    number USABLE or hold TOKENS tokens: packed rows hold at most max_length tokens each, so
    rows * max_length tokens pack into at least the rows the run trains."""

    items: int | None = None
    usable: int | None = None
    tokens: int | None = None
    drop_truncated: bool = False

    def reached(self, items: int, usable: int, tokens: int) -> bool:
        return ((self.items is not None and items >= self.items) or (self.usable is not None and usable >= self.usable)
                or (self.tokens is not None and tokens >= self.tokens))


def _until(encoded: Iterator[Encoded], limit: ReadLimit, per_item: int) -> Iterator[Encoded]:
    """ENCODED up to LIMIT, counted per item (PER_ITEM encoded samples: a pair's two sides); the
    source behind it is read no further than that."""
    items = usable = tokens = 0
    group: list[Encoded] = []
    for e in encoded:
        group.append(e)
        if len(group) < per_item:
            continue
        yield from group
        items += 1
        if all(g.n_trained > 0 and not (limit.drop_truncated and g.truncated) for g in group):
            usable += 1
            tokens += sum(len(g.input_ids) for g in group)
        group = []
        if limit.reached(items, usable, tokens):
            return


def _one_by_one(samples: Iterator[Sample] | Iterator[Pair], tokenizer: Any,
                settings: EncodeSettings) -> Iterator[Encoded]:
    """Encode lazily, one sample (or pair) at a time: a stream is read only as far as it is used."""
    for s in samples:
        yield from _encode_chunk(([s], tokenizer, settings))


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded_stream(samples: Iterator[Sample], tokenizer: Any,
                    settings: EncodeSettings) -> Iterator[Encoded]:
    """Encode a stream of samples, in parallel worker processes once it proves large."""
    import multiprocessing as mp

    workers = min(os.cpu_count() or 1, 16)
    batches = _batches(samples, PARALLEL_MIN_SAMPLES)
    first = next(batches, [])
    yield from _encode_chunk((first, tokenizer, settings))
    if len(first) < PARALLEL_MIN_SAMPLES or workers < 2 or "fork" not in mp.get_all_start_methods():
        for batch in batches:
            yield from _encode_chunk((batch, tokenizer, settings))
        return
    # fork: workers inherit the tokenizer without pickling and need no re-import of __main__;
    # they only render and tokenize, so the parent's torch threads do not matter.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        for batch in batches:
            parts = [(batch[i:i + _CHUNK], tokenizer, settings) for i in range(0, len(batch), _CHUNK)]
            for part in pool.map(_encode_chunk, parts):
                yield from part


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    return h.hexdigest()[:16]


def cache_key(path: Source, tokenizer_fp: str, settings: EncodeSettings) -> str:
    """What the tokens of PATH depend on: its content (a file's bytes; a dataset's identity, which
    data/hub.py gives) and every setting that changes the encoding."""
    h = hashlib.sha256()
    if isinstance(path, Path):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(str(path.identity).encode())
    t = settings.template
    h.update(json.dumps([FORMAT_VERSION, tokenizer_fp, t.name, t.chat_template, settings.system,
                         settings.max_length, settings.data_format, settings.skip_bad_lines]
                        + (["pairs"] if settings.pairs else [])).encode())
    return h.hexdigest()[:32]


def data_cache_dir() -> Path:
    return cache_dir() / "data"


def _write(store_dir: Path, encoded: Iterator[Encoded], bad: list[str]) -> None:
    """Stream encoded samples into flat int32 files (4 bytes a token), then rename into place."""
    with atomic_directory(store_dir) as tmp:
        lengths: list[int] = []
        truncated: list[bool] = []
        trained: list[int] = []
        with (tmp / "input_ids.bin").open("wb") as fi, (tmp / "labels.bin").open("wb") as fl:
            for e in encoded:
                fi.write(np.asarray(e.input_ids, dtype=np.int32).tobytes())
                fl.write(np.asarray(e.labels, dtype=np.int32).tobytes())
                lengths.append(len(e.input_ids))
                truncated.append(e.truncated)
                trained.append(e.n_trained)
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
        np.save(tmp / "truncated.npy", np.array(truncated, dtype=bool))
        np.save(tmp / "trained.npy", np.array(trained, dtype=np.int64))
        (tmp / "bad.json").write_text(json.dumps(bad, ensure_ascii=False))


def _load(store_dir: Path) -> TokenStore:
    def flat(name: str) -> np.ndarray:
        path = store_dir / f"{name}.bin"
        if path.stat().st_size == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=np.int32)
        return np.memmap(path, dtype=np.int32, mode="r")

    return TokenStore(flat("input_ids"), flat("labels"), np.load(store_dir / "offsets.npy"),
                      np.load(store_dir / "truncated.npy"), np.load(store_dir / "trained.npy"),
                      json.loads((store_dir / "bad.json").read_text()))


def encode_file(path: Source, tokenizer: Any, settings: EncodeSettings, tokenizer_fp: str | None = None,
                use_cache: bool = True, limit: ReadLimit | None = None) -> tuple[TokenStore, bool]:
    """The file's (or dataset's) encoded samples, from the cache when it has them; returns
    (store, was_cached). With LIMIT, only as much as it allows is read, and nothing is cached."""
    cached = use_cache and limit is None and (isinstance(path, Path) or path.identity is not None)
    if cached:
        store_dir = data_cache_dir() / cache_key(path, tokenizer_fp or tokenizer_fingerprint(tokenizer), settings)
        if (store_dir / "bad.json").is_file():
            return _load(store_dir), True
    bad: list[str] = []
    read = iter_pairs if settings.pairs else iter_samples
    samples = read(path, settings.data_format, bad if settings.skip_bad_lines else None)
    if limit is not None:
        encoded = _until(_one_by_one(samples, tokenizer, settings), limit, 2 if settings.pairs else 1)
    else:
        encoded = _encoded_stream(samples, tokenizer, settings)
    if cached:
        _write(store_dir, encoded, bad)  # bad is filled while the stream is consumed
        return _load(store_dir), False
    scratch = Path(tempfile.mkdtemp(prefix="tuneforge-data-"))
    try:
        _write(scratch / "store", encoded, bad)
        return _load(scratch / "store"), False  # memory-mapped: the mapping outlives the files on POSIX
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
