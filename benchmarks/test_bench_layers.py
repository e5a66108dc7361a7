"""``smallbn bench layers`` as a test suite: each default shape, every method, against BN.

Reports go to ``<--bench-output>/layers-<shape>/layers.{json,md}``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from smallbn.bench.harness import Settings
from smallbn.bench.layers import CONTROL, DEFAULT_SHAPES, run_layers
from smallbn.bench.methods import DEFAULT_METHODS
from smallbn.bench.report import format_table, write_report

pytestmark = pytest.mark.bench


@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layers(
    shape: tuple[int, int, int, int], layer_settings: Settings, bench_output: Path
) -> None:
    report = run_layers(DEFAULT_METHODS, [shape], layer_settings)
    print("\n" + format_table(report))
    write_report(report, bench_output / f"layers-{'x'.join(map(str, shape))}")
    assert {row.method for row in report.rows} == {*DEFAULT_METHODS, CONTROL}
    for row in report.rows:
        for value in (row.train_ms, row.train_ratio, row.eval_ms, row.eval_ratio):
            assert math.isfinite(value) and value > 0, row
