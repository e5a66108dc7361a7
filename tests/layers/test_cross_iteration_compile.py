"""Cross-Iteration BN under ``torch.compile`` (issue 23: GPU-grade layers).

A compiled training step must be one graph for every iteration: the window's schedule (slot
``t mod k``, which stored entries are pooled, burn-in) is computed on the device from the
``iteration`` and ``window_fill`` buffers, since a host counter read by the compiled code is a
guard on its value (a recompilation per step).  The compiled block must give the eager
block's outputs, gradients and state, step after step, with compensation running (weights
change between steps), and an eager step after compiled ones must continue from them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from torch import Tensor, nn

import smallbn
from smallbn.layers.cross_iteration import CrossIterationBatchNorm2d

TOL: dict[str, float] = {"rtol": 1e-5, "atol": 1e-5}


def _block(device: torch.device | str = "cpu", **options: Any) -> nn.Sequential:
    """Conv2d → CBN (bound to the conv) → ReLU, as :func:`smallbn.convert` makes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return smallbn.convert(model.to(device), "cbn", **options)


def _graphs() -> int:
    """Graphs dynamo compiled since the last :func:`_fresh_dynamo`."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _train_step(model: Callable[[Tensor], Tensor], params: nn.Module, x: Tensor) -> Tensor:
    """Forward, backward and an SGD step (the producer's weights change: compensation)."""
    for p in params.parameters():
        p.grad = None
    y = model(x)
    y.square().mean().backward()
    with torch.no_grad():
        for p in params.parameters():
            p.sub_(0.1 * p.grad)
    return y.detach()


def _assert_same(eager: nn.Module, compiled: nn.Module, what: str) -> None:
    """Gradients of the last step and the whole state (parameters, running statistics,
    window, counters) agree."""
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"{what}: gradient of {name}")
    want, got = eager.state_dict(), compiled.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **TOL, msg=f"{what}: {key}")


@pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning")
def test_a_compiled_block_trains_and_evaluates_as_the_eager_one(device: torch.device) -> None:
    """``torch.compile(block, fullgraph=True)`` (inductor, the deferred finite check that
    compilation implies): training steps as the window fills and then with full, compensated
    windows, an eval step, and training again after it; one graph for every training step."""
    _fresh_dynamo()
    block = _block(device, window=3, burnin=0)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    steps = 0
    for phase in range(2):
        eager.train()
        compiled.train()
        for _ in range(5 if phase == 0 else 2):
            x = torch.randn(2, 3, 5, 5, generator=gen).to(device)
            y_eager = _train_step(eager, eager, x)
            y_compiled = _train_step(compiled, block, x)
            steps += 1
            torch.testing.assert_close(y_compiled, y_eager, **TOL)
            _assert_same(eager, block, f"training step {steps}")
        norm = block[1]
        # The window is full and the compensation ran with changing weights.
        assert int(norm.window_fill) == 3 and int(norm.iteration) == steps
        assert norm.window_var_grad is not None and bool(norm.window_var_grad.abs().sum() > 0)
        eager.eval()
        compiled.eval()
        with torch.no_grad():
            x = torch.randn(2, 3, 5, 5, generator=gen).to(device)
            torch.testing.assert_close(compiled(x), eager(x), **TOL)
    # One training graph whatever the iteration and fill, one eval graph.
    assert _graphs() == 2
    # The host copies of the counters follow the device ones that compiled steps advanced.
    assert norm.effective_window() == 3 and norm._iteration == steps
    smallbn.check_finite(block)  # the deferred flags the compiled steps kept: all finite


@pytest.mark.parametrize(
    "options",
    [
        {"window": 3, "burnin": 4},
        {"window": 3, "burnin": 5, "burnin_mode": "linear"},
        {"window": 4, "aggregation": "drop", "eps_placement": "outside"},
        {"window": None},
        {"window": 1},
        {"window": 3, "compensate": False},
    ],
    ids=str,
)
@pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning")
def test_compiled_schedules_equal_the_eager_ones(options: dict[str, Any]) -> None:
    """Burn-in (two-stage, linear), the release's options, a window chosen from the first
    batch, plain BN and naive pooling, compiled (dynamo + AOTAutograd, without code
    generation: the graph is what is under test) through the end of burn-in; then eager
    steps of the same module continue from the compiled ones."""
    _fresh_dynamo()
    block = _block(**options)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(2)
    for step in range(9):
        x = torch.randn(2, 3, 4, 4, generator=gen)
        model = compiled if step < 7 else block  # the last two steps eager
        torch.testing.assert_close(_train_step(model, block, x), _train_step(eager, eager, x))
        _assert_same(eager, block, f"step {step}")
    # window=None: the first step allocates the window (one more graph); no per-step graphs.
    assert _graphs() <= 2


def test_explain_finds_no_graph_break() -> None:
    """``torch._dynamo.explain`` of a training and an eval forward: one graph, no break."""
    _fresh_dynamo()
    block = _block(window=3, burnin=0)
    x = torch.randn(2, 3, 4, 4)
    for _ in range(3):
        block(x).square().mean().backward()
    for mode in (True, False):
        block.train(mode)
        explained = torch._dynamo.explain(block)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_warnings_come_at_the_next_eager_call() -> None:
    """``warnings.warn`` cannot be traced: an unbound layer's "naive pooling" warning of a
    compiled step is given by the next eager call (here ``train()``), once."""
    _fresh_dynamo()
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, window=2))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as inside:
        warnings.simplefilter("always")
        for _ in range(3):
            compiled(torch.randn(2, 3, 5, 5))
    assert not [w for w in inside if "no producing layer" in str(w.message)]
    with pytest.warns(RuntimeWarning, match="no producing layer is bound") as given:
        block.train()
    assert len(given) == 1
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        block.train()
    assert not later
