"""``smallbn bench network`` as a test suite: the comparison job's ResNet at batch 32 with
every method, unfolded and folded, against BN.  Report: ``<--bench-output>/network/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallbn.bench.harness import Settings
from smallbn.bench.methods import DEFAULT_METHODS
from smallbn.bench.network import run_network
from smallbn.bench.report import format_table, write_report

pytestmark = pytest.mark.bench

#: Methods that normalize each sample by its own statistics at inference: nothing to fold.
PER_SAMPLE = {"gn", "ln", "in", "sn"}


def test_network(network_settings: Settings, bench_output: Path) -> None:
    report = run_network(DEFAULT_METHODS, 32, network_settings)
    print("\n" + format_table(report))
    write_report(report, bench_output / "network")
    by = {row.method: row for row in report.rows}
    assert set(by) == set(DEFAULT_METHODS)
    assert {m for m, row in by.items() if row.folded_ratio is None} == PER_SAMPLE
    for row in report.rows:
        assert row.train_images_per_s > 0 and row.eval_images_per_s > 0
