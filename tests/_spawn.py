"""Run a test body in a world of gloo (or NCCL) processes on this machine (spawned, loopback only).

``run_world(body, world, tmp)`` spawns ``world`` processes; each joins a gloo group through a
file store, calls ``body(rank, world)`` (a module-level function, so that it pickles by name)
and saves what it returns; the caller gets the ranks' results in rank order.  A worker that
raises fails the caller with every worker's traceback (first failure first); a world that
hangs is killed after ``deadline_s``.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["run_world"]

Body = Callable[[int, int], Any]


def _worker(rank: int, world: int, store: str, out_dir: str, body: Body, backend: str) -> None:
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank: cuda:rank
        dist.init_process_group(
            backend,
            store=dist.FileStore(store, world),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        result = body(rank, world)
        dist.barrier()
        dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # Leave the traceback in a file before this process goes down (and, with it, its
        # connections, which makes the other ranks fail too): the parent reports every
        # rank's traceback, ordered by the time on the first line, root cause first.
        # (No destroy_process_group here: it would close the connections first.)
        Path(out_dir, f"rank{rank}.error").write_text(f"{time.time_ns()}\n{traceback.format_exc()}")
        raise


def _error_files(out_dir: Path) -> str:
    """The workers' tracebacks, first failure (usually the root cause) first."""
    errors = []
    for path in out_dir.glob("*.error"):
        stamp, _, trace = path.read_text().partition("\n")
        errors.append((int(stamp), path.stem, trace))
    return "".join(f"\n--- {rank} ---\n{trace}" for _, rank, trace in sorted(errors))


def run_world(
    body: Body, world: int, tmp: Path, deadline_s: float = 180.0, backend: str = "gloo"
) -> list[Any]:
    """``[body(0, world), …, body(world − 1, world)]``, each computed in its own process
    (``backend="nccl"``: rank r on ``cuda:r``)."""
    out_dir = tmp / "out"
    out_dir.mkdir()
    store = tmp / "filestore"
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited by the children
    try:
        context = mp.start_processes(
            _worker,
            args=(world, str(store), str(out_dir), body, backend),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in context.processes:
                        if p.is_alive():
                            p.kill()
                    pytest.fail(
                        f"{world}-process run did not finish within {deadline_s:.0f}s "
                        f"(a collective is probably waiting on a rank that skipped it)"
                        + _error_files(out_dir),
                        pytrace=False,
                    )
        except ProcessException as exc:  # join() raises it when a worker fails
            # Each failing worker left its traceback in a file; the one join() forwards may be
            # a secondary failure ("connection closed by peer") of a rank that outlived the
            # first.
            failure: str | None = _error_files(out_dir) or f"\n{exc}"
        else:
            failure = None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if failure is not None:  # failed outside the except block: no chained spawn internals
        pytest.fail(f"a worker of the {world}-process run failed:{failure}", pytrace=False)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
