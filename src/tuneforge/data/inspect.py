"""`check-dataset` and `log-dataset`: see what training will see, before spending GPU time on it."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from typing import Any

import numpy as np

from tuneforge.config.schema import Config
from tuneforge.data.cache import encode_file, tokenizer_fingerprint, with_system
from tuneforge.data.dataset import (
    build_pair_rows,
    build_rows,
    encode_settings,
    read_limit,
    resolve_source,
)
from tuneforge.data.encode import IGNORE, Encoded
from tuneforge.data.formats import (
    Sample,
    Source,
    detect_format,
    file_kind,
    iter_records,
    to_messages,
)
from tuneforge.data.pairs import Pair, detect_pair_format, iter_pairs
from tuneforge.data.templates import Template, split_for_training
from tuneforge.errors import UserError

SHOW = ("text", "masked_text", "input_ids", "labels")
DETECT_RECORDS = 1000  # records per file whose format check-dataset reports
SHOW_BAD = 20  # bad lines check-dataset names


def masked_text(tokenizer: Any, enc: Encoded) -> str:
    """The trained tokens as text, each run of masked tokens as a short placeholder."""
    out: list[str] = []
    run: list[int] = []
    masked = 0
    for tok, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab == IGNORE:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            masked += 1
        else:
            if masked:
                out.append(f"[{masked} masked]")
                masked = 0
            run.append(tok)
    if run:
        out.append(tokenizer.decode(run))
    if masked:
        out.append(f"[{masked} masked]")
    return "".join(out)


def first_good_sample(cfg: Config) -> Sample | Pair | None:
    source = cfg.data_sources[0]
    fmt = source.format or cfg.data_format
    for path in resolve_source(source, cfg):
        if cfg.preference:
            pair = next(iter_pairs(path, fmt, bad=[]), None)
            if pair is not None:
                return pair
            continue
        for where, rec in iter_records(path):
            try:
                messages = to_messages(rec, fmt, where)
            except UserError:
                continue
            if messages:
                return Sample(tuple(messages), where)
    return None


def marked_render(template: Template, tokenizer: Any, cfg: Config, sample: Sample) -> str:
    """The rendered sample with the trained parts between ⟦ and ⟧."""
    segments = split_for_training(template, tokenizer, with_system(sample.messages, cfg.SYSTEM))
    return "".join(f"⟦{t}⟧" if trained else t for t, trained in segments)


def detected_format(path: Source, data_format: str, pairs: bool = False) -> str:
    """The record format(s) of PATH's first records, e.g. "alpaca" or "messages 9, unknown 1"."""
    if data_format != "auto":
        return f"{data_format} (data_format)"
    detect = detect_pair_format if pairs else detect_format
    found: Counter[str] = Counter()
    for where, rec in islice(iter_records(path, bad=[]), DETECT_RECORDS):
        try:
            found[detect(rec, where)] += 1
        except UserError:  # a record of no known shape; named among the bad lines
            found["unknown"] += 1
    if len(found) == 1:
        return next(iter(found))
    counted = ", ".join(f"{name} {n}" for name, n in found.most_common())
    return counted + (f" (in the first {DETECT_RECORDS} records)" if sum(found.values()) == DETECT_RECORDS else "")


