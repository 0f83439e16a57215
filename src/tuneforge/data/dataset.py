"""Config -> training rows: find files (or datasets), encode them (cached), pick samples, pack."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config.schema import Config, DataSource
from tuneforge.data.cache import (
    EncodeSettings,
    ReadLimit,
    TokenStore,
    encode_file,
    tokenizer_fingerprint,
)
from tuneforge.data.encode import Encoded
from tuneforge.data.formats import Source
from tuneforge.data.hub import open_dataset, open_local, saved_dataset
from tuneforge.data.pack import Row, assemble, assemble_pairs, fill_rate, pack_lengths
from tuneforge.data.templates import Template
from tuneforge.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class DatasetStats:
    files: list[str]
    samples: int
    truncated: int
    dropped: int
    bad_lines: int
    rows: int
    tokens: int
    trained_tokens: int
    fill_rate: float
    cached_files: int
    seconds: float
    unit: str = "samples"  # "pairs" for preference data
    datasets: int = 0  # of the files, how many are datasets read through `datasets`
    streamed: list[str] = field(default_factory=list)  # "57 records of org/name[train]", per streamed source

    def summary(self) -> str:
        extra = f", dropped {self.dropped}" if self.dropped else ""
        extra += f", skipped {self.bad_lines} bad line(s)" if self.bad_lines else ""
        extra += f", streamed {', '.join(self.streamed)}" if self.streamed else ""
        cached = f", {self.cached_files} of {len(self.files)} file(s) from cache" if self.cached_files else ""
        n_files = len(self.files) - self.datasets
        read = " and ".join(([f"{n_files} file(s)"] if n_files or not self.datasets else [])
                            + ([f"{self.datasets} dataset(s)"] if self.datasets else []))
        return (f"{self.samples} {self.unit} from {read} -> {self.rows} rows, "
                f"{self.tokens} tokens ({self.trained_tokens} trained), fill {self.fill_rate:.1%}, "
                f"truncated {self.truncated}{extra} [{self.seconds:.1f}s{cached}]")


@dataclass
class TrainRows:
    """Packed rows, assembled on demand from the token stores (nothing is copied up front)."""

    stores: list[TokenStore]
    store_of: np.ndarray  # per used sample: which store
    index_of: np.ndarray  # per used sample: index within that store
    groups: list[list[int]]  # per row: used-sample numbers
    lengths: np.ndarray  # per used sample: tokens

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> Row:
        return assemble([self.stores[self.store_of[k]].sample(int(self.index_of[k])) for k in self.groups[i]])

    def row_lengths(self) -> list[int]:
        return [int(self.lengths[g].sum()) for g in self.groups]


def _candidates(name: str, cfg: Config) -> list[Path]:
    """Where a data_files entry may be: as written, then beside the config file."""
    candidates = [Path(name).expanduser()]
    if cfg.config_file and not Path(name).is_absolute():
        candidates.append(Path(cfg.config_file).parent / name)
    return candidates


def _files_in(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"data folder '{path}' holds no .jsonl, .json or .parquet files")
    return files


def resolve_data_path(name: str, cfg: Config) -> list[Path]:
    """The files a data_files entry names: a file or a folder of .jsonl/.json files, as written
    or beside the config file; a clear error when neither exists."""
    candidates = _candidates(name, cfg)
    for path in candidates:
        if path.exists():
            return _files_in(path)
    raise UserError(
        f"data file '{name}' not found (looked in {', '.join(str(c) for c in candidates)}); "
        "set data_files (or alpaca_en_path) in the config to a local .jsonl/.json/.parquet file or folder, "
        "or a dataset name (org/name: docs/data.md)"
    )


def resolve_source(src: DataSource, cfg: Config) -> list[Source]:
    """What a data_files entry reads: its files where the path exists (a local path always wins
    over a name; a folder that datasets wrote, or one given a split or subset, is read as a
    dataset), else the dataset it names (Hub or ModelScope), else the error for a missing file."""
    candidates = _candidates(src.path, cfg)
    for path in candidates:
        if not path.exists():
            continue
        if saved_dataset(path) or (path.is_dir() and src.dataset_part):
            return [open_local(path, src)]
        if src.subset is not None or src.data_files is not None or src.split not in (None, "train"):
            raise UserError(f"{path}: split, subset and data_files choose a part of a dataset; this is a file, "
                            "read whole (remove them from its data_files entry)")
        return list(_files_in(path))
    found = open_dataset(src, candidates)
    return [found] if found is not None else list(resolve_data_path(src.path, cfg))


def read_limit(cfg: Config, src: DataSource) -> ReadLimit | None:
    """How far a streamed SRC is read: as many rows as the run trains (max_steps' micro-batches on
    every rank: torchrun's WORLD_SIZE; each rank reads the same beginning), or its max_samples.
    None for a source read whole."""
    if not src.streaming:
        return None
    rows = None
    if cfg.max_steps:
        rows = cfg.max_steps * cfg.batch_size * cfg.accumulative_counts * int(os.environ.get("WORLD_SIZE", "1"))
    packed = rows is not None and cfg.pack_to_max_length
    return ReadLimit(items=src.max_samples, usable=None if packed else rows,
                     tokens=rows * cfg.max_length if packed else None, drop_truncated=cfg.long_samples == "drop")


def encode_settings(cfg: Config, template: Template, source: DataSource | None = None) -> EncodeSettings:
    """How a file is encoded: SOURCE's own format where it has one (an XTuner ConcatDataset's
    datasets each have theirs), else the config's data_format."""
    fmt = source.format if source is not None and source.format else cfg.data_format
    return EncodeSettings(template, cfg.SYSTEM, cfg.max_length, fmt, cfg.skip_bad_lines, pairs=cfg.preference)


