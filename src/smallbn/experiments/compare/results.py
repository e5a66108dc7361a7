"""``results.jsonl``, the comparison job's (and ``smallbn rethink``'s) record of finished
runs: one JSON row per run, appended atomically under a lock, damaged lines moved verbatim
to ``results.jsonl.damaged`` with a warning naming them, never read as results nor lost."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smallbn._io import atomic_write, exclusive_lock

__all__ = ["ResultsWarning", "read_results"]


class ResultsWarning(UserWarning):
    """A line of ``results.jsonl`` cannot be used as a result and was set aside."""


#: What every row of ``results.jsonl`` needs, with its types: the run's identity (``key``,
#: which makes a finished run skipped) and what the tables read.  A line without them is no
#: result: skipping runs on it, or reporting it, would crash every later run.
_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "method": (str,),
    "composition": (str,),
    "norm_batch": (int,),
    "seed": (int,),
    "error_ema": (int, float),
    "error_precise": (int, float),
}


@dataclass(frozen=True)
class _Damaged:
    """A line of ``results.jsonl`` that is no result: its number (from 1), text and why."""

    number: int
    text: str
    problem: str


def _check_row(
    line: str, fields: dict[str, tuple[type, ...]] | None = None
) -> tuple[dict[str, Any] | None, str]:
    """``(row, "")`` for a usable line, else ``(None, what is wrong with it)``; ``fields``:
    the fields a row needs, with their types (default :data:`_ROW_FIELDS`; other jobs that
    share this machinery, such as ``smallbn rethink``, pass their own)."""
    fields = _ROW_FIELDS if fields is None else fields
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg} at column {error.colno})"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    missing = [field for field in fields if field not in row]
    if missing:
        return None, f"no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}"
    wrong = [
        f"{field}={row[field]!r}"
        for field, types in fields.items()
        if isinstance(row[field], bool) or not isinstance(row[field], types)
    ]
    if wrong:
        return None, f"field{'s' if len(wrong) > 1 else ''} of the wrong type: {', '.join(wrong)}"
    return row, ""


def _parse_results(
    path: Path, fields: dict[str, tuple[type, ...]] | None = None
) -> tuple[list[tuple[str, dict[str, Any]]], list[_Damaged]]:
    """The usable rows of ``path`` with their lines verbatim, and the damaged lines: not
    JSON, not an object, without the fields of :data:`_ROW_FIELDS`, or a second row of a
    run already recorded (it would count as one more seed in the tables).  Blank lines hold
    nothing and are neither."""
    if not path.exists():
        return [], []
    # surrogateescape: bytes that are not UTF-8 survive to results.jsonl.damaged unchanged
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    rows: list[tuple[str, dict[str, Any]]] = []
    damaged: list[_Damaged] = []
    first: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row, problem = _check_row(line, fields)
        if row is not None and row["key"] in first:
            problem = f"a second row for the run recorded at line {first[row['key']]}"
            row = None
        if row is None:
            damaged.append(_Damaged(number, line, problem))
            continue
        first[row["key"]] = number
        rows.append((line, row))
    return rows, damaged


def _aside(path: Path) -> Path:
    return path.with_name(path.name + ".damaged")


def read_results(
    path: Path, fields: dict[str, tuple[type, ...]] | None = None
) -> list[dict[str, Any]]:
    """The finished runs in ``results.jsonl``.

    A damaged line (see :func:`_parse_results`) is skipped with a :class:`ResultsWarning`
    naming the file and the line; the job moves it verbatim to ``results.jsonl.damaged`` at
    its next write (:func:`_set_aside_damaged`), so it is never lost and never read as a
    result.  ``fields``: what a row needs (default :data:`_ROW_FIELDS`).
    """
    rows, damaged = _parse_results(path, fields)
    for line in damaged:
        warnings.warn(
            f"{path}:{line.number}: {line.problem}; skipped (the comparison job moves it "
            f"verbatim to {_aside(path)})",
            ResultsWarning,
            stacklevel=2,
        )
    return [row for _, row in rows]


def _encode(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8", errors="surrogateescape")


def _rewrite(
    path: Path, extra: Sequence[str] = (), fields: dict[str, tuple[type, ...]] | None = None
) -> None:
    """Rewrite ``path`` (the caller holds its lock) with its usable lines verbatim and
    ``extra`` after them, first moving its damaged lines, verbatim, to the end of
    ``<name>.damaged`` with a warning naming each.  Both files are written atomically, the
    damaged lines first: a kill in between leaves them in both files (moved again, so
    twice in the .damaged file, by the next rewrite), never in neither."""
    rows, damaged = _parse_results(path, fields)
    if damaged:
        aside = _aside(path)
        previous = aside.read_bytes() if aside.exists() else b""
        moved = _encode(line.text for line in damaged)
        atomic_write(aside, lambda handle: handle.write(previous + moved))
    if damaged or extra:
        lines = [line for line, _ in rows] + list(extra)
        atomic_write(path, lambda handle: handle.write(_encode(lines)))
    for line in damaged:
        warnings.warn(
            f"{path}:{line.number}: {line.problem}; moved verbatim to {_aside(path)}",
            ResultsWarning,
            stacklevel=3,
        )


def _results_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    return exclusive_lock(path.with_name(path.name + ".lock"))


def _set_aside_damaged(path: Path, fields: dict[str, tuple[type, ...]] | None = None) -> None:
    """Move the damaged lines of ``path`` to ``<name>.damaged`` (with a warning each), so
    that what follows reads results only."""
    if path.exists():
        with _results_lock(path):
            _rewrite(path, fields=fields)


def _append_result(
    path: Path, row: dict[str, Any], fields: dict[str, tuple[type, ...]] | None = None
) -> None:
    """Append one line atomically: the file is rewritten to a temporary and renamed, so a
    kill at any moment leaves either the old or the new file, never half a line.  The
    read-modify-write holds an exclusive lock on ``<name>.lock`` beside it, so concurrent
    invocations writing the same results never drop each other's rows; damaged lines found
    on the way are moved to ``<name>.damaged``, never dropped."""
    with _results_lock(path):
        _rewrite(path, [json.dumps(row, sort_keys=True)], fields)


def _recorded(path: Path, key: str, fields: dict[str, tuple[type, ...]] | None = None) -> bool:
    """Whether ``path`` holds a row of the run ``key``."""
    return any(row["key"] == key for row in read_results(path, fields))
