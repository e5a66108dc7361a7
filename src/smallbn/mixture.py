"""What Switchable Normalization learned: the softmax importance of IN, LN and BN statistics
per layer, for the mean and the variance (Luo et al., 2018, Fig. 1/7: the ratios of IN/LN/BN
importance per layer), as a table and a plot."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from smallbn._io import atomic_write
from smallbn._optional import require
from smallbn.layers import SwitchableNorm

__all__ = ["format_mixture_table", "mixture_weights", "plot_mixture"]


def mixture_weights(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """Layer name → ``{"mean": {"in": w, "ln": w, "bn": w}, "var": {...}}`` for every
    :class:`~smallbn.SwitchableNorm` of ``model`` (branches a layer lacks are omitted)."""
    return {name: m.mixture() for name, m in model.named_modules() if isinstance(m, SwitchableNorm)}


def format_mixture_table(model: nn.Module) -> str:
    """A Markdown table of :func:`mixture_weights`."""
    weights = mixture_weights(model)
    lines = [
        "| layer | mean: IN | LN | BN | var: IN | LN | BN |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, mix in weights.items():
        cells = [
            f"{mix[kind][branch]:.2f}" if branch in mix[kind] else "–"
            for kind in ("mean", "var")
            for branch in ("in", "ln", "bn")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_mixture(model: nn.Module, path: Path | str) -> Path:
    """Stacked bars of IN/LN/BN importance per layer, for mean and variance (PNG)."""
    matplotlib = require("matplotlib", "plot_mixture")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = mixture_weights(model)
    if not weights:
        raise ValueError("plot_mixture: the model has no SwitchableNorm layer")
    names = list(weights)
    figure, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(names) + 2), 6), sharex=True)
    colors = {"in": "tab:blue", "ln": "tab:orange", "bn": "tab:green"}
    for ax, kind in zip(axes, ("mean", "var"), strict=True):
        bottom = [0.0] * len(names)
        for branch in ("in", "ln", "bn"):
            values = [weights[n][kind].get(branch, 0.0) for n in names]
            ax.bar(
                range(len(names)), values, bottom=bottom, color=colors[branch], label=branch.upper()
            )
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel(f"{kind} importance")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    figure.suptitle("Switchable Normalization: learned importance of IN / LN / BN")
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path
