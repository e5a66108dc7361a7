"""The harness's own noise: two runs of the same measurement give ratios to BN within 10% of
each other, for every method (training step and eval forward, at N=2, C=64, 56×56).

Reports: ``<--bench-output>/noise/run{1,2}/layers.{json,md}``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smallbn.bench.harness import Settings
from smallbn.bench.layers import run_layers
from smallbn.bench.methods import DEFAULT_METHODS
from smallbn.bench.report import write_report

pytestmark = pytest.mark.bench

SHAPE = (2, 64, 56, 56)
TOLERANCE = 0.10


def test_two_runs_agree_within_ten_percent(layer_settings: Settings, bench_output: Path) -> None:
    runs = []
    for index in (1, 2):
        report = run_layers(DEFAULT_METHODS, [SHAPE], layer_settings)
        write_report(report, bench_output / "noise" / f"run{index}")
        runs.append({row.method: row for row in report.rows})
    first, second = runs
    lines, bad = [], []
    for method, row in first.items():
        for kind in ("train", "eval"):
            a, b = getattr(row, f"{kind}_ratio"), getattr(second[method], f"{kind}_ratio")
            change = abs(b - a) / a
            lines.append(f"{method:<11} {kind:<5} {a:6.3f} {b:6.3f} {100 * change:5.1f}%")
            if change >= TOLERANCE:
                bad.append(lines[-1])
    print("\nmethod      kind   run 1  run 2  change\n" + "\n".join(lines))
    assert not bad, "ratios moved by 10% or more between two runs:\n" + "\n".join(bad)
