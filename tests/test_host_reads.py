"""No host read in a training or eval step of any layer (issue 23), checked on CPU.

On CUDA a host read (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``) waits for the
device: a synchronization per layer and step, and a break of CUDA and ``torch.compile``
graphs.  On CPU the same reads are visible as dispatcher calls: ``aten._local_scalar_dense``
(``item``/``bool``/``float``/``int``), data-dependent shapes (``nonzero``), and
``Tensor.tolist``, patched here.  With the finite check deferred (the default off CPU),
a step of every method, forward and backward, must make none.  (The CUDA twin of this
test, ``torch.cuda.set_sync_debug_mode("error")``, runs where a GPU is.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import smallbn

#: Ops whose result the host must wait for.
_HOST_READS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.unique_consecutive.default",
    "aten._unique2.default",
    "aten.equal.default",
    "aten.is_nonzero.default",
}

#: Options that make each method do all it does in a step (windows full, past warm-up).
_OPTIONS: dict[str, dict[str, Any]] = {
    "cbn": {"window": 3, "burnin": 0},
    "mabn": {"window": 2, "warmup": 0},
    "ghostbn": {"group_size": 2},
    "brn": {"warmup_steps": 0},
}


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if str(func) in _HOST_READS:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def deferred() -> Iterator[None]:
    old = smallbn.set_finite_check("deferred")
    yield
    smallbn.set_finite_check(old)


def _block(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return smallbn.convert(model, method, **_OPTIONS.get(method, {}))


def _count_host_reads(monkeypatch: pytest.MonkeyPatch, step) -> list[str]:  # type: ignore[no-untyped-def]
    found: list[str] = []
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> Any:
        found.append("Tensor.tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with _HostReads() as mode:
        step()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return found + mode.found


#: Methods that still read the host in a step (issue 23, in progress): strict xfails.
_STILL_READING: set[str] = set()


@pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning")
@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="issue 23"))
        if m in _STILL_READING
        else m
        for m in smallbn.available_norms()
    ],
)
def test_a_training_and_an_eval_step_read_nothing_back(
    method: str, deferred: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _block(method)
    x = torch.randn(2, 3, 6, 6)
    model.train()
    for _ in range(3):  # warm: windows fill, lazy state is allocated
        model(x).square().mean().backward()

    def train_step() -> None:
        model(x).square().mean().backward()

    assert _count_host_reads(monkeypatch, train_step) == [], f"{method}: training step"
    model.eval()

    def eval_step() -> None:
        with torch.no_grad():
            model(x)

    assert _count_host_reads(monkeypatch, eval_step) == [], f"{method}: eval step"


def test_the_detector_sees_the_strict_checks_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    old = smallbn.set_finite_check("step")
    try:
        model = _block("brn")
        x = torch.randn(2, 3, 6, 6)
        found = _count_host_reads(monkeypatch, lambda: model(x).sum().backward())
    finally:
        smallbn.set_finite_check(old)
    assert found == ["aten._local_scalar_dense.default"]
