"""`check-dataset` and `log-dataset`: see what training will see, before spending GPU time on it."""

from __future__ import annotations

from typing import Any

import numpy as np

from tuneforge.config.schema import Config
from tuneforge.data.cache import with_system
from tuneforge.data.dataset import bad_lines, build_rows, resolve_data_path
from tuneforge.data.encode import IGNORE, Encoded
from tuneforge.data.formats import Sample, iter_records, to_messages
from tuneforge.data.templates import Template, split_for_training
from tuneforge.errors import UserError

SHOW = ("text", "masked_text", "input_ids", "labels")


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


def first_good_sample(cfg: Config) -> Sample | None:
    for path in resolve_data_path(cfg.data_sources[0].path, cfg):
        for where, rec in iter_records(path):
            try:
                return Sample(tuple(to_messages(rec, cfg.data_format, where)), where)
            except UserError:
                continue
    return None


def marked_render(template: Template, tokenizer: Any, cfg: Config, sample: Sample) -> str:
    """The rendered sample with the trained parts between ⟦ and ⟧."""
    segments = split_for_training(template, tokenizer, with_system(sample.messages, cfg.SYSTEM))
    return "".join(f"⟦{t}⟧" if trained else t for t, trained in segments)


def check_dataset(cfg: Config, tokenizer: Any, template: Template) -> tuple[str, int]:
    """A report on every data line; returns (report, number of bad lines)."""
    lenient = cfg.model_copy(update={"skip_bad_lines": True})
    rows, stats = build_rows(lenient, tokenizer, template)
    bad = bad_lines(rows)
    files = stats.files
    lines = [f"files: {len(files)}  ({', '.join(files[:5])}{' …' if len(files) > 5 else ''})"]
    if bad:
        lines.append(f"bad lines: {len(bad)}" + ("" if cfg.skip_bad_lines else
                                                 " (training stops on these; fix them or use --skip-bad-lines)"))
        lines += [f"  {b}" for b in bad[:20]] + ([f"  … {len(bad) - 20} more"] if len(bad) > 20 else [])
    lengths = rows.lengths
    lines += [
        f"samples: {stats.samples} usable, template {template.name}, max_length {cfg.max_length}",
        f"tokens per sample: min {lengths.min()}, median {np.median(lengths):.0f}, "
        f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}",
        f"truncated: {stats.truncated}" + (" (dropped: long_samples='drop')" if cfg.long_samples == "drop" else ""),
        f"rows: {stats.rows} ({'packed' if cfg.pack_to_max_length else 'one sample each'}), "
        f"fill {stats.fill_rate:.1%}, {stats.tokens} tokens, {stats.trained_tokens} trained",
    ]
    sample = first_good_sample(cfg)
    if sample is not None:
        lines += ["", f"first sample ({sample.where}), trained parts between ⟦ ⟧:",
                  marked_render(template, tokenizer, cfg, sample)]
    return "\n".join(lines), len(bad)


def _show(tokenizer: Any, e: Encoded, show: str) -> str:
    if show == "text":
        return tokenizer.decode(e.input_ids)
    if show == "masked_text":
        return masked_text(tokenizer, e)
    return str(e.input_ids if show == "input_ids" else e.labels)


def log_dataset(cfg: Config, tokenizer: Any, template: Template, show: str, num: int) -> str:
    if show not in SHOW:
        raise UserError(f"--show {show}: expected one of {', '.join(SHOW)}")
    rows, _ = build_rows(cfg.model_copy(update={"pack_to_max_length": False}), tokenizer, template)
    blocks = []
    for k in range(min(num, len(rows.lengths))):
        e = rows.stores[rows.store_of[k]].sample(int(rows.index_of[k]))
        blocks.append(f"----- sample {k} ({len(e.input_ids)} tokens, {e.n_trained} trained)\n"
                      + _show(tokenizer, e, show))
    return "\n".join(blocks)
