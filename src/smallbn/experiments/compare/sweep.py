"""The comparison job's sweep: which runs are left to train, in this process, in worker
processes (``jobs > 1``) or under ``torchrun``, each claimed so that concurrent invocations
sharing an output folder train it once (:func:`run_sweep`, :func:`_attempt`); the data each
run reads (:func:`bind_data`, :func:`check_data`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smallbn._io import atomic_write, claim
from smallbn._optional import tqdm
from smallbn.experiments import data as _data
from smallbn.experiments.compare.configs import RunConfig
from smallbn.experiments.compare.report import format_tables, plot_results
from smallbn.experiments.compare.results import (
    _append_result,
    _recorded,
    _set_aside_damaged,
    read_results,
)
from smallbn.experiments.compare.training import _checkpoint_path, _rank, run_one
from smallbn.experiments.data import Dataset, OptionError, load_dataset, resolve_dataset
from smallbn.experiments.sampling import samples_for_one_batch, shortfall

__all__ = ["bind_data", "check_data", "run_sweep", "setup_distributed"]


# -- claims: one run, one process ---------------------------------------------------------------

_HELD, _RUN, _DONE = 0, 1, 2
#: Seconds between attempts to claim a run held elsewhere, under torchrun (see _attempt).
_POLL_SECONDS = 1.0


def _agree(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every process under torchrun, so that all ranks take the same
    branch (they train each run together); ``value`` itself in a single process."""
    rank, world = _rank()
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def _attempt(
    config: RunConfig,
    output_dir: Path,
    train: Callable[[], dict[str, Any]],
    *,
    wait: bool,
    device: torch.device,
    fields: dict[str, tuple[type, ...]] | None = None,
) -> bool:
    """Claim ``config``'s run, train it with ``train`` unless ``results.jsonl`` already has
    its row, record the row, and drop its checkpoint; ``False`` if another process holds the
    claim (``wait=False``: the caller comes back to it once its other runs are done).

    The claim (``checkpoints/<tag>.lock``, :func:`smallbn._io.claim`) is held until the row
    is recorded, and the results are read again once it is held: so a run is trained by one
    process at a time and recorded once, however many invocations share the folder.  When
    the holder dies, even by SIGKILL, the OS releases the claim and a waiting process takes
    the run over from its checkpoint.  Under torchrun rank 0 claims and writes and every rank
    follows its decision; a wait is then a poll (every :data:`_POLL_SECONDS`), so that the
    other ranks wait in short broadcasts rather than one that would time out.

    ``config`` needs only ``key`` and ``tag``; ``fields`` is what a row of the results needs
    (default :data:`_ROW_FIELDS`), so other jobs (``smallbn rethink``) claim their runs here too.
    """
    rank, world = _rank()
    results = output_dir / "results.jsonl"
    checkpoint = _checkpoint_path(output_dir, config)
    lock = checkpoint.with_suffix(".lock")
    with contextlib.ExitStack() as held:
        while True:
            state = _HELD
            if rank == 0:
                attempt = contextlib.ExitStack()
                if attempt.enter_context(claim(lock, wait=wait and world == 1)):
                    held.enter_context(attempt)  # held until the row is recorded
                    state = _DONE if _recorded(results, config.key, fields) else _RUN
                else:
                    attempt.close()
            state = _agree(state, device)
            if state != _HELD or not wait:
                break
            time.sleep(_POLL_SECONDS)
        if state == _HELD:
            return False
        if state == _RUN:
            row = train()
            if rank == 0:
                _append_result(results, row, fields)
        if rank == 0:
            checkpoint.unlink(missing_ok=True)
    return True


def _notice_waiting(config: RunConfig) -> None:
    print(
        f"waiting for run {config.tag}: another process is training it (its row is taken "
        f"when it ends; if that process dies, this one resumes the run from its checkpoint)",
        file=sys.stderr,
        flush=True,
    )


@functools.lru_cache(maxsize=2)
def _worker_dataset(name: str, root: str | None) -> Dataset:
    """A process (the sweep's, or a worker) reads (and checks) the data once, not once per
    run."""
    return load_dataset(name, root)


def _trainer(
    config: RunConfig, output_dir: Path, device: torch.device, checkpoint_every: int, progress: bool
) -> Callable[[], dict[str, Any]]:
    """What trains ``config``'s run, for :func:`_attempt` to call once it holds the claim:
    :func:`~smallbn.experiments.compare.training.run_one` on the data this process read once,
    from the run's checkpoint in ``output_dir``."""

    def train() -> dict[str, Any]:
        return run_one(
            config,
            _worker_dataset(config.dataset, config.data_root),
            _checkpoint_path(output_dir, config),
            device=device,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )

    return train


