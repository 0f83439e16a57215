"""Config -> training rows: find files, read records, render, encode, pack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config.schema import Config
from tuneforge.data.encode import Encoded, encode
from tuneforge.data.formats import Message, Sample, load_samples
from tuneforge.data.pack import Row, fill_rate, pack, single
from tuneforge.data.templates import Template, split_for_training
from tuneforge.errors import UserError


@dataclass
class DatasetStats:
    files: list[str]
    samples: int
    truncated: int
    rows: int
    tokens: int
    trained_tokens: int
    fill_rate: float

    def summary(self) -> str:
        return (f"{self.samples} samples from {len(self.files)} file(s) -> {self.rows} rows, "
                f"{self.tokens} tokens ({self.trained_tokens} trained), "
                f"fill {self.fill_rate:.0%}, truncated {self.truncated}")


def resolve_data_file(name: str, cfg: Config) -> Path:
    """A data path as written, else beside the config file; a clear error when neither exists."""
    candidates = [Path(name).expanduser()]
    if cfg._source and not Path(name).is_absolute():
        candidates.append(Path(cfg._source).parent / name)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"data file '{name}' not found (looked in {', '.join(str(c) for c in candidates)}); "
        "set data_files (or alpaca_en_path) in the config to a local .jsonl/.json file"
    )


def with_system(messages: tuple[Message, ...], system: str) -> list[Message]:
    if system and (not messages or messages[0].role != "system"):
        return [Message("system", system), *messages]
    return list(messages)


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


def build_rows(cfg: Config, tokenizer: Any, template: Template) -> tuple[list[Row], DatasetStats]:
    files = [resolve_data_file(f, cfg) for f in cfg.data_file_list]
    samples = [s for f in files for s in load_samples(f, cfg.data_format)]
    encoded = encode_samples(samples, template, tokenizer, cfg)
    encoded = [e for e in encoded if e.n_trained > 0]
    if not encoded:
        raise UserError("no sample has any answer token left to train on (check max_length)")
    rows = pack(encoded, cfg.max_length) if cfg.pack_to_max_length else [single(e) for e in encoded]
    stats = DatasetStats(
        files=[str(f) for f in files], samples=len(samples),
        truncated=sum(e.truncated for e in encoded), rows=len(rows),
        tokens=sum(len(r) for r in rows),
        trained_tokens=sum(e.n_trained for e in encoded),
        fill_rate=fill_rate(rows, cfg.max_length) if cfg.pack_to_max_length else 1.0,
    )
    return rows, stats
