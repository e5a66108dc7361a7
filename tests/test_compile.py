"""Every method under ``torch.compile(fullgraph=True)`` (inductor) equals eager (issue 23).

For each registered method, a block ``Conv2d → norm → ReLU`` as :func:`smallbn.convert` makes
it is compiled whole (``fullgraph=True``: any graph break is an error) and run beside an eager
copy:

* three training steps (forward, backward, an SGD update outside the graph): the outputs, the
  input's and every parameter's gradients and every buffer (running statistics, step counts,
  windows) equal eager's;
* two eval steps (no gradient): the outputs equal eager's;
* no recompilation: one compiled graph for the training steps and one for eval (a Python int
  that changes per step would recompile; the compile counter sees it);
* the default finite check (``"auto"``) is deferred under compile: no host read in the
  graph, and a NaN batch in a compiled training step is reported by
  :func:`smallbn.check_finite` afterwards.

The float32 graphs may fuse and reorder sums, hence the tolerance below.  Extra cases run the
per-group paths (BRN's and SN's ``norm_batch_size``, a :class:`smallbn.GroupedNorm`), which
go through :func:`smallbn.stats.normalize_from_sample_moments` like Ghost BN and SN.

Compiling takes 10-40 s per case on a 2-core CPU: shapes are tiny, and dynamo is reset
between cases.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import smallbn

#: Options that make each method do all it does in a step: Ghost BN in groups of two, BRN
#: past its warm-up with r_max/d_max still ramping (so r and d clip and change per step),
#: CBN with a full window, MABN past its warm-up.
OPTIONS: dict[str, dict[str, Any]] = {
    "ghostbn": {"group_size": 2},
    "brn": {"warmup_steps": 0, "r_max_ramp_end": 4, "d_max_ramp_end": 4},
    "cbn": {"window": 3, "burnin": 0},
    "mabn": {"window": 2, "warmup": 0},
}

#: Methods without a batch-statistics finite check in training (torch's BN, which "bn"
#: converts to; frozen statistics).
UNCHECKED = {"bn", "frozenbn"}

#: float32 compiled vs eager: the compiler may fuse and reorder float32 sums.
TOL = dict(rtol=1e-5, atol=1e-5)
#: The device-side bookkeeping of the deferred finite check: eager on CPU checks every step
#: on the host ("auto"), so only the compiled copy counts calls there.
_FINITE_BOOKKEEPING = ("_training_calls", "_nonfinite_call")

N, C_IN, C, SIZE = 4, 3, 8, 5
STEPS = 3
LR = 0.1


def _block(norm: str | Callable[[nn.Module], nn.Module], options: dict[str, Any]) -> nn.Module:
    """Conv2d → BatchNorm2d → ReLU converted to ``norm`` (a method name), or with the norm
    replaced by ``norm(bn)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C_IN, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
    if callable(norm):
        model[1] = norm(model[1])
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", smallbn.ConversionWarning)
        return smallbn.convert(model, norm, **options)


def _grouped(bn: nn.Module) -> nn.Module:
    return smallbn.GroupedNorm(smallbn.BatchRenorm2d(C, warmup_steps=0), group_size=2)


CASES = [
    pytest.param(method, method, OPTIONS.get(method, {}), id=method)
    for method in smallbn.available_norms()
] + [
    pytest.param("brn", "brn", {"warmup_steps": 0, "norm_batch_size": 2}, id="brn-groups"),
    pytest.param("sn", "sn", {"norm_batch_size": 2}, id="sn-groups"),
    pytest.param("brn", _grouped, {}, id="grouped-brn"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    old = smallbn.set_finite_check("auto")
    yield
    smallbn.set_finite_check(old)
    torch._dynamo.reset()


def _inputs(seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C_IN, SIZE, SIZE, generator=generator) * 2 + 0.5
    return x, torch.randn(N, C, SIZE, SIZE, generator=generator)


def _train_step(model: Callable[[Tensor], Tensor], x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * g).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad


def _assert_close(actual: Tensor, expected: Tensor, label: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{label}: {m}")


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _compare_state(compiled: nn.Module, eager: nn.Module, what: str) -> float:
    """Parameters, their gradients and the buffers of both equal; the largest difference."""
    worst = 0.0
    for (name, a), (_, b) in zip(
        compiled.named_parameters(), eager.named_parameters(), strict=True
    ):
        _assert_close(a, b, f"{name}, {what}")
        assert (a.grad is None) == (b.grad is None), f"{name}.grad, {what}"
        if a.grad is not None:
            _assert_close(a.grad, b.grad, f"{name}.grad, {what}")
            worst = max(worst, _max_diff(a.grad, b.grad))
    for (name, a), (_, b) in zip(compiled.named_buffers(), eager.named_buffers(), strict=True):
        if name.rpartition(".")[2] in _FINITE_BOOKKEEPING:
            continue
        if a.is_floating_point():
            _assert_close(a, b, f"buffer {name}, {what}")
            worst = max(worst, _max_diff(a, b))
        else:
            assert torch.equal(a, b), f"buffer {name}, {what}: {a} != {b}"
    return worst


@torch.no_grad()
def _sgd(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.sub_(LR * p.grad)
            p.grad = None


@pytest.mark.parametrize("method,norm,options", CASES)
def test_compiled_training_and_eval_steps_equal_eager(
    method: str,
    norm: str | Callable[[nn.Module], nn.Module],
    options: dict[str, Any],
    record_property: Callable[[str, object], None],
) -> None:
    eager = _block(norm, options)
    module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    worst, seconds = 0.0, {}
    for step in range(STEPS):
        x, g = _inputs(step)
        y_eager, gx_eager = _train_step(eager, x, g)
        start = time.perf_counter()
        y, gx = _train_step(compiled, x, g)
        seconds.setdefault("train", time.perf_counter() - start)
        what = f"training step {step}"
        _assert_close(y, y_eager, f"output, {what}")
        _assert_close(gx, gx_eager, f"input grad, {what}")
        worst = max(worst, _max_diff(y, y_eager), _max_diff(gx, gx_eager))
        worst = max(worst, _compare_state(module, eager, what))
        _sgd(eager)
        _sgd(module)
        assert counter.frame_count == 1, f"recompiled at training step {step}"
    eager.eval()
    module.eval()
    for step in range(2):
        x, _ = _inputs(10 + step)
        with torch.no_grad():
            y_eager = eager(x)
            start = time.perf_counter()
            y = compiled(x)
            seconds.setdefault("eval", time.perf_counter() - start)
        _assert_close(y, y_eager, f"output, eval step {step}")
        worst = max(worst, _max_diff(y, y_eager))
        assert counter.frame_count == 2, f"recompiled at eval step {step}"
    _compare_state(module, eager, "after eval")
    smallbn.check_finite(module)  # nothing non-finite was recorded by the compiled steps
    record_property("max_abs_diff", worst)
    record_property("compile_s", {k: round(v, 1) for k, v in seconds.items()})

    # A NaN batch in a compiled training step (the training graph again: no recompile) is
    # recorded on the device by the deferred check and reported afterwards.
    module.train()
    x, g = _inputs(20)
    x[1, 0, 2, 2] = float("nan")
    _train_step(compiled, x, g)
    assert counter.frame_count == 2, "recompiled when back in training mode"
    if method in UNCHECKED:
        return
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        smallbn.check_finite(module)
