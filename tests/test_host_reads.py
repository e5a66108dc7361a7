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

import smallbn
from _host_reads import count_host_reads

#: Options that make each method do all it does in a step (windows full, past warm-up).
_OPTIONS: dict[str, dict[str, Any]] = {
    "cbn": {"window": 3, "burnin": 0},
    "mabn": {"window": 2, "warmup": 0},
    "ghostbn": {"group_size": 2},
    "brn": {"warmup_steps": 0},
}


@pytest.fixture
def deferred() -> Iterator[None]:
    old = smallbn.set_finite_check("deferred")
    yield
    smallbn.set_finite_check(old)


def _block(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return smallbn.convert(model, method, **_OPTIONS.get(method, {}))


@pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning")
@pytest.mark.parametrize("method", smallbn.available_norms())
def test_a_training_and_an_eval_step_read_nothing_back(method: str, deferred: None) -> None:
    model = _block(method)
    x = torch.randn(2, 3, 6, 6)
    model.train()
    for _ in range(3):  # warm: windows fill, lazy state is allocated
        model(x).square().mean().backward()

    def train_step() -> None:
        model(x).square().mean().backward()

    assert count_host_reads(train_step) == [], f"{method}: training step"
    model.eval()

    def eval_step() -> None:
        with torch.no_grad():
            model(x)

    assert count_host_reads(eval_step) == [], f"{method}: eval step"


def test_the_detector_sees_the_strict_checks_reads() -> None:
    old = smallbn.set_finite_check("step")
    try:
        model = _block("brn")
        x = torch.randn(2, 3, 6, 6)
        found = count_host_reads(lambda: model(x).sum().backward())
    finally:
        smallbn.set_finite_check(old)
    assert found == ["aten._local_scalar_dense.default"]
