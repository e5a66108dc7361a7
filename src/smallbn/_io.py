"""Atomic file writes: a reader, a crash or a SIGKILL never sees a partial file (results,
checkpoints, recordings, figures); an exclusive lock for read-modify-write updates; and a
claim on a piece of work that concurrent processes must not do twice.
Part of the core: imports only the standard library."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks, see exclusive_lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write", "claim", "exclusive_lock"]


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


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path``, created if missing,
    for the duration of the block: processes updating the same file in turn never lose each
    other's changes.  The lock is released when the block ends or the process dies.

    Where ``fcntl`` does not exist (Windows) no lock is taken: concurrent updates are then
    the caller's responsibility, as they were before locking.
    """
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:  # a lock file, never written: its existence is harmless
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Claim the piece of work that the lock file ``path`` stands for; yields whether this
    process holds it.

    With ``wait=False`` it yields ``False`` at once when another process holds the claim, so
    the caller can do other work first; with ``wait=True`` it blocks until the claim is free.
    The claim is an exclusive ``fcntl.flock``: the operating system releases it when its
    holder dies, even by SIGKILL, so a waiting process takes over the work of a killed one.

    The lock file is removed on release (while still held), so finished work leaves no
    files behind.  A process that was waiting on the removed file finds, once it gets the
    lock, that the path no longer names the file it locked, and claims the path afresh:
    two processes never hold the same claim.

    Where ``fcntl`` does not exist (Windows) every claim succeeds at once: concurrent
    invocations are then not coordinated, as they were not before claims existed.
    """
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+b")  # closed on every path below
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            break
        except BaseException:
            handle.close()
            raise
        try:
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            try:
                yield True
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
                handle.close()
            return
        handle.close()  # its holder removed the file as it released it: claim the path anew
    yield False
