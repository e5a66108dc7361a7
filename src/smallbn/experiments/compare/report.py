"""The comparison job's report: Markdown tables of test error by method and normalization
batch size, with the share of BN's small-batch gap each method recovers
(:func:`format_tables`), and the plot of error against normalization batch size
(:func:`plot_results`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smallbn._io import atomic_write
from smallbn._optional import require
from smallbn.experiments.compare.configs import METHODS, batch_independent

__all__ = ["format_tables", "plot_results"]


#: (composition, method, normalization batch) → the test errors (%) of its seeds.
Cells = dict[tuple[str, str, int], list[float]]


def _summary(rows: Iterable[dict[str, Any]], metric: str) -> Cells:
    cells: Cells = {}
    for row in rows:
        cells.setdefault((row["composition"], row["method"], row["norm_batch"]), []).append(
            100 * row[metric]
        )
    return cells


def _flat(rows: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """The (composition, method) pairs run at one b whose result holds at every b
    (:func:`~smallbn.experiments.compare.configs.batch_independent`): the tables repeat it in
    every column and the plot draws it as a flat line."""
    sizes: dict[tuple[str, str], set[int]] = {}
    independent: dict[tuple[str, str], bool] = {}
    for row in rows:
        pair = (row["composition"], row["method"])
        sizes.setdefault(pair, set()).add(row["norm_batch"])
        mode = row.get("mode", "groups")
        independent[pair] = independent.get(pair, True) and batch_independent(row["method"], mode)
    return {pair for pair, flat in independent.items() if flat and len(sizes[pair]) == 1}


def _spread(cells: Cells, flat: set[tuple[str, str]]) -> tuple[Cells, dict[tuple[str, str], str]]:
    """``cells`` with each flat pair's values in every b of its composition, and the row
    labels (``gn (any b)`` for those)."""
    spread = dict(cells)
    labels: dict[tuple[str, str], str] = {}
    for (composition, method, _), values in cells.items():
        labels[(composition, method)] = method
        if (composition, method) in flat:
            labels[(composition, method)] = f"{method} (any b)"
            for b in {k[2] for k in cells if k[0] == composition}:
                spread[(composition, method, b)] = values
    return spread, labels


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per composition, test error (%) mean ± std over seeds by method × batch,
    with EMA statistics and after PreciseBN, and how much of BN's small-batch gap each
    method recovers.  A batch-independent method run at one b (GN in ``groups`` mode) is
    shown at every b, labelled ``(any b)``."""
    out = []
    seeds = sorted({row["seed"] for row in rows})
    flat = _flat(rows)
    for metric, label in (("error_precise", "after PreciseBN"), ("error_ema", "EMA statistics")):
        cells, labels = _spread(_summary(rows, metric), flat)
        for composition in sorted({row["composition"] for row in rows}):
            sizes = sorted({k[2] for k in cells if k[0] == composition})
            methods = [m for m in METHODS if (composition, m) in labels]
            out.append(
                f"**{composition} groups — test error (%), {label}, mean ± std over "
                f"{len(seeds)} seed(s)**\n"
            )
            out.append("| method | " + " | ".join(f"b={s}" for s in sizes) + " |")
            out.append("|---|" + "---|" * len(sizes))
            for method in methods:
                out.append(
                    f"| {labels[(composition, method)]} | "
                    + " | ".join(_cell(cells.get((composition, method, s))) for s in sizes)
                    + " |"
                )
            out.append("")
            gap = _gap_table(cells, labels, composition)
            if gap:
                out.extend([gap, ""])
    return "\n".join(out)


#: The smallest gap BN(b) − BN(largest b), in points of test error, whose share a method
#: recovers is reported: below it (BN within a few points of its large-batch error, as from
#: b = 4 in correlated groups) the ratio divides seed noise by seed noise (−800%, +500%).
_MIN_GAP_POINTS = 5.0


