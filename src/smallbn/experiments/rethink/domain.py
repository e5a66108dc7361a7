"""Study ``domain``: **domain shift** (Wu & Johnson 2021, "batch from different domains").

(a) Trained on Fashion-MNIST, tested on shifted copies (:func:`~.images.shift_images`:
inverted intensities, lower contrast, pixel noise) with the training domain's population
statistics, with statistics recomputed by PreciseBN on unlabelled images of the target
domain, and with batch statistics of the target batch.  (b) Trained on two domains at once
(the original images and a shifted copy of each, as two FPN levels sharing a head, one
:class:`~smallbn.DomainBatchNorm` per norm): statistics shared by the domains or specific to
each (:func:`smallbn.use_domain`), in training and, by PreciseBN, at test: the four
combinations of the paper's Table 5; each with one affine shared by the domains and with one
per domain (``per_domain_affine=True``), the paper's other choice.  This module holds the
runs, their findings, the report tables and the figure."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallbn.experiments.rethink.config import SHIFTS
from smallbn.experiments.rethink.evaluation import _error, _error_batch_stats, _precise
from smallbn.experiments.rethink.images import _stream
from smallbn.experiments.rethink.training import _cross_entropy, _row, _Run, _total
from smallbn.experiments.rethink.verdicts import TOLERANCE, Finding, _beats, _cell, _settings
from smallbn.experiments.sampling import batch_indices
from smallbn.layers.domain import use_domain

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The domain study's part-b trainings: statistics shared or specific, ``+affine`` with one
#: affine per domain (:func:`_domain_variant`).
_DOMAIN_TRAININGS = ("shared", "specific", "shared+affine", "specific+affine")


def _run_domain_shift(run: _Run) -> dict[str, Any]:
    """Part a: train on the original images; test on each shift with the training domain's
    population statistics, with statistics recomputed on unlabelled target images, and with
    the target batch's own statistics."""
    config, data, device = run.config, run.data, run.device
    per_epoch, total = _total(config, data)
    model, optimizer = run.model_and_optimizer()
    clock, start = run.resume(run.checkpoint.load(("train",)), model, optimizer)
    run.train(
        model,
        optimizer,
        start=start,
        loss=_cross_entropy(data.train_x, data.train_y, device),
        state=lambda: {"stage": "train"},
        clock=clock,
    )
    clock.lap()
    samples = config.precise_samples
    source = _precise(
        model,
        _stream(data.train_x, data.train_y, config.sgd_batch, config.seed + 7, device),
        samples,
    )
    errors = {"original/source": _error(source, data.test_x, data.test_y, device)}
    for shift in config.shifts:
        test_x = data.shifted_test(shift)
        target = _precise(
            model,
            _stream(
                data.unlabelled_target(shift), None, config.sgd_batch, config.seed + 13, device
            ),
            samples,
        )
        errors[f"{shift}/source"] = _error(source, test_x, data.test_y, device)
        errors[f"{shift}/target"] = _error(target, test_x, data.test_y, device)
        errors[f"{shift}/batch_stats"] = _error_batch_stats(
            source, test_x, data.test_y, config.sgd_batch, config.seed, device
        )
    return _row(config, run, clock, total, errors=errors)


def _run_two_domains(run: _Run) -> dict[str, Any]:
    """Part b: every step trains on a batch of original images and the same images shifted,
    as two FPN levels through one head: one forward over both with the statistics of both
    (``shared``), or one forward per domain with its own statistics (``specific``).  At test,
    PreciseBN statistics shared by the domains (one population of both) or per domain."""
    config, data, device = run.config, run.data, run.device
    shift = config.shifts[0]
    per_epoch, total = _total(config, data)
    model, optimizer = run.model_and_optimizer()
    clock, start = run.resume(run.checkpoint.load(("train",)), model, optimizer)
    shifted = data.shifted_train(shift)
    x, y = data.train_x, data.train_y

    def shared(model: nn.Module, pair: tuple[Tensor, Tensor]) -> Tensor:
        with use_domain(model, 0):
            return model(torch.cat(pair))  # type: ignore[no-any-return]

    def specific(model: nn.Module, pair: tuple[Tensor, Tensor]) -> Tensor:
        outputs = []
        for domain, images in enumerate(pair):
            with use_domain(model, domain):
                outputs.append(model(images))
        return torch.cat(outputs)

    forward = shared if config.variant == "shared" else specific

    def loss(model: nn.Module, index: Tensor) -> Tensor:
        pair = (x[index].to(device), shifted[index].to(device))
        labels = y[index].to(device)
        return F.cross_entropy(forward(model, pair), torch.cat([labels, labels]))

    run.train(
        model,
        optimizer,
        start=start,
        loss=loss,
        state=lambda: {"stage": "train"},
        clock=clock,
    )
    clock.lap()

    def pairs(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        for index in batch_indices(y, config.sgd_batch, 1, "iid", seed):
            yield x[index].to(device), shifted[index].to(device)

    tests = {"original": data.test_x, "shifted": data.shifted_test(shift)}
    errors = {}
    for population, pass_forward in (("shared", shared), ("specific", specific)):
        precise = _precise(
            model,
            pairs(config.seed + 7),
            config.precise_samples,
            forward=pass_forward,
            size=lambda pair: 2 * len(pair[0]),
        )
        for domain, (name, test_x) in enumerate(tests.items()):
            with use_domain(precise, 0 if population == "shared" else domain):
                errors[f"{population}/{name}"] = _error(precise, test_x, data.test_y, device)
    return _row(config, run, clock, total, errors=errors)


def _domain_cells(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float]]:
    """(variant, error name) → (mean, std) of the error (%) over seeds."""
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        for name, value in row["errors"].items():
            cells.setdefault((_domain_variant(row), name), []).append(100 * value)
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in cells.items()}


