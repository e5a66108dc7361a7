"""The timing harness measures every variant, interleaved, with ratios to the baseline."""

import pytest
import torch
from torch import nn

from smallbn.bench import (
    Settings,
    conv_block,
    time_eval_forwards,
    time_steps,
    time_training_steps,
)


def test_harness_reports_each_variant_and_ratio_to_baseline():
    timings = time_training_steps(
        {
            "bn": lambda: conv_block(nn.BatchNorm2d(4), 4),
            "same": lambda: conv_block(nn.BatchNorm2d(4), 4),
            "heavier": lambda: nn.Sequential(*[conv_block(nn.BatchNorm2d(4), 4) for _ in range(6)]),
        },
        (2, 4, 16, 16),
        baseline="bn",
        repeats=15,
        warmup=2,
        threads=1,
    )
    by = {t.name: t for t in timings}
    assert len(by["bn"].seconds) == 15 and by["bn"].ratio == 1.0
    assert by["heavier"].ratio > 2 * by["same"].ratio


class _Probe(nn.Module):
    """Records the mode and grad state of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.lin(x)


def test_eval_forwards_run_in_eval_mode_without_grad_and_training_steps_with_both():
    probes: dict[str, _Probe] = {}

    def make(name):
        return lambda: probes.setdefault(name, _Probe())

    time_eval_forwards({"a": make("a"), "b": make("b")}, (2, 3), baseline="a", repeats=3, warmup=1)
    assert probes["a"].calls == [(False, False)] * 4 and len(probes["b"].calls) == 4
    time_training_steps({"c": make("c")}, (2, 3), baseline="c", repeats=2, warmup=0)
    assert probes["c"].calls == [(True, True)] * 2
    assert probes["c"].lin.weight.grad is not None


def test_time_steps_interleaves_and_rejects_an_unknown_baseline():
    order: list[str] = []
    timings = time_steps(
        {"x": lambda: order.append("x"), "y": lambda: order.append("y")},
        baseline="x",
        repeats=3,
        warmup=1,
    )
    assert order == ["x", "y", "x", "y", "y", "x", "x", "y"]  # the order rotates per repeat
    assert [len(t.seconds) for t in timings] == [3, 3]
    with pytest.raises(KeyError, match="baseline 'z'"):
        time_steps({"x": lambda: None}, baseline="z")


def test_settings_are_checked_and_recorded():
    record = Settings(repeats=3, warmup=0, threads=1, seed=7).record()
    assert record["repeats"] == 3 and record["seed"] == 7 and record["device"] == "cpu"
    assert record["torch"] == torch.__version__ and "cpu" in record and "load_average" in record
    with pytest.raises(ValueError, match="repeats >= 1"):
        Settings(repeats=0)


def test_quartiles_match_numpy_linear_percentiles():
    import numpy as np

    from smallbn.bench.harness import quartiles

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    expected = np.percentile(values, [25, 50, 75])  # numpy's default "linear" = inclusive
    assert quartiles(values) == pytest.approx(tuple(expected))
    assert quartiles([2.5]) == (2.5, 2.5, 2.5)


def test_write_json_is_atomic_and_creates_folders(tmp_path):
    import json

    from smallbn.bench.report import write_json

    path = write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temporary left behind
