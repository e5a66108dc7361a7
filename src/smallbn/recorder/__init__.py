"""Record the batch statistics of norm layers during training, forward and backward.

Yan et al. (ICLR 2020, "Towards Stabilizing Batch Statistics in Backward Propagation of
Batch Normalization", the MABN paper) show that BN's trouble at small batch is not only the
noise of the forward statistics but also that of two *backward* statistics.  For a BN layer
``y = γ x̂ + β``, ``x̂ = (x − μ_B)/sqrt(σ²_B + eps)``, with ``ĝ = (∂L/∂y)·γ`` the gradient
w.r.t. ``x̂``, the input gradient is

    ∂L/∂x = (ĝ − g_B − x̂ · Ψ_B) / sqrt(σ²_B + eps),   g_B = E_R[ĝ],   Ψ_B = E_R[ĝ · x̂],

so four per-channel statistics over the reduction set ``R = (N, *spatial)`` are estimated
from the batch at every iteration: ``μ_B = E_R[x]`` and ``σ²_B = E_R[x²] − μ_B²`` forward,
``g_B`` and ``Ψ_B`` backward.  The authors plot the four over training at batch 2 and 32;
:class:`StatsRecorder` records them for any layers of any model, :func:`plot_stats` draws that
figure for several runs and :func:`fluctuation` / :func:`summarize_fluctuation` put numbers on
it.

Typical use::

    with StatsRecorder(model, ["stages.0.bn2"], label="batch 2") as recorder:
        train(model)
    recorder.save("runs/batch2.pt")
    plot_stats({"batch 2": Recording.load("runs/batch2.pt"), ...}, "stages.0.bn2", "stats.png")

The recorder costs nothing when off: hooks exist only inside the ``with`` block, and only
forwards in training mode are recorded.

Where things are: :mod:`.stats_recorder` (the hooks that record), :mod:`.recording` (what a
recording holds, and its files), :mod:`.analysis` (fluctuation numbers, table and figure).
"""

from smallbn.recorder.analysis import (
    fluctuation,
    format_fluctuation_table,
    plot_stats,
    summarize_fluctuation,
)
from smallbn.recorder.recording import STATISTIC_LABELS, STATISTICS, LayerStats, Recording
from smallbn.recorder.stats_recorder import StatsRecorder

__all__ = [
    "STATISTICS",
    "STATISTIC_LABELS",
    "LayerStats",
    "Recording",
    "StatsRecorder",
    "fluctuation",
    "format_fluctuation_table",
    "plot_stats",
    "summarize_fluctuation",
]
