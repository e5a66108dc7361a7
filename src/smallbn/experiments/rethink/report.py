"""Each study's report (``results.md``: settings, numbers, and the paper's findings with the
verdicts of :func:`findings`) and figure (``<study>.png``).  The study modules write their
own tables, findings and figures; this module dispatches to them and adds what every report
has."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from smallbn._io import atomic_write
from smallbn._optional import require
from smallbn.experiments.rethink import domain, ema, inconsistency, leakage
from smallbn.experiments.rethink.config import STUDIES
from smallbn.experiments.rethink.verdicts import TOLERANCE, Finding, _verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class _Reporting(NamedTuple):
    """What a study module provides for its report."""

    findings: Callable[[Sequence[dict[str, Any]]], list[Finding]]
    #: the settings and the numbers as Markdown lines, given the rows and the seed count
    table: Callable[[Sequence[dict[str, Any]], int], list[str]]
    plot: Callable[[Sequence[dict[str, Any]]], Figure]


_REPORTING = {
    "ema": _Reporting(ema._ema_findings, ema._report, ema._plot),
    "inconsistency": _Reporting(
        inconsistency._inconsistency_findings, inconsistency._report, inconsistency._plot
    ),
    "domain": _Reporting(domain._domain_findings, domain._report, domain._plot),
    "leakage": _Reporting(leakage._leakage_findings, leakage._report, leakage._plot),
}


def _reporting(study: str) -> _Reporting:
    if study not in _REPORTING:
        raise ValueError(f"unknown study '{study}' (one of {', '.join(STUDIES)})")
    return _REPORTING[study]


def findings(study: str, rows: Sequence[dict[str, Any]]) -> list[Finding]:
    """What the paper found in ``study`` and whether ``rows`` reproduce it, each decided from
    the numbers (means over seeds): "A beats B" when A is better by more than
    :data:`TOLERANCE` points (a smaller difference is a tie, not an effect); "enough" and "as
    good as" claims hold within the tolerance."""
    return _reporting(study).findings(rows)


def _findings_table(study: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| the paper found | this run | reproduced |", "|---|---|---|"]
    for f in findings(study, rows):
        out.append(f"| {f.paper} | {f.measured} | {_verdict(f)} |")
    return out


def format_report(study: str, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: the settings, the numbers, and the paper's findings with the verdicts."""
    if not rows:
        return f"**{study}**: no results"
    seeds = len({r["seed"] for r in rows})
    out = _reporting(study).table(rows, seeds)
    out.append("")
    out.append(
        f"What the paper (Wu & Johnson 2021) found, and whether this run reproduces it, decided "
        f"from the numbers above (means over seeds): a claim that one setting beats another "
        f"counts as reproduced when the difference exceeds {TOLERANCE} points:"
    )
    out.append("")
    out.extend(_findings_table(study, rows))
    return "\n".join(out)


def plot_study(study: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The study's figure (PNG)."""
    plot = _reporting(study).plot
    matplotlib = require("matplotlib", "the rethink plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plot(rows)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path


def write_report(study: str, rows: Sequence[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    """``results.md`` and ``<study>.png`` of ``rows`` in ``folder``."""
    text = format_report(study, rows)
    report = atomic_write(folder / "results.md", lambda handle: handle.write(f"{text}\n".encode()))
    return report, plot_study(study, rows, folder / f"{study}.png")
