"""Study ``inconsistency``: **train-test inconsistency at small batch** (Wu & Johnson 2021,
"batch in training and testing").

Ghost BN over i.i.d. groups of b samples inside SGD batches of 32; evaluated with population
statistics (PreciseBN), with batch statistics of b (:func:`smallbn.batch_stats_eval`, test
images in random groups of b) and, in a branch of the same run that restarts from the weights
at the start of the last epochs, trained with FrozenBN for those epochs
(:class:`smallbn.FreezeNormsAt`).  This module holds the run, its findings, its report table
and its figure."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from smallbn.experiments.rethink.evaluation import _error, _error_batch_stats, _precise
from smallbn.experiments.rethink.images import _stream
from smallbn.experiments.rethink.training import _cross_entropy, _row, _Run, _total
from smallbn.experiments.rethink.verdicts import TOLERANCE, Finding, _beats, _cell, _settings
from smallbn.population import FreezeNormsAt

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _run_inconsistency(run: _Run) -> dict[str, Any]:
    """Stage ``main`` trains all epochs (keeping the weights at the start of the FrozenBN
    epochs) and measures EMA, PreciseBN and batch statistics; stage ``frozen`` restarts from
    the kept weights, takes PreciseBN statistics and trains the last epochs with FrozenBN
    (:class:`smallbn.FreezeNormsAt`) on the same batches."""
    config, data, device = run.config, run.data, run.device
    per_epoch, total = _total(config, data)
    frozen_from = config.epochs - config.frozen_epochs
    freeze_step = per_epoch * frozen_from
    model, optimizer = run.model_and_optimizer()
    record: dict[str, Any] = {"stage": "main", "branch": None, "main": None, "frozen": False}
    state = run.checkpoint.load(("main", "frozen"))
    if state is not None and state["frozen"]:  # the checkpoint holds the FrozenBN model
        model = _freeze(model)
    clock, start = run.resume(state, model, optimizer, say_stage=True)
    if state is not None:
        record = {k: state[k] for k in ("stage", "branch", "main", "frozen")}
    loss = _cross_entropy(data.train_x, data.train_y, device)
    group = config.norm_batch

    def precise_stream(seed: int) -> Iterator[Tensor]:
        return _stream(data.train_x, data.train_y, config.sgd_batch, seed, device)

    if record["stage"] == "main":

        def keep_branch(step: int) -> None:
            if step == freeze_step:
                record["branch"] = {
                    "model": copy.deepcopy(model.state_dict()),
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                }

        run.train(
            model,
            optimizer,
            start=start,
            loss=loss,
            state=lambda: record,
            clock=clock,
            on_step=keep_branch,
        )
        precise = _precise(model, precise_stream(config.seed + 7), config.precise_samples)
        record["main"] = {
            "error_ema": _error(model, data.test_x, data.test_y, device),
            "error_precise": _error(precise, data.test_x, data.test_y, device),
            "error_batch_stats": _error_batch_stats(
                model, data.test_x, data.test_y, group, config.seed, device
            ),
        }
        # stage frozen: back to the weights at the start of the FrozenBN epochs
        branch = record["branch"]
        model.load_state_dict(branch["model"])
        optimizer.load_state_dict(branch["optimizer"])
        record.update(stage="frozen", branch=None)
        start = freeze_step
        run.save(record, start, model, optimizer, clock)
    if not record["frozen"]:
        freeze = FreezeNormsAt(
            frozen_from,
            precise_data=lambda: precise_stream(config.seed + 11),
            num_samples=config.precise_samples,
            progress=False,
        )
        model = freeze(model, frozen_from)
        record["frozen"] = True
    run.train(
        model,
        optimizer,
        start=start,
        loss=loss,
        state=lambda: record,
        clock=clock,
    )
    clock.lap()
    error_frozen = _error(model, data.test_x, data.test_y, device)
    return _row(config, run, clock, total, **record["main"], error_frozen=error_frozen)


def _freeze(model: nn.Module) -> nn.Module:
    from smallbn.convert import freeze_norms

    return freeze_norms(model)


def _by_batch(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, tuple[float, float]]]:
    """norm batch → method → (mean, std) of the error (%) over seeds."""
    cells: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        cell = cells.setdefault(row["norm_batch"], {})
        for method in ("ema", "precise", "batch_stats", "frozen"):
            cell.setdefault(method, []).append(100 * row[f"error_{method}"])
    return {
        b: {m: (float(np.mean(v)), float(np.std(v))) for m, v in cell.items()}
        for b, cell in sorted(cells.items())
    }


def _inconsistency_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    cells = _by_batch(rows)
    if not cells:
        return []
    small, large = min(cells), max(cells)
    s = {m: v[0] for m, v in cells[small].items()}
    found = [
        Finding(
            "Mini-batch statistics at inference: at a small normalization batch, evaluating "
            "with mini-batch statistics (of the same size) beats population statistics "
            f"(b = {small} here)",
            f"b = {small}: batch statistics {s['batch_stats']:.2f}%, population "
            f"(PreciseBN) {s['precise']:.2f}%",
            **_beats(s["batch_stats"], s["precise"]),
        ),
        Finding(
            f"FrozenBN: training the last epochs with FrozenBN (population statistics) "
            f"beats population statistics after BN training at a small batch (b = {small})",
            f"b = {small}: FrozenBN {s['frozen']:.2f}%, population {s['precise']:.2f}%",
            **_beats(s["frozen"], s["precise"]),
        ),
    ]
    if large > small:
        g = {m: v[0] for m, v in cells[large].items()}
        reference = g["precise"]
        found.append(
            Finding(
                "Train-test inconsistency: both remedies narrow the gap to the large-batch "
                f"error at small b (gap to b = {large} with population statistics, "
                f"b = {small})",
                f"gap: population {s['precise'] - reference:+.2f}, batch statistics "
                f"{s['batch_stats'] - reference:+.2f}, FrozenBN {s['frozen'] - reference:+.2f} "
                f"points",
                _beats(s["batch_stats"], s["precise"])["reproduced"]
                and _beats(s["frozen"], s["precise"])["reproduced"],
            )
        )
        found.append(
            Finding(
                "Mini-batch statistics at inference: at a large normalization batch, "
                "population statistics are as good as mini-batch statistics or better "
                f"(b = {large}, within {TOLERANCE} points)",
                f"b = {large}: population {g['precise']:.2f}%, batch statistics "
                f"{g['batch_stats']:.2f}%",
                g["precise"] <= g["batch_stats"] + TOLERANCE,
            )
        )
    return found


def _report(rows: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    """The study's part of :func:`~.report.format_report`: its settings and numbers
    (``rows`` of ``seeds`` seeds) as Markdown lines."""
    out: list[str] = []
    out.append(
        f"**Train-test inconsistency** — {_settings(rows)}; i.i.d. groups of b inside each "
        f"SGD batch (Ghost BN; BN at b = {rows[0]['sgd_batch']}), FrozenBN for the last "
        f"{rows[0]['frozen_epochs']} epoch(s)"
    )
    out.append("")
    out.append(f"test error (%), mean ± std over {seeds} seed(s):")
    out.append("")
    cells = _by_batch(rows)
    names = {
        "precise": "population (PreciseBN)",
        "batch_stats": "batch statistics of b",
        "frozen": "FrozenBN last epochs",
        "ema": "population (EMA)",
    }
    out.append("| evaluation | " + " | ".join(f"b={b}" for b in cells) + " |")
    out.append("|---|" + "---|" * len(cells))
    for method, label in names.items():
        out.append(
            f"| {label} | " + " | ".join(_cell(*cells[b][method], seeds) for b in cells) + " |"
        )
    return out


def _plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """The study's figure for :func:`~.report.plot_study` (which has chosen matplotlib's
    Agg backend)."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.5, 4.2))
    cells = _by_batch(rows)
    sizes = list(cells)
    for method, label, marker in (
        ("precise", "population (PreciseBN)", "o"),
        ("batch_stats", "batch statistics of b", "s"),
        ("frozen", "FrozenBN last epochs", "^"),
        ("ema", "population (EMA)", "x"),
    ):
        ax.errorbar(
            sizes,
            [cells[b][method][0] for b in sizes],
            yerr=[cells[b][method][1] for b in sizes],
            marker=marker,
            capsize=3,
            label=label,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("normalization batch b")
    ax.set_ylabel("test error (%)")
    ax.set_title("train-test inconsistency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure
