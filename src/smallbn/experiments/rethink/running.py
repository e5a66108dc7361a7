"""Running the studies: one run (:func:`run_one`, which dispatches to its study's module), and
every planned run not yet recorded (:func:`run_studies`), claimed, trained, recorded and
reported with the comparison job's machinery (:mod:`smallbn.experiments.compare`: locks,
damaged lines set aside, worker processes, torchrun)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smallbn.experiments import compare
from smallbn.experiments.data import Dataset, OptionError
from smallbn.experiments.rethink.checkpoint import _Checkpoint
from smallbn.experiments.rethink.config import StudyConfig
from smallbn.experiments.rethink.domain import _run_domain_shift, _run_two_domains
from smallbn.experiments.rethink.ema import _run_ema
from smallbn.experiments.rethink.images import _Data
from smallbn.experiments.rethink.inconsistency import _run_inconsistency
from smallbn.experiments.rethink.leakage import _run_leakage
from smallbn.experiments.rethink.report import write_report
from smallbn.experiments.rethink.training import _Run, _total

_COMMON_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "study": (str,),
    "variant": (str,),
    "seed": (int,),
}
#: What a row of each study's results.jsonl needs (with the types), as the comparison job's
#: ``_ROW_FIELDS``: a line without them is set aside as damaged.
ROW_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ema": {
        **_COMMON_FIELDS,
        "error_ema": (list,),
        "error_precise": (list,),
        "error_momentum": (dict,),
        "precise_sample_sweep": (dict,),
    },
    "inconsistency": {
        **_COMMON_FIELDS,
        "norm_batch": (int,),
        "error_ema": (int, float),
        "error_precise": (int, float),
        "error_batch_stats": (int, float),
        "error_frozen": (int, float),
    },
    "domain": {**_COMMON_FIELDS, "errors": (dict,)},
    "leakage": {
        **_COMMON_FIELDS,
        "norm_batch": (int,),
        "world_size": (int,),
        "error_ema": (int, float),
        "error_precise": (int, float),
    },
}


def run_one(
    config: StudyConfig,
    dataset: Dataset,
    checkpoint: Path,
    *,
    device: torch.device | str = "cpu",
    checkpoint_every: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and measure one run, resuming from ``checkpoint`` if it exists; its row."""
    config.check()
    if config.study == "leakage":
        return _run_leakage(
            config, dataset, checkpoint, torch.device(device), checkpoint_every, progress
        )
    data = _Data(dataset, config)
    per_epoch, total = _total(config, data)
    if per_epoch < 1:
        raise OptionError(
            "--train-samples",
            f"the {len(data.train_y)} training samples of {config.tag} make no SGD batch of "
            f"{config.sgd_batch}",
        )
    run = _Run(
        config,
        data,
        torch.device(device),
        _Checkpoint(checkpoint, config, total),
        checkpoint_every,
        progress,
    )
    if config.study == "ema":
        return _run_ema(run)
    if config.study == "inconsistency":
        return _run_inconsistency(run)
    return _run_domain_shift(run) if config.part == "a" else _run_two_domains(run)


def _study_dir(output_dir: Path, study: str) -> Path:
    return output_dir / study


def _worker(config: StudyConfig, output_dir: Path, checkpoint_every: int, wait: bool) -> bool:
    """One run in a worker process of a parallel invocation (one thread), claimed, trained
    and recorded by the worker (the comparison job's :func:`~compare._attempt`)."""
    torch.set_num_threads(1)
    return _attempt(config, output_dir, torch.device("cpu"), checkpoint_every, False, wait)


def _attempt(
    config: StudyConfig,
    output_dir: Path,
    device: torch.device,
    checkpoint_every: int,
    progress: bool,
    wait: bool,
) -> bool:
    folder = _study_dir(output_dir, config.study)

    def train() -> dict[str, Any]:
        dataset = compare._worker_dataset(config.dataset, config.data_root)
        return run_one(
            config,
            dataset,
            compare._checkpoint_path(folder, config),  # type: ignore[arg-type]
            device=device,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )

    return compare._attempt(
        config,  # type: ignore[arg-type]
        folder,
        train,
        wait=wait,
        device=device,
        fields=ROW_FIELDS[config.study],
    )


def _cost(config: StudyConfig) -> float:
    """A rough relative cost, to start the longest runs first (two workers finish together)."""
    images = config.epochs * config.train_samples
    if config.study == "inconsistency":
        images *= (1 + config.frozen_epochs / config.epochs) * (1 + 4 / config.norm_batch)
    if config.study == "domain" and config.part == "b":
        images *= 2
    if config.study == "ema":
        images += config.epochs * config.eval_samples * (len(config.momenta) + 1)
    if config.study == "leakage":  # compare.run_one's small batches: slower per image
        images *= 1.5 if config.variant == "shuffle" else 1.2
    return float(images)


def read_study(output_dir: Path, study: str) -> list[dict[str, Any]]:
    """The rows of ``study`` in ``output_dir/<study>/results.jsonl`` (damaged lines warned
    about and skipped, as the comparison job does)."""
    return compare.read_results(_study_dir(output_dir, study) / "results.jsonl", ROW_FIELDS[study])


def run_studies(
    configs: Sequence[StudyConfig],
    output_dir: Path,
    *,
    device: torch.device | str = "cpu",
    dataset_root: str | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Run every config not yet recorded, then write each study's report and plot; returns
    the rows of ``configs`` by study (including those other invocations trained).

    ``jobs > 1`` runs that many at once in worker processes of one thread each (CPU, single
    process).  Under torchrun (the leakage study only: :meth:`StudyConfig.check`) every
    process trains every run together, rank 0 deciding which to train and writing the rows
    and reports, as the comparison job does."""
    device = torch.device(device)
    rank, world = compare._rank()
    configs = compare.bind_data(configs, dataset_root)  # type: ignore[arg-type,assignment]
    unique: dict[str, StudyConfig] = {}
    for config in configs:
        config.check()
        if config.world_size != world:
            raise ValueError(
                f"run {config.tag} is planned for {config.world_size} process(es), and "
                f"{world} are running: plan(..., world_size={world})"
            )
        unique.setdefault(config.key, config)
    studies = list(dict.fromkeys(c.study for c in unique.values()))
    if rank == 0:
        for study in studies:
            path = _study_dir(output_dir, study) / "results.jsonl"
            compare._set_aside_damaged(path, ROW_FIELDS[study])
    if world == 1:
        done = {row["key"] for study in studies for row in read_study(output_dir, study)}
    else:  # rank 0 decides for every run: the ranks may read a file as another writes it
        done = set()
    todo = sorted((c for c in unique.values() if c.key not in done), key=_cost, reverse=True)
    if jobs > 1 and world == 1 and device.type == "cpu" and len(todo) > 1:
        compare._run_parallel(
            todo,  # type: ignore[arg-type]
            output_dir,
            jobs,
            checkpoint_every,
            progress,
            worker=_worker,  # type: ignore[arg-type]
        )
    else:
        compare._run_serial(
            todo,  # type: ignore[arg-type]
            lambda config, wait: _attempt(
                config, output_dir, device, checkpoint_every, progress, wait
            ),
            progress,
        )
    keys = set(unique)
    results: dict[str, list[dict[str, Any]]] = {}
    for study in studies:
        rows = [row for row in read_study(output_dir, study) if row["key"] in keys]
        results[study] = rows
        if rows and rank == 0:
            write_report(study, rows, _study_dir(output_dir, study))
    return results
