"""set_finite_check's modes: strict per step, deferred (a device-side flag read every
``interval`` calls, in eval() and in check_finite), auto (strict on CPU), off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import smallbn


@pytest.fixture
def restore_mode() -> Iterator[None]:
    old = smallbn.set_finite_check("auto", interval=100)
    yield
    smallbn.set_finite_check(old, interval=100)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        smallbn.BatchRenorm2d(3, warmup_steps=0),
        nn.Conv2d(3, 3, 1),
        smallbn.GhostBatchNorm2d(3, group_size=2),
    )


def _nan_at(step: int, steps: int) -> list[torch.Tensor]:
    batches = [torch.randn(4, 3, 5, 5) for _ in range(steps)]
    batches[step][0, 1, 2, 2] = float("nan")
    return batches


def test_auto_on_cpu_raises_at_the_step_naming_the_layer_and_channel(restore_mode: None):
    model = _model()
    batches = _nan_at(2, 4)
    model(batches[0]), model(batches[1])
    with pytest.raises(FloatingPointError, match=r"BatchRenorm2d\(3\).*channel\(s\) \[1\]"):
        model(batches[2])
    assert int(model[0].num_batches_tracked) == 2  # the rejected step left no trace


def test_deferred_records_on_the_device_and_raises_at_the_interval(restore_mode: None):
    smallbn.set_finite_check("deferred", interval=4)
    model = _model()
    batches = _nan_at(1, 4)
    for x in batches[:3]:
        model(x)  # the NaN of call 2 is only recorded
    assert int(model[0]._nonfinite_call) == 2
    with pytest.raises(
        FloatingPointError, match=r"BatchRenorm2d\(3\).*training call 2 .*set_finite_check"
    ):
        model(batches[3])  # the 4th call reads the flag


def test_deferred_is_read_when_leaving_training(restore_mode: None):
    smallbn.set_finite_check("deferred")
    model = _model()
    for x in _nan_at(0, 2):
        model(x)
    with pytest.raises(FloatingPointError, match="BatchRenorm2d.*training call 1"):
        model.eval()


def test_check_finite_names_the_earliest_call_then_the_first_layer(restore_mode: None):
    smallbn.set_finite_check("deferred")
    model = _model()
    x = torch.randn(4, 3, 5, 5)
    model(x)
    smallbn.check_finite(model)  # nothing recorded: no error
    model[2](torch.full((4, 3, 5, 5), float("inf")))  # layer '2' at its call 2
    model[0](torch.full((4, 3, 5, 5), float("nan")))  # layer '0' at its call 2 too
    with pytest.raises(FloatingPointError, match=r"at '0'.*training call 2"):
        smallbn.check_finite(model)


def test_off_checks_nothing(restore_mode: None):
    smallbn.set_finite_check(False)
    model = _model()
    model(torch.full((4, 3, 5, 5), float("nan")))
    smallbn.check_finite(model)
    assert int(model[0]._nonfinite_call) == -1


def test_modes_are_validated(restore_mode: None):
    with pytest.raises(ValueError, match="mode must be one of"):
        smallbn.set_finite_check("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval must be >= 1"):
        smallbn.set_finite_check("deferred", interval=0)
    assert smallbn.set_finite_check(True) == "auto"
    assert smallbn.set_finite_check("step") == "auto"
    assert smallbn.set_finite_check("off") == "step"


def test_the_flags_are_not_saved_and_follow_the_module(restore_mode: None):
    layer = smallbn.BatchRenorm2d(3)
    assert not any("nonfinite" in k or "training_calls" in k for k in layer.state_dict())
    assert layer.to(torch.float64)._nonfinite_call.dtype == torch.long


def test_a_layer_checking_twice_per_call_counts_one_call(restore_mode: None):
    # half-precision MABN checks χ² and then the narrower running variance in one call
    smallbn.set_finite_check("deferred")
    layer = smallbn.MovingAverageBatchNorm2d(3, window=2, warmup=0).to(torch.bfloat16)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)
        if step == 2:
            x[0, 1] = float("nan")
        layer(x)
    assert int(layer._training_calls) == 3
    with pytest.raises(FloatingPointError, match="training call 3"):
        smallbn.check_finite(layer)
