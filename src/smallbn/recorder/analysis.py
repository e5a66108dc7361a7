"""What a recording shows: how much each statistic fluctuates over iterations
(:func:`fluctuation`, :func:`summarize_fluctuation`, :func:`format_fluctuation_table`) and
the figure of the four statistics against the iteration for several runs
(:func:`plot_stats`, Figure 2 of Yan et al., ICLR 2020)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from smallbn._io import atomic_write
from smallbn._optional import require
from smallbn.recorder.recording import STATISTIC_LABELS, STATISTICS, LayerStats, Recording


def _detrended(values: Tensor, window: int | None) -> Tensor:
    """``values`` (``(T, K)``) minus a centred moving average of ``window`` iterations.

    Statistics drift as the weights train; the moving average removes that slow part so
    that what remains is the iteration-to-iteration noise the batch size causes.  The first
    and last ``window // 2`` iterations, without a full window, are dropped.
    """
    if window is None or window <= 1:
        return values
    t = values.shape[0]
    if t < window:
        return values[:0]
    kernel = torch.full((1, 1, window), 1.0 / window, dtype=torch.float64)
    series = values.to(torch.float64).T.unsqueeze(1)  # (K, 1, T)
    trend = torch.nn.functional.conv1d(series, kernel).squeeze(1).T  # (T - window + 1, K)
    half = window // 2
    return values[half : half + trend.shape[0]].to(torch.float64) - trend


def fluctuation(
    stats: LayerStats | Recording,
    layer: str | None = None,
    channel: int | None = None,
    *,
    window: int | None = None,
    skip: int = 0,
) -> dict[str, float]:
    """How much each statistic fluctuates over iterations: ``{name: value}``.

    For every recorded channel (or only ``channel``) the standard deviation over iterations
    of the statistic (``std_t s_t``, NaN iterations ignored), averaged over channels.  With
    ``window``, the deviation from a centred moving average of that many iterations is used
    instead, which removes the slow drift from training; ``skip`` drops the first iterations.
    NaN when fewer than two iterations remain.
    """
    if isinstance(stats, Recording):
        if layer is None:
            if len(stats.layers) != 1:
                raise ValueError("fluctuation: the recording has several layers; pass layer=")
            layer = next(iter(stats.layers))
        stats = stats[layer]
    result = {}
    for name in STATISTICS:
        values = stats.statistic(name)[skip:]
        if channel is not None:
            values = values[:, stats._position(channel) : stats._position(channel) + 1]
        values = _detrended(values.to(torch.float64), window)
        finite = values.isfinite()
        count = finite.sum(dim=0)
        zeroed = torch.where(finite, values, torch.zeros_like(values))
        mean = zeroed.sum(dim=0) / count.clamp_min(1)
        var = torch.where(finite, values - mean, torch.zeros_like(values)).square().sum(dim=0)
        std = (var / (count - 1).clamp_min(1)).sqrt()
        valid = count >= 2
        result[name] = float(std[valid].mean()) if bool(valid.any()) else math.nan
    return result


def summarize_fluctuation(
    records: Mapping[str, Recording],
    layer: str,
    channel: int | None = None,
    *,
    window: int | None = None,
    skip: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`fluctuation` of ``layer`` for every run: ``{run label: {statistic: value}}``."""
    return {
        label: fluctuation(record, layer, channel, window=window, skip=skip)
        for label, record in records.items()
    }


def format_fluctuation_table(summary: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A Markdown table of :func:`summarize_fluctuation`: one column per run, then the ratio
    of the first run's fluctuation to the last's (e.g. batch 2 / batch 32)."""
    runs = list(summary)
    header = ["statistic", *(f"std ({run})" for run in runs)]
    if len(runs) >= 2:
        header.append(f"ratio {runs[0]} / {runs[-1]}")
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in STATISTICS:
        values = [summary[run][name] for run in runs]
        cells = [STATISTIC_LABELS[name], *(f"{v:.4g}" for v in values)]
        if len(runs) >= 2:
            last = values[-1]
            cells.append(f"{values[0] / last:.2f}" if last > 0 else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_stats(
    records: Mapping[str, Recording],
    layer: str,
    path: str | os.PathLike[str],
    channel: int | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Plot ``μ_B``, ``σ²_B``, ``g_B``, ``Ψ_B`` of ``layer`` against the iteration, one
    line per run (the mapping's keys label them), in four panels; writes a PNG atomically.

    Each line is the channel average (``channel=None``) or one channel of the layer, as in
    Figure 2 of Yan et al. (ICLR 2020), which compares batch 2 with batch 32.  Uses
    matplotlib's Agg canvas directly, so neither pyplot nor the global backend is touched.
    """
    require("matplotlib", "plot_stats")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not records:
        raise ValueError("plot_stats: no recordings to plot")
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    # The noisiest curve (usually the smallest batch) first, so the smoother ones stay
    # visible on top of it.
    order = sorted(records, key=lambda run: _iteration_noise(records[run][layer]), reverse=True)
    colors = {run: f"C{i}" for i, run in enumerate(records)}
    flags = {bool(record.metadata.get("scale_grad_by_batch")) for record in records.values()}
    scaled = {frozenset([True]): " (∂L/∂y × N)", frozenset([False]): ""}.get(
        frozenset(flags), " (∂L/∂y × N in some runs only)"
    )
    lines: dict[str, Line2D] = {}  # the first panel's line of each run, for the legend
    for ax, name in zip(axes, STATISTICS, strict=True):
        for run in order:
            series = records[run][layer].channel_series(name, channel).numpy()
            steps = np.arange(1, len(series) + 1)
            (line,) = ax.plot(steps, series, color=colors[run], linewidth=0.8, alpha=0.85)
            lines.setdefault(run, line)
        ax.set_title(STATISTIC_LABELS[name] + (scaled if name.startswith("grad") else ""))
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in axes[2:]:
        ax.set_xlabel("iteration")
    # Handles kept per run rather than read back with get_legend_handles_labels(), which
    # skips artists whose label starts with "_" (matplotlib's "hide from legend" marker),
    # so a run named "_baseline" would be missing from it.
    axes[0].legend([lines[run] for run in records], list(records), loc="best")
    what = "mean over channels" if channel is None else f"channel {channel}"
    figure.suptitle(title or f"Batch statistics of {layer} ({what})")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    target = Path(path)
    atomic_write(target, lambda handle: handle.write(buffer.getvalue()))
    return target


def _iteration_noise(stats: LayerStats) -> float:
    """Mean absolute iteration-to-iteration change of the channel-averaged ``μ_B``."""
    series = stats.channel_series("mean")
    if series.numel() < 2:
        return 0.0
    value = float(series.diff().abs().nanmean())
    return 0.0 if math.isnan(value) else value
