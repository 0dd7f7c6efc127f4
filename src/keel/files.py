"""Writing a file so that a reader finds the old one or the whole new one, never a part of it: a
run killed mid-write, or another process reading a run directory while rank 0 writes, must not see
half a checkpoint, index or CSV. No keel imports: data, engine and deploy all use it."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write_fn: Callable[[str], None]) -> None:
    """Call ``write_fn(tmp_path)`` and move the result over ``path`` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are 0600, and os.replace would keep that mode, so other
    # users could not read a shared run's artifacts. O_EXCL + 0666 honours the umask instead.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_with(path: str | Path, write: Callable, binary: bool = False) -> None:
    """``write(file_handle)`` into ``path`` atomically (text: UTF-8, newline="" for csv)."""
    def to_tmp(tmp: str) -> None:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as fh:
            write(fh)
    atomic_write(path, to_tmp)
