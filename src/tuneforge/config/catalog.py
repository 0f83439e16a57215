"""The presets that `list-cfg` shows and `copy-cfg` copies: the .py files in ``presets/``."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from tuneforge.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets(pattern: str | None = None) -> list[str]:
    names = sorted(p.stem for p in PRESET_DIR.glob("*.py") if not p.stem.startswith("_"))
    if pattern:
        names = [n for n in names if pattern.lower() in n.lower()]
    return names


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name.removesuffix('.py')}.py"
    if not path.is_file():
        close = difflib.get_close_matches(name, list_presets(), n=1, cutoff=0.3)
        hint = f"; did you mean '{close[0]}'?" if close else "; `tuneforge list-cfg` lists them"
        raise UserError(f"no preset named '{name}'{hint}")
    return path


def copy_preset(name: str, dest_dir: str | Path) -> Path:
    """Copy preset NAME to DEST_DIR/NAME_copy.py, as `xtuner copy-cfg` does."""
    src = preset_path(name)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{src.stem}_copy.py"
    shutil.copyfile(src, dest)
    return dest
