"""Config -> training rows: find files, read records, render, encode, pack."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config.schema import Config, DataSource
from tuneforge.data.encode import Encoded, encode
from tuneforge.data.formats import Message, Sample, load_samples
from tuneforge.data.pack import Row, fill_rate, pack, single
from tuneforge.data.templates import Template, split_for_training
from tuneforge.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json")


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
    lengths: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        extra = f", dropped {self.dropped}" if self.dropped else ""
        extra += f", skipped {self.bad_lines} bad line(s)" if self.bad_lines else ""
        return (f"{self.samples} samples from {len(self.files)} file(s) -> {self.rows} rows, "
                f"{self.tokens} tokens ({self.trained_tokens} trained), "
                f"fill {self.fill_rate:.0%}, truncated {self.truncated}{extra}")

    def as_log(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lengths"}


def resolve_data_path(name: str, cfg: Config) -> list[Path]:
    """The files a data_files entry names: a file or a folder of .jsonl/.json files, as written
    or beside the config file; a clear error when neither exists."""
    candidates = [Path(name).expanduser()]
    if cfg._source and not Path(name).is_absolute():
        candidates.append(Path(cfg._source).parent / name)
    for path in candidates:
        if path.is_file():
            return [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not files:
                raise UserError(f"data folder '{path}' holds no .jsonl or .json files")
            return files
    raise UserError(
        f"data file '{name}' not found (looked in {', '.join(str(c) for c in candidates)}); "
        "set data_files (or alpaca_en_path) in the config to a local .jsonl/.json file or folder"
    )


def with_system(messages: tuple[Message, ...], system: str) -> list[Message]:
    if system and (not messages or messages[0].role != "system"):
        return [Message("system", system), *messages]
    return list(messages)


def read_source(src: DataSource, cfg: Config, bad: list[str] | None) -> tuple[list[Path], list[Sample]]:
    files = resolve_data_path(src.path, cfg)
    samples = [s for f in files for s in load_samples(f, cfg.data_format, bad)]
    if src.max_samples:
        samples = samples[: src.max_samples]
    return files, samples * src.repeat


def encode_samples(samples: list[Sample], template: Template, tokenizer: Any,
                   cfg: Config) -> list[Encoded]:
    out = []
    for s in samples:
        try:
            segments = split_for_training(template, tokenizer, with_system(s.messages, cfg.SYSTEM))
        except UserError as err:
            raise UserError(f"{s.where}: {err}") from err
        out.append(encode(segments, tokenizer, cfg.max_length))
    return out


def load_dataset_samples(cfg: Config) -> tuple[list[Path], list[Sample], list[str]]:
    """All samples the config names, and the bad lines skipped (only with skip_bad_lines)."""
    bad: list[str] | None = [] if cfg.skip_bad_lines else None
    files: list[Path] = []
    samples: list[Sample] = []
    for src in cfg.data_sources:
        f, s = read_source(src, cfg, bad)
        files += f
        samples += s
    if not samples:
        raise UserError("no usable sample in the data files" + (f" ({len(bad)} bad lines)" if bad else ""))
    return files, samples, bad or []


def build_rows(cfg: Config, tokenizer: Any, template: Template) -> tuple[list[Row], DatasetStats]:
    files, samples, bad = load_dataset_samples(cfg)
    encoded = encode_samples(samples, template, tokenizer, cfg)
    truncated = sum(e.truncated for e in encoded)
    if cfg.long_samples == "drop":
        encoded = [e for e in encoded if not e.truncated]
    encoded = [e for e in encoded if e.n_trained > 0]
    if not encoded:
        raise UserError("no sample has any answer token left to train on (raise max_length?)")
    rows = pack(encoded, cfg.max_length) if cfg.pack_to_max_length else [single(e) for e in encoded]
    stats = DatasetStats(
        files=[str(f) for f in files], samples=len(samples), truncated=truncated,
        dropped=len(samples) - len(encoded), bad_lines=len(bad), rows=len(rows),
        tokens=sum(len(r) for r in rows), trained_tokens=sum(e.n_trained for e in encoded),
        fill_rate=fill_rate(rows, cfg.max_length) if cfg.pack_to_max_length else 1.0,
        lengths=[len(e.input_ids) for e in encoded],
    )
    return rows, stats
