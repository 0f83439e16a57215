"""`check-dataset` and `log-dataset`: see what training will see, before spending GPU time on it."""

from __future__ import annotations

import statistics
from typing import Any

from tuneforge.config.schema import Config
from tuneforge.data.dataset import build_rows, encode_samples, load_dataset_samples, with_system
from tuneforge.data.encode import IGNORE, Encoded
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


def marked_render(template: Template, tokenizer: Any, cfg: Config, sample: Any) -> str:
    """The rendered sample with the trained parts between ⟦ and ⟧."""
    segments = split_for_training(template, tokenizer, with_system(sample.messages, cfg.SYSTEM))
    return "".join(f"⟦{t}⟧" if trained else t for t, trained in segments)


def check_dataset(cfg: Config, tokenizer: Any, template: Template) -> tuple[str, int]:
    """A report on every data line; returns (report, number of bad lines)."""
    lenient = cfg.model_copy(update={"skip_bad_lines": True})
    files, samples, bad = load_dataset_samples(lenient)
    lines = [f"files: {len(files)}  ({', '.join(str(f) for f in files[:5])}{' …' if len(files) > 5 else ''})"]
    if bad:
        lines.append(f"bad lines: {len(bad)}" + ("" if cfg.skip_bad_lines else
                                                 " (training stops on these; fix them or use --skip-bad-lines)"))
        lines += [f"  {b}" for b in bad[:20]] + ([f"  … {len(bad) - 20} more"] if len(bad) > 20 else [])
    rows, stats = build_rows(lenient, tokenizer, template)
    lengths = sorted(stats.lengths)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    lines += [
        f"samples: {stats.samples} usable, template {template.name}, max_length {cfg.max_length}",
        f"tokens per sample: min {lengths[0]}, median {statistics.median(lengths):.0f}, "
        f"p95 {p95}, max {lengths[-1]}",
        f"truncated: {stats.truncated}" + (" (dropped: long_samples='drop')" if cfg.long_samples == "drop" else ""),
        f"rows: {stats.rows} ({'packed' if cfg.pack_to_max_length else 'one sample each'}), "
        f"fill {stats.fill_rate:.1%}, {stats.tokens} tokens, {stats.trained_tokens} trained",
        "",
        "first sample, trained parts between ⟦ ⟧:",
        marked_render(template, tokenizer, cfg, samples[0]),
    ]
    return "\n".join(lines), len(bad)


def log_dataset(cfg: Config, tokenizer: Any, template: Template, show: str, num: int) -> str:
    if show not in SHOW:
        raise UserError(f"--show {show}: expected one of {', '.join(SHOW)}")
    _, samples, _ = load_dataset_samples(cfg)
    encoded = encode_samples(samples[:num], template, tokenizer, cfg)
    blocks = []
    for s, e in zip(samples[:num], encoded, strict=True):
        if show == "text":
            body = tokenizer.decode(e.input_ids)
        elif show == "masked_text":
            body = masked_text(tokenizer, e)
        elif show == "input_ids":
            body = str(e.input_ids)
        else:
            body = str(e.labels)
        blocks.append(f"----- {s.where} ({len(e.input_ids)} tokens, {e.n_trained} trained)\n{body}")
    return "\n".join(blocks)