def _worker_run(config: RunConfig, output_dir: Path, checkpoint_every: int, wait: bool) -> bool:
    """One run in a worker process of a parallel sweep (one thread each), claimed, trained
    and recorded by the worker itself (:func:`_attempt`): the claim is then held until the
    row is in the file, which it would not be if the worker returned the row for the main
    process to write.  ``False``: another process holds the run."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    train = _trainer(config, output_dir, cpu, checkpoint_every, progress=False)
    return _attempt(config, output_dir, train, wait=wait, device=cpu)


def _die_with_parent() -> None:
    """Pool initializer: a worker is killed when the sweep's process dies (Linux), so a
    killed sweep leaves no orphan training in the background to race its rerun."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_parallel(
    todo: Sequence[RunConfig],
    output_dir: Path,
    jobs: int,
    checkpoint_every: int,
    progress: bool,
    worker: Callable[[Any, Path, int, bool], bool] | None = None,
) -> None:
    """Run ``todo`` in ``jobs`` worker processes, each recording its result as it completes.

    A run that another process holds is submitted again, to wait for its claim, behind the
    runs submitted first.  When a run fails, the runs not yet started are cancelled, those in
    progress finish and are recorded (their work is not thrown away), and then the first
    failure is raised.  ``worker(config, output_dir, checkpoint_every, wait)`` (a module-level
    function, for the spawned processes; default :func:`_worker_run`) claims, trains and
    records one run and returns ``False`` when another process holds it (``smallbn rethink``
    passes its own).
    """
    work = _worker_run if worker is None else worker
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_die_with_parent)
    first_error: BaseException | None = None
    bar = tqdm(total=len(todo), desc="runs", disable=not progress)
    try:
        futures: dict[Future[bool], RunConfig] = {
            pool.submit(work, c, output_dir, checkpoint_every, False): c for c in todo
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                config = futures[future]
                error = future.exception()
                if error is None:
                    if future.result():
                        bar.update(1)
                    elif first_error is None:  # held elsewhere: wait for it after the others
                        _notice_waiting(config)
                        again = pool.submit(work, config, output_dir, checkpoint_every, True)
                        futures[again] = config
                        pending.add(again)
                    continue
                bar.update(1)
                if first_error is None:
                    first_error = error
                    error.add_note(
                        f"in run {config.tag}; runs in progress were finished and recorded, "
                        f"runs not started were cancelled: rerun the command to continue"
                    )
                    # Cancel here, not only through shutdown(cancel_futures=True): the pool
                    # cancels in its own thread later and never reports those futures as
                    # done, so waiting on them would hang.  Runs already handed to a worker
                    # cannot be cancelled; they stay pending and are recorded when they end.
                    pending = {f for f in pending if not f.cancel()}
                    pool.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()
        # on an interrupt, too: nothing new starts, and the pool's processes are reaped
        pool.shutdown(wait=True, cancel_futures=True)
    if first_error is not None:
        raise first_error


def _run_serial(
    todo: Sequence[RunConfig],
    attempt: Callable[[Any, bool], bool],
    progress: bool,
) -> None:
    """Run ``todo`` in this process (every rank under torchrun), the runs that another
    process holds last, each once its claim is free.  ``attempt(config, wait)`` claims, trains
    and records one run and returns ``False`` when another process holds it (:func:`_attempt`
    with this job's :func:`_trainer`; ``smallbn rethink`` passes its own)."""
    rank, world = _rank()
    deferred = []
    for config in tqdm(todo, desc="runs", disable=not progress or rank != 0):
        if not attempt(config, False):
            deferred.append(config)
        if world > 1:
            dist.barrier()
    for config in deferred:
        if rank == 0:
            _notice_waiting(config)
        attempt(config, True)
        if world > 1:
            dist.barrier()


def bind_data(configs: Sequence[RunConfig], root: str | Path | None) -> list[RunConfig]:
    """``configs`` labelled with the data each run will actually read, before any key is
    computed: ``dataset="digits"`` where Fashion-MNIST falls back to the digits (with the
    visible notice), and ``data_root`` the absolute folder where one was given (``root``, else
    the config's own), left out for the dataset's default data and for the digits, which read
    no folder.  A given folder that does not exist raises :class:`DatasetError`."""
    resolved: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    bound = []
    for config in configs:
        given = str(root) if root is not None else config.data_root
        source = (config.dataset, given)
        if source not in resolved:
            dataset = resolve_dataset(config.dataset, given)
            folder = None
            if dataset != "digits" and given is not None:
                folder = Path(given).resolve()
                if dataset == "fashion-mnist" and folder == _data.DEFAULT_FASHION_MNIST.resolve():
                    folder = None  # the default data named explicitly: the same runs
            resolved[source] = (dataset, None if folder is None else str(folder))
        dataset, data_root = resolved[source]
        bound.append(dataclasses.replace(config, dataset=dataset, data_root=data_root))
    return bound


def run_sweep(
    configs: Sequence[RunConfig],
    output_dir: Path,
    *,
    device: torch.device | str = "cpu",
    dataset_root: str | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run every config not yet in ``output_dir/results.jsonl``; write the tables and plot.

    ``jobs > 1`` runs that many configs at once in worker processes of one thread each (CPU,
    single process only): on small CPUs this beats several threads per run, whose small
    per-layer operations parallelize poorly.  Invocations sharing ``output_dir`` share the
    work, each run trained once (:func:`_attempt`).  Returns the result rows of ``configs``,
    which, when it returns, include those that other invocations trained.
    """
    device = torch.device(device)
    rank, world = _rank()
    results_path = output_dir / "results.jsonl"
    configs = bind_data([dataclasses.replace(c, world_size=world) for c in configs], dataset_root)
    for config in configs:
        config.check()
    unique: dict[str, RunConfig] = {}
    for config in configs:  # a repeated config would race itself on one checkpoint
        unique.setdefault(config.key, config)
    configs = list(unique.values())
    if rank == 0:
        _set_aside_damaged(results_path)  # warned about once, here, and never read as rows
    if world == 1:
        done = {row["key"] for row in read_results(results_path)}
        todo = [c for c in configs if c.key not in done]
    else:  # rank 0 decides for every run: the ranks may read the file as another writes it
        todo = configs
    if jobs > 1 and world == 1 and device.type == "cpu" and todo:
        _run_parallel(todo, output_dir, jobs, checkpoint_every, progress)
    else:

        def attempt(config: RunConfig, wait: bool) -> bool:
            train = _trainer(config, output_dir, device, checkpoint_every, progress)
            return _attempt(config, output_dir, train, wait=wait, device=device)

        _run_serial(todo, attempt, progress)
    if world > 1:
        dist.barrier()  # rank 0 has written every row before any rank reads them
    keys = {c.key for c in configs}
    rows = [row for row in read_results(results_path) if row["key"] in keys]
    if rank == 0 and rows:
        tables = format_tables(rows)
        atomic_write(output_dir / "results.md", lambda handle: handle.write(f"{tables}\n".encode()))
        plot_results(rows, output_dir / "error_vs_batch.png")
    return rows


def check_data(configs: Sequence[RunConfig]) -> None:
    """Raise :class:`OptionError` naming ``--train-samples`` if the training data of a run
    (``configs`` as :func:`bind_data` returns them) make no batch: such a run would fail
    only once the runs before it are trained.  Reads each dataset once, and keeps none.

    The rule is that of :func:`smallbn.experiments.sampling.shortfall`: an i.i.d. batch
    needs as many samples as the batch, a correlated one whole runs of ``class_group``
    samples of one class, so each class's leftover samples do not count.
    """
    sources: dict[tuple[str, str | None], list[RunConfig]] = {}
    for config in configs:
        sources.setdefault((config.dataset, config.data_root), []).append(config)
    for source, group in sources.items():
        data = load_dataset(*source)
        seen = set()
        for config in group:
            case = (config.train_samples, config.batch, config.class_group, config.composition)
            if case in seen:
                continue
            seen.add(case)
            problem = shortfall(
                data.train_y,
                config.train_samples,
                config.batch,
                config.class_group,
                config.composition,
            )
            if problem:
                raise OptionError("--train-samples", _no_batch(problem, config, data))


def _no_batch(problem: str, config: RunConfig, data: Dataset) -> str:
    """The message for a run whose training samples make no batch, with every fix: the
    least ``--train-samples`` that makes one, and the options that change the batch."""
    fixes = []
    if config.composition == "correlated":
        fixes.append("--compositions iid")
    if config.mode == "sgd":
        fixes.append("smaller --batch-sizes")
    least = samples_for_one_batch(
        data.train_y, config.batch, config.class_group, config.composition
    )
    if least is not None:
        fixes.append(f"--train-samples {least} or more (the least that makes one batch)")
    else:
        fixes.append(f"more training data than {data.name}, all of which makes no such batch")
    return f"{problem}, of {data.name} (run {config.tag}); pass {', or '.join(fixes)}"


def setup_distributed(device: str) -> torch.device:
    """Under torchrun: init the process group (NCCL on CUDA, else gloo) and return this
    process's device; otherwise the requested device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(device)
