"""Atomic file writes: a reader (or a restart after a crash) sees the old file or the whole new one, never half."""

from __future__ import annotations

import os
import pathlib
import time
from typing import Callable, IO

# Fault injection for the crash tests only: hold every write between fsync and rename for this long, so a test
# can kill the process while a checkpoint is half-way. Never set in production.
_TEST_HOLD_S = float(os.environ.get("ASYNDGAN_TEST_HOLD_WRITES_S", "0"))


def atomic_write(path: pathlib.Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, fsync it, rename it over `path`, and
    fsync the folder so that the rename itself survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if _TEST_HOLD_S:
        time.sleep(_TEST_HOLD_S)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
