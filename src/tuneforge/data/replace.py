"""Replace a string in every string value of a jsonl file (the tutorial's name-change script)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError


def replace_in(value: Any, old: str, new: str) -> tuple[Any, int]:
    """VALUE with OLD replaced by NEW in every string, nested ones too; and the count."""
    if isinstance(value, str):
        return value.replace(old, new), value.count(old)
    if isinstance(value, list):
        done = [replace_in(v, old, new) for v in value]
        return [v for v, _ in done], sum(n for _, n in done)
    if isinstance(value, dict):
        done = {k: replace_in(v, old, new) for k, v in value.items()}
        return {k: v for k, (v, _) in done.items()}, sum(n for _, n in done.values())
    return value, 0


def replace_file(src: str | Path, dst: str | Path, old: str, new: str) -> tuple[int, int]:
    """Rewrite SRC into DST; returns (lines, replacements). DST appears only when all is done."""
    if not old:
        raise UserError("--old must not be empty")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"input file '{src}' not found")
    lines, count = 0, 0
    out: list[str] = []
    with src.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{src}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
            record, n = replace_in(record, old, new)
            out.append(json.dumps(record, ensure_ascii=False))
            lines += 1
            count += n
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("\n".join(out) + ("\n" if out else ""), encoding="utf-8")
    tmp.replace(dst)
    return lines, count
