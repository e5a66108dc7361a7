"""Atomic file writes: a reader, a crash or a SIGKILL never sees a partial file (results,
checkpoints, recordings, figures).  Part of the core: imports only the standard library."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write through ``write`` into a temporary sibling of ``path``, then rename it in place.

    The temporary file is opened with mode ``"xb"`` (not :func:`tempfile.mkstemp`, which
    creates files readable by the owner only) so the result has the usual umask permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