def _domain_variant(row: dict[str, Any]) -> str:
    """A domain row's training statistics, ``+affine`` with one affine per domain (rows
    recorded before that setting existed have none: a shared affine)."""
    return row["variant"] + ("+affine" if row.get("domain_affine", False) else "")


def _domain_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    cells = _domain_cells(rows)
    found = []
    shifts = [s for s in SHIFTS if ("shift", f"{s}/target") in cells]
    for shift in shifts:
        source, target = (
            cells[("shift", f"{shift}/source")][0],
            cells[("shift", f"{shift}/target")][0],
        )
        found.append(
            Finding(
                f"Domain shift: under a domain shift, population statistics recomputed on "
                f"the target domain beat those of the training domain ({shift})",
                f"{shift}: target statistics {target:.2f}%, training-domain statistics "
                f"{source:.2f}%",
                **_beats(target, source),
            )
        )

    def mean_error(train: str, population: str) -> float | None:
        values = [cells.get((train, f"{population}/{d}")) for d in ("original", "shifted")]
        if any(v is None for v in values):
            return None
        return float(np.mean([v[0] for v in values if v is not None]))

    grid = {
        (t, p): mean_error(t, p) for t in ("shared", "specific") for p in ("shared", "specific")
    }
    for train in ("shared", "specific"):
        other = "specific" if train == "shared" else "shared"
        same, cross = grid[(train, train)], grid[(train, other)]
        if same is None or cross is None:
            continue
        found.append(
            Finding(
                f"RetinaNet head, Table 5: with {train} statistics in training, {train} "
                f"population statistics at test beat {other} ones (training and test should "
                f"agree)",
                f"train {train}: test {train} {same:.2f}%, test {other} {cross:.2f}% (mean of "
                f"the two domains)",
                **_beats(same, cross),
            )
        )
    affine_differences = []
    for train in ("shared", "specific"):
        shared_affine, own_affine = grid[(train, train)], mean_error(f"{train}+affine", train)
        if shared_affine is not None and own_affine is not None:
            affine_differences.append((train, own_affine, shared_affine))
    if affine_differences:
        found.append(
            Finding(
                "Table 5: whether the domains share the affine layer matters little (training "
                "and test statistics agreeing; a tie within the tolerance counts as reproduced)",
                "; ".join(
                    f"{train} statistics: per-domain affine {own:.2f}%, shared {shared:.2f}%"
                    for train, own, shared in affine_differences
                ),
                reproduced=all(abs(o - sh) <= TOLERANCE for _, o, sh in affine_differences),
            )
        )
    if all(v is not None for v in grid.values()):
        values = {k: v for k, v in grid.items() if v is not None}
        ours = values[("specific", "specific")]
        others = {k: v for k, v in values.items() if k != ("specific", "specific")}
        runner_up = min(others, key=lambda k: others[k])
        found.append(
            Finding(
                "RetinaNet head, Table 5: domain-specific statistics in training and at test "
                "are the best of the four",
                f"train specific, test specific {ours:.2f}%; best of the others: train "
                f"{runner_up[0]}, test {runner_up[1]} {others[runner_up]:.2f}%",
                **_beats(ours, others[runner_up]),
            )
        )
    return found


