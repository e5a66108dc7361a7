"""Options of the benchmark suite (``pytest benchmarks/``; the default test run, on tests/,
does not collect it).

    .venv/bin/pytest benchmarks/ -v --bench-threads 2 --bench-output runs/bench-suite
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smallbn.bench.harness import Settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smallbn-bench", "smallbn benchmark suite")
    group.addoption("--bench-repeats", type=int, default=None, help="timed calls per method")
    group.addoption("--bench-warmup", type=int, default=None, help="untimed calls first")
    group.addoption("--bench-threads", type=int, default=2, help="torch.set_num_threads")
    group.addoption("--bench-device", default="cpu", help="cpu, cuda, ...")
    group.addoption(
        "--bench-output", default="runs/bench-suite", help="folder for the JSON/Markdown reports"
    )


def _settings(config: pytest.Config, repeats: int, warmup: int) -> Settings:
    given_repeats = config.getoption("--bench-repeats")
    given_warmup = config.getoption("--bench-warmup")
    return Settings(
        repeats=repeats if given_repeats is None else given_repeats,
        warmup=warmup if given_warmup is None else given_warmup,
        threads=config.getoption("--bench-threads"),
        device=config.getoption("--bench-device"),
    )


@pytest.fixture
def layer_settings(pytestconfig: pytest.Config) -> Settings:
    """The settings of ``smallbn bench layers`` (50 repeats after 5 warm-up by default)."""
    return _settings(pytestconfig, 50, 5)


@pytest.fixture
def network_settings(pytestconfig: pytest.Config) -> Settings:
    """The settings of ``smallbn bench network`` (20 repeats after 3 warm-up by default)."""
    return _settings(pytestconfig, 20, 3)


@pytest.fixture
def bench_output(pytestconfig: pytest.Config) -> Path:
    """Where the suite writes its reports."""
    return Path(pytestconfig.getoption("--bench-output"))
