"""Study ``leakage``: **information leakage** (Wu & Johnson 2021, §6, "batch from correlated
samples").

SGD batches of 32 made of simulated devices of 2 samples of one class each (the RoIs of one
image in a detection head), normalized per device (BN on each device's batch), by Ghost BN
over :data:`~.config.GHOST_DEVICES` devices, by Shuffle BN (each device normalizes a random
share of the shuffled batch) and by SyncBN (the whole batch).  Trained by the comparison
job's :func:`compare.run_one`; under ``torchrun`` every process holds half of each batch,
and Shuffle BN exchanges samples, SyncBN statistics, across the processes.  This module
holds the run, its findings, its report table and its figure."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from smallbn.experiments import compare
from smallbn.experiments.data import Dataset
from smallbn.experiments.rethink.config import GHOST_DEVICES, LEAKAGE_VARIANTS, StudyConfig
from smallbn.experiments.rethink.training import _Clock
from smallbn.experiments.rethink.verdicts import TOLERANCE, Finding, _beats, _cell, _settings

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _where(world: int) -> str:
    """Where a run of ``world`` processes trained, as the findings and the figure say it."""
    return "one process" if world == 1 else f"{world} processes (torchrun)"


def _leakage_run_config(config: StudyConfig) -> compare.RunConfig:
    """The comparison job's run that trains a leakage variant: SGD batches of ``sgd_batch``
    made of whole simulated devices of ``device_batch`` samples of one class each
    (``correlated`` batches with ``class_group = device_batch``), normalized

    * ``per-device``: over each device's own samples (Ghost BN, groups of ``device_batch``);
    * ``ghost``: over :data:`GHOST_DEVICES` devices together (Ghost BN, larger groups);
    * ``shuffle``: over groups of ``device_batch`` drawn from the shuffled batch (Shuffle BN:
      under torchrun the samples cross processes before they are grouped);
    * ``sync``: over the whole SGD batch (one process: BN; under torchrun: SyncBN across the
      processes).

    Under torchrun every process holds ``sgd_batch / world_size`` samples, whole devices."""
    method = "shufflebn" if config.variant == "shuffle" else "bn"
    return compare.RunConfig(
        method,
        config.norm_batch,
        "correlated",
        config.seed,
        dataset=config.dataset,
        sgd_batch=config.sgd_batch,
        epochs=float(config.epochs),
        train_samples=config.train_samples,
        lr=config.lr,
        widths=config.widths,
        blocks=config.blocks,
        precise_samples=config.precise_samples,
        class_group=config.device_batch,
        sync=config.variant == "sync" and config.world_size > 1,
        world_size=config.world_size,
        data_root=config.data_root,
    )


def _run_leakage(
    config: StudyConfig,
    dataset: Dataset,
    checkpoint: Path,
    device: torch.device,
    checkpoint_every: int,
    progress: bool,
) -> dict[str, Any]:
    """One leakage run: trained, checkpointed and measured by the comparison job's
    :func:`compare.run_one` (EMA and PreciseBN statistics, PreciseBN on batches composed and
    normalized as in training), on the first ``eval_samples`` test images."""
    run_config = _leakage_run_config(config)
    m = config.eval_samples
    view = dataclasses.replace(dataset, test_x=dataset.test_x[:m], test_y=dataset.test_y[:m])
    clock = _Clock()
    row = compare.run_one(
        run_config,
        view,
        checkpoint,
        device=device,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )
    _, cpu = clock.lap()
    measured = ("train_samples_used", "steps", "error_ema", "error_precise", "train_seconds")
    return {
        **config.identity(),
        "key": config.key,
        "world_size": config.world_size,
        **{name: row[name] for name in measured},
        "cpu_seconds": cpu,  # of this process: training and the evaluations
        "method": run_config.method,
        "sync": run_config.sync,
        "device": str(device),
        "torch": torch.__version__,
    }


#: How each leakage variant reads in the reports.
_LEAKAGE_LABELS = {
    "per-device": "per-device BN",
    "ghost": f"Ghost BN over {GHOST_DEVICES} devices",
    "shuffle": "Shuffle BN",
    "sync": "SyncBN (all devices)",
}


def _leakage_cells(
    rows: Sequence[dict[str, Any]],
) -> dict[int, dict[str, dict[str, tuple[float, float, int]]]]:
    """world size → variant → ``precise``/``ema`` → (mean, std, seeds) of the error (%)."""
    values: dict[int, dict[str, dict[str, list[float]]]] = {}
    for row in rows:
        cell = values.setdefault(row["world_size"], {}).setdefault(row["variant"], {})
        for name in ("precise", "ema"):
            cell.setdefault(name, []).append(100 * row[f"error_{name}"])
    return {
        world: {
            variant: {
                name: (float(np.mean(v)), float(np.std(v)), len(v)) for name, v in cell.items()
            }
            for variant, cell in sorted(
                variants.items(), key=lambda item: LEAKAGE_VARIANTS.index(item[0])
            )
        }
        for world, variants in sorted(values.items())
    }


def _leakage_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    found = []
    for world, cells in _leakage_cells(rows).items():
        where = _where(world)
        if "per-device" not in cells:
            continue
        leaky = cells["per-device"]["precise"][0]
        for variant in ("sync", "shuffle"):
            if variant not in cells:
                continue
            error = cells[variant]["precise"][0]
            found.append(
                Finding(
                    f"Mask R-CNN head, §6: {_LEAKAGE_LABELS[variant]} alleviates the leakage "
                    f"of per-device BN on correlated per-device batches ({where})",
                    f"{_LEAKAGE_LABELS[variant]} {error:.2f}%, per-device BN {leaky:.2f}%",
                    **_beats(error, leaky),
                )
            )
        if "sync" in cells and "shuffle" in cells:
            sync, shuffle = cells["sync"]["precise"][0], cells["shuffle"]["precise"][0]
            gap = leaky - sync
            recovered = f"; {100 * (leaky - shuffle) / gap:.0f}% of the gap" if gap > 0 else ""
            found.append(
                Finding(
                    f"§6: shuffling alleviates leakage as much as SyncBN does ({where}; a tie "
                    f"within the tolerance counts as reproduced)",
                    f"Shuffle BN {shuffle:.2f}%, SyncBN {sync:.2f}%{recovered}",
                    reproduced=shuffle <= sync + TOLERANCE,
                )
            )
    return found


def _report(rows: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    """The study's part of :func:`~.report.format_report`: its settings and numbers
    (``rows`` of ``seeds`` seeds) as Markdown lines."""
    out: list[str] = []
    row = rows[0]
    out.append(
        f"**Information leakage** — {_settings(rows)}; correlated batches: each SGD batch "
        f"is {row['sgd_batch'] // row['device_batch']} simulated devices of "
        f"{row['device_batch']} samples of one class (the RoIs of one image)"
    )
    for world, cells in _leakage_cells(rows).items():
        out.append("")
        device = next(r.get("device", "cpu") for r in rows if r["world_size"] == world)
        backend = "gloo on CPU" if device.startswith("cpu") else f"NCCL on {device}"
        where = (
            "one process, the devices simulated as groups of the batch"
            if world == 1
            else f"{world} processes under torchrun ({backend}), "
            f"{row['sgd_batch'] // world} samples each: Shuffle BN exchanges samples and "
            f"SyncBN statistics across them"
        )
        out.append(f"test error (%), mean ± std over the seeds ({where}):")
        out.append("")
        out.append("| normalization | samples normalized together | PreciseBN | EMA |")
        out.append("|---|---|---|---|")
        for variant, cell in cells.items():
            size = next(r["norm_batch"] for r in rows if r["variant"] == variant)
            spread = (
                "random, from the shuffled batch"
                if variant == "shuffle"
                else f"{size // row['device_batch']} device"
                + ("s" if size > row["device_batch"] else "")
            )
            out.append(
                f"| {_LEAKAGE_LABELS[variant]} | {size} ({spread}) | "
                + " | ".join(_cell(*cell[name]) for name in ("precise", "ema"))
                + " |"
            )
    return out


def _plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """The study's figure for :func:`~.report.plot_study` (which has chosen matplotlib's
    Agg backend)."""
    import matplotlib.pyplot as plt

    grid = _leakage_cells(rows)
    figure, axes = plt.subplots(1, len(grid), figsize=(6.5 * len(grid), 4.2), squeeze=False)
    for ax, (world, cells) in zip(axes[0], grid.items(), strict=True):
        variants = list(cells)
        for i, (name, label) in enumerate((("precise", "PreciseBN"), ("ema", "EMA"))):
            ax.bar(
                np.arange(len(variants)) + (i - 0.5) * 0.4,
                [cells[v][name][0] for v in variants],
                0.4,
                yerr=[cells[v][name][1] for v in variants],
                capsize=3,
                label=f"{label} statistics",
            )
        ax.set_xticks(
            np.arange(len(variants)),
            [_LEAKAGE_LABELS[v].replace(" over ", "\nover ") for v in variants],
            fontsize=8,
        )
        ax.set_ylabel("test error (%)")
        ax.set_title(f"correlated per-device batches, {_where(world)}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return figure
