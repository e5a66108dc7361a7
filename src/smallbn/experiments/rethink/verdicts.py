"""What every study's report shares: a :class:`Finding` of the paper with the verdict this
run's numbers give it (by the rule of :func:`_beats` and :data:`TOLERANCE`), and the small
formatting pieces of the reports (settings line, table cells)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: Test-error differences (percentage points) within which two settings count as equal in
#: the verdicts: about twice the standard error of an error near 10% on 10,000 test images.
TOLERANCE = 0.5


@dataclass(frozen=True)
class Finding:
    """One finding of the paper and what this run measured: ``reproduced`` is computed from
    the numbers (None: the rows cannot decide it, e.g. a setting that was not run).  A claim
    that one setting beats another is reproduced only when the difference exceeds
    :data:`TOLERANCE`; ``tie`` marks a difference within it (not reproduced: no effect)."""

    paper: str
    measured: str
    reproduced: bool | None
    tie: bool = False


def _beats(lower: float, higher: float) -> dict[str, bool]:
    """``reproduced``/``tie`` of the claim "``lower`` is below ``higher``" (percentage points):
    reproduced when by more than :data:`TOLERANCE`, a tie when within it."""
    return {"reproduced": lower < higher - TOLERANCE, "tie": abs(lower - higher) <= TOLERANCE}


def _pct(values: Iterable[float]) -> list[float]:
    return [100 * v for v in values]


def _last(values: Sequence[float], epochs: int | None = None) -> list[float]:
    """The last half of the epochs (at least 2), where the spread is measured."""
    count = max(2, len(values) // 2) if epochs is None else epochs
    return list(values[-count:])


def _verdict(finding: Finding) -> str:
    if finding.reproduced is None:
        return "–"
    if finding.reproduced:
        return "yes"
    return f"**no** (a tie, within {TOLERANCE} points)" if finding.tie else "**no**"


def _settings(rows: Sequence[dict[str, Any]]) -> str:
    row = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    return (
        f"{row['dataset']}, {row['train_samples_used']} training images, {row['epochs']} "
        f"epochs, SGD batch {row['sgd_batch']}, peak learning rate {row['lr']} "
        f"({row['schedule']} after {row['warmup']:.0%} warm-up), SmallResNet "
        f"{'/'.join(map(str, row['widths']))}, PreciseBN over {row['precise_samples']} "
        f"samples, test error on {row['eval_samples']} test images, seeds "
        f"{', '.join(map(str, seeds))}"
    )


def _cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"
