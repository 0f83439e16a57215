"""Config -> training rows: find files, encode them (cached), pick samples, pack."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.config.schema import Config, DataSource
from tuneforge.data.cache import EncodeSettings, TokenStore, encode_file, tokenizer_fingerprint
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

    def summary(self) -> str:
        extra = f", dropped {self.dropped}" if self.dropped else ""
        extra += f", skipped {self.bad_lines} bad line(s)" if self.bad_lines else ""
        cached = f", {self.cached_files} of {len(self.files)} file(s) from cache" if self.cached_files else ""
        return (f"{self.samples} {self.unit} from {len(self.files)} file(s) -> {self.rows} rows, "
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


def resolve_data_path(name: str, cfg: Config) -> list[Path]:
    """The files a data_files entry names: a file or a folder of .jsonl/.json files, as written
    or beside the config file; a clear error when neither exists."""
    candidates = [Path(name).expanduser()]
    if cfg.config_file and not Path(name).is_absolute():
        candidates.append(Path(cfg.config_file).parent / name)
    for path in candidates:
        if path.is_file():
            return [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not files:
                raise UserError(f"data folder '{path}' holds no .jsonl, .json or .parquet files")
            return files
    raise UserError(
        f"data file '{name}' not found (looked in {', '.join(str(c) for c in candidates)}); "
        "set data_files (or alpaca_en_path) in the config to a local .jsonl/.json/.parquet file or folder"
    )


def encode_settings(cfg: Config, template: Template, source: DataSource | None = None) -> EncodeSettings:
    """How a file is encoded: SOURCE's own format where it has one (an XTuner ConcatDataset's
    datasets each have theirs), else the config's data_format."""
    fmt = source.format if source is not None and source.format else cfg.data_format
    return EncodeSettings(template, cfg.SYSTEM, cfg.max_length, fmt, cfg.skip_bad_lines, pairs=cfg.preference)


@dataclass
class _Gathered:
    """Every source's files encoded, and the (store, index) of each item in training order."""
    stores: list[TokenStore]
    files: list[Path]
    store_of: np.ndarray
    index_of: np.ndarray
    cached: int  # files read from the token cache
    bad: int  # bad lines skipped


def _gather(cfg: Config, sources: list[DataSource], tokenizer: Any, template: Template, use_cache: bool,
            per_item: int, what: str) -> _Gathered:
    """Encode SOURCES and list their items (PER_ITEM stored samples each: 1 for SFT, 2 for a
    pair's two sides), each source cut to its max_samples and repeated. None usable: one line."""
    fp = tokenizer_fingerprint(tokenizer)
    stores: list[TokenStore] = []
    files: list[Path] = []
    store_of: list[np.ndarray] = []
    index_of: list[np.ndarray] = []
    cached = 0
    for src in sources:
        s_of, i_of = [], []
        for path in resolve_data_path(src.path, cfg):
            store, hit = encode_file(path, tokenizer, encode_settings(cfg, template, src), fp, use_cache)
            cached += hit
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
    return _Gathered(stores, files, s_all, i_all, cached, bad)


def build_rows(cfg: Config, tokenizer: Any, template: Template, use_cache: bool = True,
               extra: list[DataSource] | None = None) -> tuple[TrainRows, DatasetStats]:
    """Rows for the config's data, plus EXTRA sources (replay data) when given."""
    started = time.time()
    g = _gather(cfg, cfg.data_sources + (extra or []), tokenizer, template, use_cache, 1, "sample")
    stores, files, s_all, i_all, cached, bad = g.stores, g.files, g.store_of, g.index_of, g.cached, g.bad

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
    stats = DatasetStats(
        files=[str(f) for f in files], samples=len(s_all), truncated=int(truncated.sum()),
        dropped=int((~keep).sum()), bad_lines=bad, rows=len(groups), tokens=int(len_used.sum()),
        trained_tokens=int(trained[keep].sum()),
        fill_rate=fill_rate(rows.row_lengths(), cfg.max_length) if cfg.pack_to_max_length else 1.0,
        cached_files=cached, seconds=time.time() - started,
    )
    return rows, stats


@dataclass
class PairRows(TrainRows):
    """Rows of preference pairs: here a 'sample' is a pair, whose chosen and rejected answers are
    samples 2i and 2i + 1 of its store, and always share one row. A row's pairs carry their
    numbers here (in the used pairs' order), by which a precomputed reference is looked up."""

    def __getitem__(self, i: int) -> Row:
        sides = []
        for k in self.groups[i]:
            store, j = self.stores[self.store_of[k]], 2 * int(self.index_of[k])
            sides += [store.sample(j), store.sample(j + 1)]
        return assemble_pairs(sides, self.groups[i])

    def pairs(self) -> int:
        return len(self.store_of)


def build_pair_rows(cfg: Config, tokenizer: Any, template: Template,
                    use_cache: bool = True) -> tuple[PairRows, DatasetStats]:
    """Rows of the config's preference pairs, both answers of a pair in one row."""
    started = time.time()
    g = _gather(cfg, cfg.data_sources, tokenizer, template, use_cache, 2, "preference pair")
    stores, files, s_all, i_all, cached, bad = g.stores, g.files, g.store_of, g.index_of, g.cached, g.bad
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
    stats = DatasetStats(
        files=[str(f) for f in files], samples=len(s_all), truncated=int(truncated.sum()),
        dropped=int((~keep).sum()), bad_lines=bad, rows=len(groups), tokens=int(len_used.sum()),
        trained_tokens=int(trained[keep].sum()),
        fill_rate=fill_rate(rows.row_lengths(), cfg.max_length) if cfg.pack_to_max_length else 1.0,
        cached_files=cached, seconds=time.time() - started, unit="pairs",
    )
    return rows, stats


def bad_lines(rows: TrainRows) -> list[str]:
    return [b for s in rows.stores for b in s.bad]