def _gap_table(cells: Cells, labels: dict[tuple[str, str], str], composition: str) -> str:
    """Share of the gap BN(b) − BN(largest b) that each method closes at batch b:
    ``(BN(b) − method(b)) / (BN(b) − BN(largest b))``, in %; "–" where the gap is under
    :data:`_MIN_GAP_POINTS` or under the spread of BN's seeds at either end."""
    sizes = sorted({k[2] for k in cells if k[0] == composition and k[1] == "bn"})
    if len(sizes) < 2:
        return ""
    if not any(k[0] == composition and k[1] != "bn" for k in cells):
        return ""
    large = float(np.mean(cells[(composition, "bn", sizes[-1])]))

    def clear(s: int) -> bool:  # BN's gap at b = s stands out of the noise
        ends = [cells[(composition, "bn", s)], cells[(composition, "bn", sizes[-1])]]
        noise = sum(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in ends)
        gap = float(np.mean(ends[0])) - large
        return gap >= max(_MIN_GAP_POINTS, noise)

    shown = [s for s in sizes[:-1] if clear(s)]
    if not shown:
        return ""
    left_out = [s for s in sizes[:-1] if s not in shown]
    note = (
        f"; b = {', '.join(map(str, left_out))} left out: BN's gap there is under "
        f"{_MIN_GAP_POINTS:.0f} points or its seeds' spread"
        if left_out
        else ""
    )
    lines = [f"gap recovered vs BN (BN@{sizes[-1]} = 100%, BN@b = 0%{note}):", ""]
    lines.append("| method | " + " | ".join(f"b={s}" for s in shown) + " |")
    lines.append("|---|" + "---|" * len(shown))
    for method in METHODS:
        if method == "bn" or (composition, method) not in labels:
            continue
        parts = []
        for s in shown:
            values = cells.get((composition, method, s))
            small = float(np.mean(cells[(composition, "bn", s)]))
            if values is None:
                parts.append("–")
            else:
                parts.append(f"{100 * (small - np.mean(values)) / (small - large):.0f}%")
        lines.append(f"| {labels[(composition, method)]} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


#: Method → (colour, marker) in the plot, the same in every panel and every run: MABN, the
#: figure's subject, in red; markers tell the lines apart without colour.
_STYLE: dict[str, tuple[str, str]] = {
    "bn": ("tab:blue", "o"),
    "brn": ("tab:orange", "s"),
    "gn": ("tab:green", "P"),
    "ln": ("tab:olive", "P"),
    "in": ("tab:cyan", "P"),
    "sn": ("tab:brown", "^"),
    "naive": ("tab:pink", "x"),
    "cbn": ("tab:purple", "D"),
    "mabn": ("tab:red", "v"),
    "shufflebn": ("tab:gray", "<"),
}


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test error after PreciseBN against the normalization batch size b, one panel per
    composition sharing the error axis, each method a line over its b (mean over seeds, bars
    from the lowest to the highest seed), as in the MABN authors' figure (Yan et al., ICLR
    2020).  A batch-independent method run at one b is a dashed flat line across the panel
    (its band: the seeds' range); BN at the largest b, the reference, a dotted line."""
    matplotlib = require("matplotlib", "the comparison plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    cells = _summary(rows, "error_precise")
    flat = _flat(rows)
    seeds = len({row["seed"] for row in rows})
    compositions = sorted({row["composition"] for row in rows})
    figure, axes = plt.subplots(
        1, len(compositions), figsize=(5.6 * len(compositions), 4.6), squeeze=False, sharey=True
    )
    for ax, composition in zip(axes[0], compositions, strict=True):
        sizes = sorted({k[2] for k in cells if k[0] == composition})
        for method in METHODS:
            points = sorted((k[2], v) for k, v in cells.items() if k[:2] == (composition, method))
            if not points:
                continue
            if (composition, method) in flat:
                values = points[0][1]
                ax.axhline(
                    float(np.mean(values)),
                    color=_STYLE[method][0],
                    linestyle="--",
                    label=f"{method} (batch-independent)",
                )
                ax.axhspan(min(values), max(values), color=_STYLE[method][0], alpha=0.12, lw=0)
                continue
            xs = [b for b, _ in points]
            means = np.array([np.mean(v) for _, v in points])
            low = means - np.array([min(v) for _, v in points])
            high = np.array([max(v) for _, v in points]) - means
            shade, marker = _STYLE[method]
            style = {"marker": marker, "capsize": 3, "color": shade, "label": method}
            ax.errorbar(xs, means, yerr=[low, high], **style)
        reference = cells.get((composition, "bn", sizes[-1]))
        if reference is not None and len(sizes) > 1:
            ax.axhline(
                float(np.mean(reference)),
                color=_STYLE["bn"][0],
                linestyle=":",
                linewidth=1,
                label=f"bn@{sizes[-1]} (reference)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(sizes[0] / 1.3, sizes[-1] * 1.3)
        ax.set_xlabel("normalization batch size b")
        ax.set_title(f"{composition} groups")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test error (%), after PreciseBN\nmean and range of {seeds} seed(s)")
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    # the methods in METHODS' order, the reference last
    order = {method: i for i, method in enumerate(METHODS)}
    legend = dict(sorted(legend.items(), key=lambda item: order.get(item[0].split()[0], 99)))
    figure.legend(
        legend.values(),
        legend.keys(),
        loc="lower center",
        ncol=min(len(legend), 4),
        fontsize=9,
        frameon=False,
    )
    rows_of_legend = math.ceil(len(legend) / 4)
    figure.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path