def _report(rows: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    """The study's part of :func:`~.report.format_report`: its settings and numbers
    (``rows`` of ``seeds`` seeds) as Markdown lines."""
    out: list[str] = []
    cells = _domain_cells(rows)
    out.append(f"**Domain shift** — {_settings(rows)}")
    shifts = sorted(
        {n.split("/")[0] for (v, n) in cells if v == "shift"} - {"original"},
        key=lambda s: SHIFTS.index(s),
    )
    if shifts:
        out.append("")
        out.append(
            f"(a) trained on the original images; test error (%) on shifted test images, "
            f"mean ± std over {seeds} seed(s); original test images with training-domain "
            f"statistics: {_cell(*cells[('shift', 'original/source')], seeds)}"
        )
        out.append("")
        out.append(
            "| test domain | training-domain statistics | target statistics (PreciseBN "
            "on unlabelled target images) | target batch statistics |"
        )
        out.append("|---|---|---|---|")
        for shift in shifts:
            out.append(
                f"| {shift} | "
                + " | ".join(
                    _cell(*cells[("shift", f"{shift}/{m}")], seeds)
                    for m in ("source", "target", "batch_stats")
                )
                + " |"
            )
    trained = [v for v in _DOMAIN_TRAININGS if any(k[0] == v for k in cells)]
    if trained:
        second = next(r for r in rows if r["variant"] != "shift")["shifts"][0]
        out.append("")
        out.append(
            f"(b) trained on two domains at once (original and {second}, the same images, "
            f"as two FPN levels through one head, DomainBatchNorm), one affine shared by "
            f"the domains or one per domain; test error (%) per test domain, mean ± std "
            f"over {seeds} seed(s):"
        )
        out.append("")
        out.append(
            "| training statistics | test statistics | affine | original | " + second + " | mean |"
        )
        out.append("|---|---|---|---|---|---|")
        for variant in trained:
            train, _, affine = variant.partition("+")
            for population in ("shared", "specific"):
                values = [cells[(variant, f"{population}/{d}")] for d in ("original", "shifted")]
                mean = float(np.mean([v[0] for v in values]))
                out.append(
                    f"| {train} | {population} | {'per domain' if affine else 'shared'} | "
                    + " | ".join(_cell(*v, seeds) for v in values)
                    + f" | {mean:.2f} |"
                )
    return out


def _plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """The study's figure for :func:`~.report.plot_study` (which has chosen matplotlib's
    Agg backend)."""
    import matplotlib.pyplot as plt

    cells = _domain_cells(rows)
    figure, axes = plt.subplots(
        1, 2, figsize=(16, 4.4), squeeze=False, gridspec_kw={"width_ratios": [1, 1.6]}
    )
    ax = axes[0][0]
    shifts = [s for s in SHIFTS if ("shift", f"{s}/source") in cells]
    width = 0.27
    for i, (method, label) in enumerate(
        (
            ("source", "training-domain statistics"),
            ("target", "target statistics"),
            ("batch_stats", "target batch statistics"),
        )
    ):
        values = [cells[("shift", f"{s}/{method}")] for s in shifts]
        ax.bar(
            np.arange(len(shifts)) + (i - 1) * width,
            [v[0] for v in values],
            width,
            yerr=[v[1] for v in values],
            capsize=3,
            label=label,
        )
    if ("shift", "original/source") in cells:
        ax.axhline(
            cells[("shift", "original/source")][0],
            color="k",
            ls="--",
            lw=1,
            label="original test images",
        )
    ax.set_xticks(np.arange(len(shifts)), shifts)
    ax.set_ylabel("test error (%)")
    ax.set_title("(a) trained on the original domain, tested on shifts")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    combos = [
        (t, p)
        for t in _DOMAIN_TRAININGS
        for p in ("shared", "specific")
        if (t, f"{p}/original") in cells
    ]
    second = next((r["shifts"][0] for r in rows if r["variant"] != "shift"), "shifted")
    for i, domain in enumerate(("original", "shifted")):
        values = [cells[(t, f"{p}/{domain}")] for t, p in combos]
        ax.bar(
            np.arange(len(combos)) + (i - 0.5) * 0.4,
            [v[0] for v in values],
            0.4,
            yerr=[v[1] for v in values],
            capsize=3,
            label=f"{second if domain == 'shifted' else domain} test images",
        )
    ax.set_xticks(
        np.arange(len(combos)),
        [
            f"train {t.partition('+')[0]}\ntest {p}"
            + ("\naffine/domain" if t.endswith("+affine") else "")
            for t, p in combos
        ],
        fontsize=8 if len(combos) > 4 else None,
    )
    ax.set_ylabel("test error (%)")
    ax.set_title(f"(b) trained on original + {second}: shared vs per-domain statistics")
    ax.legend(fontsize=8)
    for a in axes[0]:
        a.grid(alpha=0.3, axis="y")
    return figure
