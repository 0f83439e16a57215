"""Multi-process settings. For now: resolving ``--deepspeed`` to a preset or a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "config" / "deepspeed"


def deepspeed_presets() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))


def resolve_deepspeed(name_or_path: str) -> dict[str, Any]:
    """Read a shipped preset (``deepspeed_zero2``) or a user's DeepSpeed JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = DEEPSPEED_DIR / f"{name_or_path.removesuffix('.json')}.json"
    if not path.is_file():
        raise UserError(
            f"--deepspeed '{name_or_path}': not a file and not a preset; presets: "
            + ", ".join(deepspeed_presets())
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid DeepSpeed JSON: {err.msg}") from err