@dataclass
class _Gathered:
    """Every source's files encoded, and the (store, index) of each item in training order."""
    stores: list[TokenStore]
    files: list[Source]
    store_of: np.ndarray
    index_of: np.ndarray
    cached: int  # files read from the token cache
    bad: int  # bad lines skipped
    streamed: list[str]  # how much of each streamed source was read

    def stats(self, **numbers: Any) -> DatasetStats:
        datasets = sum(not isinstance(f, Path) for f in self.files)
        return DatasetStats(files=[str(f) for f in self.files], bad_lines=self.bad, cached_files=self.cached,
                            datasets=datasets, streamed=self.streamed, **numbers)


def _gather(cfg: Config, sources: list[DataSource], tokenizer: Any, template: Template, use_cache: bool,
            per_item: int, what: str) -> _Gathered:
    """Encode SOURCES and list their items (PER_ITEM stored samples each: 1 for SFT, 2 for a
    pair's two sides), each source cut to its max_samples and repeated. None usable: one line."""
    fp = tokenizer_fingerprint(tokenizer)
    stores: list[TokenStore] = []
    files: list[Source] = []
    store_of: list[np.ndarray] = []
    index_of: list[np.ndarray] = []
    cached = 0
    streamed: list[str] = []
    for src in sources:
        s_of, i_of = [], []
        for path in resolve_source(src, cfg):
            store, hit = encode_file(path, tokenizer, encode_settings(cfg, template, src), fp, use_cache,
                                     read_limit(cfg, src))
            cached += hit
            if src.streaming:
                streamed.append(f"{len(store) // per_item + len(store.bad)} records of {path}")
            s_of.append(np.full(len(store) // per_item, len(stores)))
            i_of.append(np.arange(len(store) // per_item))
            stores.append(store)
            files.append(path)
        s_arr, i_arr = np.concatenate(s_of), np.concatenate(i_of)
        if src.max_samples:
            s_arr, i_arr = s_arr[: src.max_samples], i_arr[: src.max_samples]
        store_of.append(np.tile(s_arr, src.repeat))
        index_of.append(np.tile(i_arr, src.repeat))
    s_all, i_all = np.concatenate(store_of), np.concatenate(index_of)
    bad = sum(len(s.bad) for s in stores)
    if len(s_all) == 0:
        first = next((b for s in stores for b in s.bad), "")
        raise UserError(f"no usable {what} in the data files"
                        + (f" ({bad} bad lines, all skipped; the first: {first})" if bad else ""))
    return _Gathered(stores, files, s_all, i_all, cached, bad, streamed)


def build_rows(cfg: Config, tokenizer: Any, template: Template, use_cache: bool = True,
               extra: list[DataSource] | None = None) -> tuple[TrainRows, DatasetStats]:
    """Rows for the config's data, plus EXTRA sources (replay data) when given."""
    started = time.time()
    g = _gather(cfg, cfg.data_sources + (extra or []), tokenizer, template, use_cache, 1, "sample")
    stores, s_all, i_all = g.stores, g.store_of, g.index_of

    lengths = np.empty(len(s_all), dtype=np.int64)
    trained = np.empty(len(s_all), dtype=np.int64)
    truncated = np.empty(len(s_all), dtype=bool)
    for k, store in enumerate(stores):
        mask = s_all == k
        lengths[mask] = store.lengths()[i_all[mask]]
        trained[mask] = store.trained[i_all[mask]]
        truncated[mask] = store.truncated[i_all[mask]]
    keep = trained > 0
    if cfg.long_samples == "drop":
        keep &= ~truncated
    if not keep.any():
        raise UserError("no sample has any answer token left to train on (raise max_length?)")
    s_used, i_used, len_used = s_all[keep], i_all[keep], lengths[keep]
    groups = (pack_lengths(len_used.tolist(), cfg.max_length) if cfg.pack_to_max_length
              else [[k] for k in range(len(len_used))])
    rows = TrainRows(stores, s_used, i_used, groups, len_used)
    stats = g.stats(
        samples=len(s_all), truncated=int(truncated.sum()), dropped=int((~keep).sum()), rows=len(groups),
        tokens=int(len_used.sum()), trained_tokens=int(trained[keep].sum()),
        fill_rate=fill_rate(rows.row_lengths(), cfg.max_length) if cfg.pack_to_max_length else 1.0,
        seconds=time.time() - started,
    )
    return rows, stats


@dataclass
class PairRows(TrainRows):
    """Rows of preference pairs: here a 'sample' is a pair, whose chosen and rejected answers are
    samples 2i and 2i + 1 of its store, and always share one row. A row's pairs carry their
    numbers here (in the used pairs' order), by which a precomputed reference is looked up."""

    def __getitem__(self, i: int) -> Row:
        return assemble_pairs([side for k in self.groups[i] for side in self.sides(k)], self.groups[i])

    def sides(self, k: int) -> tuple[Encoded, Encoded]:
        """Used pair K's chosen and rejected sides."""
        store, j = self.stores[self.store_of[k]], 2 * int(self.index_of[k])
        return store.sample(j), store.sample(j + 1)

    def pairs(self) -> int:
        return len(self.store_of)


def build_pair_rows(cfg: Config, tokenizer: Any, template: Template,
                    use_cache: bool = True) -> tuple[PairRows, DatasetStats]:
    """Rows of the config's preference pairs, both answers of a pair in one row."""
    started = time.time()
    g = _gather(cfg, cfg.data_sources, tokenizer, template, use_cache, 2, "preference pair")
    stores, s_all, i_all = g.stores, g.store_of, g.index_of
    lengths = np.empty(len(s_all), dtype=np.int64)
    trained = np.empty((len(s_all), 2), dtype=np.int64)
    truncated = np.empty(len(s_all), dtype=bool)
    for k, store in enumerate(stores):
        mask = s_all == k
        both = 2 * i_all[mask]
        lengths[mask] = store.lengths()[both] + store.lengths()[both + 1]
        trained[mask] = np.stack([store.trained[both], store.trained[both + 1]], axis=1)
        truncated[mask] = store.truncated[both] | store.truncated[both + 1]
    keep = (trained > 0).all(axis=1)  # a pair with an answer cut away entirely compares nothing
    if cfg.long_samples == "drop":
        keep &= ~truncated
    if not keep.any():
        raise UserError("no pair has answer tokens left on both sides (raise max_length?)")
    s_used, i_used, len_used = s_all[keep], i_all[keep], lengths[keep]
    groups = (pack_lengths(len_used.tolist(), cfg.max_length) if cfg.pack_to_max_length
              else [[k] for k in range(len(len_used))])
    rows = PairRows(stores, s_used, i_used, groups, len_used)
    stats = g.stats(
        samples=len(s_all), truncated=int(truncated.sum()), dropped=int((~keep).sum()), rows=len(groups),
        tokens=int(len_used.sum()), trained_tokens=int(trained[keep].sum()),
        fill_rate=fill_rate(rows.row_lengths(), cfg.max_length) if cfg.pack_to_max_length else 1.0,
        seconds=time.time() - started, unit="pairs",
    )
    return rows, stats


def bad_lines(rows: TrainRows) -> list[str]:
    return [b for s in rows.stores for b in s.bad]
