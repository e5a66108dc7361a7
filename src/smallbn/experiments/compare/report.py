"""The comparison job's report: Markdown tables of test error by method and normalization
batch size, with the share of BN's small-batch gap each method recovers
(:func:`format_tables`), and the plot of error against normalization batch size
(:func:`plot_results`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smallbn._io import atomic_write
from smallbn._optional import require
from smallbn.experiments.compare.configs import METHODS

__all__ = ["format_tables", "plot_results"]


def _summary(
    rows: Iterable[dict[str, Any]], metric: str
) -> dict[tuple[str, str, int], list[float]]:
    cells: dict[tuple[str, str, int], list[float]] = {}
    for row in rows:
        cells.setdefault((row["composition"], row["method"], row["norm_batch"]), []).append(
            100 * row[metric]
        )
    return cells


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per composition, test error (%) mean ± std over seeds by method × batch,
    with EMA statistics and after PreciseBN, and how much of BN's small-batch gap each
    method recovers."""
    out = []
    seeds = sorted({row["seed"] for row in rows})
    for metric, label in (("error_precise", "after PreciseBN"), ("error_ema", "EMA statistics")):
        cells = _summary(rows, metric)
        for composition in sorted({row["composition"] for row in rows}):
            sizes = sorted({k[2] for k in cells if k[0] == composition})
            methods = [m for m in METHODS if any(k[:2] == (composition, m) for k in cells)]
            out.append(
                f"**{composition} groups — test error (%), {label}, mean ± std over "
                f"{len(seeds)} seed(s)**\n"
            )
            out.append("| method | " + " | ".join(f"b={s}" for s in sizes) + " |")
            out.append("|---|" + "---|" * len(sizes))
            for method in methods:
                out.append(
                    f"| {method} | "
                    + " | ".join(_cell(cells.get((composition, method, s))) for s in sizes)
                    + " |"
                )
            out.append("")
            gap = _gap_table(cells, composition)
            if gap:
                out.extend([gap, ""])
    return "\n".join(out)


def _gap_table(cells: dict[tuple[str, str, int], list[float]], composition: str) -> str:
    """Share of the gap BN(b) − BN(largest b) that each method closes at batch b."""
    sizes = sorted({k[2] for k in cells if k[0] == composition and k[1] == "bn"})
    if len(sizes) < 2:
        return ""
    if not any(k[0] == composition and k[1] != "bn" for k in cells):
        return ""
    large = float(np.mean(cells[(composition, "bn", sizes[-1])]))
    lines = [f"gap recovered vs BN (BN@{sizes[-1]} = 100%, BN@b = 0%):", ""]
    lines.append("| method | " + " | ".join(f"b={s}" for s in sizes[:-1]) + " |")
    lines.append("|---|" + "---|" * (len(sizes) - 1))
    for method in METHODS:
        if method == "bn" or not any(k[:2] == (composition, method) for k in cells):
            continue
        parts = []
        for s in sizes[:-1]:
            values = cells.get((composition, method, s))
            small = float(np.mean(cells[(composition, "bn", s)]))
            if values is None or small - large <= 0:
                parts.append("–")
            else:
                parts.append(f"{100 * (small - np.mean(values)) / (small - large):.0f}%")
        lines.append(f"| {method} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Error (after PreciseBN) against normalization batch size, one line per method, one
    panel per composition (the MABN paper's figure)."""
    matplotlib = require("matplotlib", "the comparison plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _summary(rows, "error_precise")
    compositions = sorted({row["composition"] for row in rows})
    figure, axes = plt.subplots(
        1, len(compositions), figsize=(6 * len(compositions), 4.2), squeeze=False
    )
    for ax, composition in zip(axes[0], compositions, strict=True):
        for method in METHODS:
            points = sorted((k[2], v) for k, v in cells.items() if k[:2] == (composition, method))
            if not points:
                continue
            xs = [p[0] for p in points]
            means = [float(np.mean(p[1])) for p in points]
            stds = [float(np.std(p[1])) for p in points]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("normalization batch size")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{composition} groups")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path
