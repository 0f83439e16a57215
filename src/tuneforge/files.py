"""Writing files and directories so that readers see them whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: Path, mode: str = "w", durable: bool = False) -> Iterator[IO[Any]]:
    """Yield a file open for writing beside PATH; on success it replaces PATH, on error it is
    removed and PATH is as it was. DURABLE: flushed to the disk before the rename, so that a
    power cut cannot leave PATH naming a file whose contents never reached the disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside DEST; on success it is renamed to DEST, on error removed.

    If DEST appeared meanwhile (another process made the same thing), theirs is kept; with
    REPLACE, DEST is replaced (a folder the caller means to overwrite).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