def file_report(cfg: Config, tokenizer: Any, template: Template) -> tuple[list[str], list[str]]:
    """One line per data file (how it is read, the record format, samples, bad lines), and all the
    bad lines. Encodes each file into the cache, so the build that follows reads it back."""
    skipping = cfg.model_copy(update={"skip_bad_lines": True})
    fp = tokenizer_fingerprint(tokenizer)
    paths = {p: src for src in cfg.data_sources for p in resolve_source(src, cfg)}
    lines, bad = [f"files: {len(paths)}"], []
    for path, src in paths.items():
        settings = encode_settings(skipping, template, src)
        store, _ = encode_file(path, tokenizer, settings, fp, limit=read_limit(cfg, src))
        unit, n = ("pairs", len(store) // 2) if cfg.preference else ("samples", len(store))
        lines.append(f"  {path}: {file_kind(path)}, {detected_format(path, settings.data_format, cfg.preference)}; "
                     f"{unit} {n}, bad lines {len(store.bad)}")
        bad += store.bad
    return lines, bad


def check_dataset(cfg: Config, tokenizer: Any, template: Template) -> tuple[str, int]:
    """A report on every data line; returns (report, number of bad lines)."""
    lines, bad = file_report(cfg, tokenizer, template)
    if bad:
        lines.append(f"bad lines: {len(bad)}" + ("" if cfg.skip_bad_lines else
                                                 " (training stops on these; fix them or use --skip-bad-lines)"))
        lines += [f"  {b}" for b in bad[:SHOW_BAD]]
        lines += [f"  … {len(bad) - SHOW_BAD} more"] if len(bad) > SHOW_BAD else []
    unit = "pair" if cfg.preference else "sample"
    build = build_pair_rows if cfg.preference else build_rows
    try:
        rows, stats = build(cfg.model_copy(update={"skip_bad_lines": True}), tokenizer, template)
    except UserError as err:
        if not bad or cfg.skip_bad_lines:
            raise
        every_line_bad = str(err).startswith(f"no usable {unit}")
        lines.append(f"{unit}s: 0 usable (every line is bad)" if every_line_bad else f"nothing to train on: {err}")
        return "\n".join(lines), len(bad)
    lengths = rows.lengths
    lines += [
        f"{unit}s: {stats.samples} usable" + (f" (objective {cfg.objective}; {stats.dropped} dropped: an answer "
                                              "cut away entirely)" if cfg.preference and stats.dropped else
                                              f" (objective {cfg.objective})" if cfg.preference else "")
        + f", template {template.name}, max_length {cfg.max_length}",
        f"tokens per {unit}: min {lengths.min()}, median {np.median(lengths):.0f}, "
        f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}",
        f"truncated: {stats.truncated}" + (" (dropped: long_samples='drop')" if cfg.long_samples == "drop" else ""),
        f"rows: {stats.rows} ({'packed' if cfg.pack_to_max_length else f'one {unit} each'}), "
        f"fill {stats.fill_rate:.1%}, {stats.tokens} tokens, {stats.trained_tokens} trained",
    ]
    first = first_good_sample(cfg)
    if isinstance(first, Pair):
        for side, messages in (("chosen", first.chosen), ("rejected", first.rejected)):
            lines += ["", f"first pair ({first.where}), {side}, trained parts between ⟦ ⟧:",
                      marked_render(template, tokenizer, cfg, Sample(messages, first.where))]
    elif first is not None:
        lines += ["", f"first sample ({first.where}), trained parts between ⟦ ⟧:",
                  marked_render(template, tokenizer, cfg, first)]
    return "\n".join(lines), len(bad)


def _show(tokenizer: Any, e: Encoded, show: str) -> str:
    if show == "text":
        return tokenizer.decode(e.input_ids)
    if show == "masked_text":
        return masked_text(tokenizer, e)
    return str(e.input_ids if show == "input_ids" else e.labels)


def log_dataset(cfg: Config, tokenizer: Any, template: Template, show: str, num: int) -> str:
    """The first NUM samples as training sees them (for pairs: each pair's chosen and rejected side)."""
    if show not in SHOW:
        raise UserError(f"--show {show}: expected one of {', '.join(SHOW)}")
    unpacked = cfg.model_copy(update={"pack_to_max_length": False})
    if cfg.preference:
        return _log_pairs(*build_pair_rows(unpacked, tokenizer, template)[:1], tokenizer, show, num)
    rows, _ = build_rows(unpacked, tokenizer, template)
    blocks = []
    for k in range(min(num, len(rows.lengths))):
        e = rows.stores[rows.store_of[k]].sample(int(rows.index_of[k]))
        blocks.append(f"----- sample {k} ({len(e.input_ids)} tokens, {e.n_trained} trained)\n"
                      + _show(tokenizer, e, show))
    return "\n".join(blocks)


def _log_pairs(rows: Any, tokenizer: Any, show: str, num: int) -> str:
    blocks = []
    for k in range(min(num, rows.pairs())):
        for side, e in zip(("chosen", "rejected"), rows.sides(k), strict=True):
            blocks.append(f"----- pair {k}, {side} ({len(e.input_ids)} tokens, {e.n_trained} trained)\n"
                          + _show(tokenizer, e, show))
    return "\n".join(blocks)
