"""Read a Python config file into a validated ``Config``.

The file is executed as plain Python (so ``SYSTEM = '...'`` and comprehensions work), then its
public top-level names are validated. Any mistake becomes one ``UserError`` line naming the file,
the setting and the fix.
"""

from __future__ import annotations

import ast
import difflib
import sys
import types
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuneforge.config.schema import ALIASES, FIELD_NAMES, Config
from tuneforge.config.xtuner import Report, is_xtuner_config, read_xtuner_config
from tuneforge.errors import UserError


def parse_cfg_options(options: list[str] | None) -> dict[str, Any]:
    """Turn ``["lr=1e-4", "SYSTEM=hi"]`` into ``{"lr": 1e-4, "SYSTEM": "hi"}``.

    Values are Python literals when they parse as one, plain strings otherwise.
    """
    out: dict[str, Any] = {}
    for opt in options or []:
        key, sep, raw = opt.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--cfg-options: '{opt}' is not key=value (e.g. --cfg-options lr=1e-4)")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


def _settings_of(path: Path) -> tuple[dict[str, Any], Report | None]:
    """The file's settings, and for an XTuner config the report of what was read from it."""
    source = path.read_text(encoding="utf-8")
    if is_xtuner_config(source):  # parsed, never run: xtuner and mmengine need not be installed
        return read_xtuner_config(path)
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "tuneforge_config"}
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as err:
        raise UserError(f"{path}:{err.lineno}: invalid Python in config: {err.msg}") from err
    try:
        exec(code, namespace)
    except ImportError as err:
        raise UserError(
            f"{path}: the config imports '{err.name}', which is not installed; tuneforge configs "
            "are plain settings and need no imports (start from `tuneforge copy-cfg`)"
        ) from err
    except Exception as err:  # the user's own code failed; name the line
        raise UserError(f"{path}: running the config failed: {type(err).__name__}: {err}") from err
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_")
        and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }, None


def _closest(key: str) -> str:
    pool = list(FIELD_NAMES) + list(ALIASES)
    match = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    if not match:
        match = difflib.get_close_matches(key.lower(), [p.lower() for p in pool], n=1, cutoff=0.4)
        match = [next(p for p in pool if p.lower() == match[0])] if match else []
    return f"; did you mean '{match[0]}'?" if match else ""


def _describe(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][0])
        return f"{where}: unknown setting '{key}'{_closest(key)}"
    if first["type"] == "missing":
        return f"{where}: required setting '{field}' is missing"
    if not first["loc"]:  # a check across settings: its message names them
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    got = first.get("input")
    return f"{where}: setting '{field}': {first['msg'].removeprefix('Value error, ')} (got {got!r})"


def build_config(settings: dict[str, Any], where: str = "config") -> Config:
    """Validate a settings dict (aliases allowed) into a ``Config``."""
    merged: dict[str, Any] = {}
    for key, value in settings.items():
        merged[ALIASES.get(key, key)] = value
    try:
        return Config(**merged)
    except ValidationError as err:
        raise UserError(_describe(err, where)) from err


def load_config(path: str | Path, cfg_options: dict[str, Any] | None = None) -> Config:
    """Load and validate a config file, with ``--cfg-options`` overrides applied last."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"config file '{path}' not found; `tuneforge list-cfg` shows the presets and "
            "`tuneforge copy-cfg NAME .` copies one"
        )
    settings, report = _settings_of(path)
    settings.update(cfg_options or {})
    if report is not None:  # what is in force: the config's values, or the options over them
        for line in report.overridden(cfg_options or {}, ALIASES).lines():
            print(f"[tuneforge] {line}", file=sys.stderr)
    return build_config({**settings, "config_file": str(path.resolve())}, where=str(path))
