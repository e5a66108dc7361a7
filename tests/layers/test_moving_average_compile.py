"""MABN (with its weight-centred conv) under ``torch.compile(fullgraph=True)``, and the
device-side bookkeeping that compiled graphs and synchronized layers run.

Compiled steps must equal eager ones (outputs, gradients, every buffer), with no recompile
once the first step is compiled: the step count and the windows' fill live in buffers there,
not in Python integers that dynamo would specialize on.  ``inductor`` is checked on the
configuration of issue 23; ``aot_eager`` (the same AOTAutograd partitioner, no code
generation: seconds instead of half a minute) on schedules that cross the warm-up, the
start of the clamping of ``r``, a filling window, the cumulative average and simulated
groups.  The device-side path is also run eagerly against the float64 reference.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import smallbn
from reference import RefMovingAverageBatchNorm
from smallbn.layers import _moving_average_functions, moving_average
from smallbn.layers.moving_average import MovingAverageBatchNorm2d

C = 3
TOL = dict(rtol=1e-9, atol=1e-9)
#: float32 compiled vs eager: the compiler may fuse and reorder float32 sums.
COMPILED_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    old = smallbn.set_finite_check("deferred")
    yield
    smallbn.set_finite_check(old)
    torch._dynamo.reset()


def _block(**options: Any) -> nn.Sequential:
    """Conv2d + MABN + ReLU as smallbn.convert makes it (the conv weight-centred)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", smallbn.ConversionWarning)
        return smallbn.convert(model, "mabn", **options)


def _assert_same_state(compiled: nn.Module, eager: nn.Module, what: str) -> None:
    for (name, a), (_, b) in zip(
        compiled.named_parameters(), eager.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, **COMPILED_TOL, msg=f"{name}, {what}")
        torch.testing.assert_close(a.grad, b.grad, **COMPILED_TOL, msg=f"{name}.grad, {what}")
    for (name, a), (_, b) in zip(compiled.named_buffers(), eager.named_buffers(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, **COMPILED_TOL, msg=f"{name}, {what}")
        else:  # counts and steps: exactly
            assert torch.equal(a, b), f"{name}, {what}: {a} != {b}"


def _train_in_lockstep(
    eager: nn.Module, backend: str, batches: list[Tensor], *, lr: float = 0.1
) -> tuple[nn.Module, nn.Module]:
    """SGD steps of ``mean(y²)`` on ``eager`` and on a compiled copy; compares everything
    after every step, and refuses any recompile after the first step."""
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (model, eager)]
    for step, x in enumerate(batches):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            outputs = []
            for forward, optimizer in zip((compiled, eager), optimizers, strict=True):
                optimizer.zero_grad()
                y = forward(x)
                y.square().mean().backward()
                outputs.append(y.detach())
        torch.testing.assert_close(*outputs, **COMPILED_TOL, msg=f"output, step {step}")
        _assert_same_state(model, eager, f"step {step}")
        for optimizer in optimizers:
            optimizer.step()
    return model, compiled


def _batches(count: int, n: int = 4) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    # scales that change from step to step, so that r leaves [r_min, r_max] after its start
    return [torch.randn(n, 3, 6, 6, generator=gen) * (1 + 4 * (k % 3)) for k in range(count)]


def _eval_in_lockstep(model: nn.Module, compiled: nn.Module, eager: nn.Module, x: Tensor) -> None:
    """Eval steps: the first compiles the eval graph (a new training flag), later ones and a
    return to training (``x`` of the training batches' shape) reuse the cached graphs."""
    model.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **COMPILED_TOL)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x + 1), eager(x + 1), **COMPILED_TOL)
        model.train()
        compiled(x).sum().backward()  # the training graph is still cached


def test_inductor_fullgraph_training_and_eval_equal_eager() -> None:
    """Issue 23's configuration: torch.compile(block, fullgraph=True) with the default
    backend (inductor) over 5 SGD steps (forward, MABN's moving-average backward, the Ψ
    window pushed inside the compiled backward), then eval."""
    eager = _block(window=2, warmup=0)
    batches = _batches(5)
    model, compiled = _train_in_lockstep(eager, "inductor", batches)
    assert int(model[1].sma_steps) == 5 and int(model[1].psi_count) == 2
    _eval_in_lockstep(model, compiled, eager, batches[0])


SCHEDULES = {
    "warmup, clamp start, filling window": dict(window=3, warmup=2, clamp_start=3),
    "cumulative average": dict(window=4, warmup=1, clamp_start=2, momentum=None),
    "groups of 2 in odd batches": dict(window=3, warmup=2, clamp_start=3, norm_batch_size=2),
    "groups, cumulative average": dict(
        window=3, warmup=0, clamp_start=1, norm_batch_size=2, momentum=None
    ),
    "without running stats": dict(window=2, warmup=1, track_running_stats=False),
}


@pytest.mark.parametrize("options", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_compiled_schedules_equal_eager_without_recompiling(options: dict[str, Any]) -> None:
    """Every per-step switch crosses inside the compiled graph (masks on the device step),
    with no recompile; before the buffers were read through a non-recomputable op, AOT's
    partitioner recomputed r and the switches in the backward from the buffers the step had
    already updated (silently other gradients from the clamp start on)."""
    eager = _block(**options)
    n = 5 if options.get("norm_batch_size") else 4
    batches = _batches(8, n=n)
    model, compiled = _train_in_lockstep(eager, "aot_eager", batches)
    if options.get("track_running_stats", True):
        _eval_in_lockstep(model, compiled, eager, batches[0])


def test_compiled_gradient_accumulation_pushes_psi_in_backward_order() -> None:
    """Two forwards, then their backwards in reverse order: each compiled backward reads the
    Ψ window at backward time and pushes into it, as eager."""
    eager = _block(window=3, warmup=1)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(3):
        first, second = _batches(2 * step + 2)[-2:]
        for forward in (compiled, eager):
            losses = [forward(x).square().mean() for x in (first, second)]
            losses[1].backward()
            losses[0].backward()
        _assert_same_state(model, eager, f"step {step}")


def test_eager_steps_after_compiled_ones_continue_identically() -> None:
    """Compiled steps advance only the buffers; the next eager step re-reads the host copies
    once and goes on as a model trained eagerly throughout."""
    eager = _block(window=3, warmup=2, clamp_start=3)
    model, _ = _train_in_lockstep(eager, "aot_eager", _batches(3))
    assert model[1]._host_stale
    for step, x in enumerate(_batches(7)[3:]):
        for m in (model, eager):
            m.zero_grad()
            m(x).square().mean().backward()
        _assert_same_state(model, eager, f"eager step {step} after compiled ones")
    assert not model[1]._host_stale and model[1]._steps == eager[1]._steps == 7


def test_centered_conv_compiles_with_its_projection_backward() -> None:
    conv = _block()[0]
    compiled = torch.compile(copy.deepcopy(conv), fullgraph=True, backend="aot_eager")
    x = _batches(1)[0]
    for forward in (compiled, conv):
        forward(x).square().sum().backward()
    torch.testing.assert_close(compiled.weight.grad, conv.weight.grad, **COMPILED_TOL)
    centred = compiled.weight.grad.flatten(1)
    assert centred.sum(1).abs().max() < 1e-6 * centred.abs().sum()  # a centred gradient


# -- the device-side bookkeeping, eagerly, against the float64 reference ------------------------

BATCHES = [5, 1, 4, 3, 2, 7]


@pytest.mark.parametrize("norm_batch_size", [None, 2, 3], ids=lambda b: f"b={b}")
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
def test_device_bookkeeping_matches_reference(
    norm_batch_size: int | None, momentum: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path compiled graphs run (switches as masks on the device step, window means as
    masked sums over the device count, snapshots of the buffers), taken eagerly: the same
    numbers as the float64 reference over 30 steps that cross every switch."""
    for module in (moving_average, _moving_average_functions):  # the layer and its kernels
        monkeypatch.setattr(module, "_compiling", lambda: True)
    schedule = dict(window=4, warmup=5, clamp_start=8)
    layer = MovingAverageBatchNorm2d(
        C, momentum=momentum, norm_batch_size=norm_batch_size, dtype=torch.float64, **schedule
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    ref = RefMovingAverageBatchNorm(
        C,
        momentum=momentum,
        norm_batch_size=norm_batch_size,
        weight=layer.weight,
        bias=layer.bias,
        eps=layer.eps,
        **schedule,
    )
    for step in range(30):
        scale = 100.0 if step in (12, 22) else 1.0  # r clamped up, then down
        shape = (BATCHES[step % len(BATCHES)], C, 3, 2)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        xa = x.clone().requires_grad_(True)
        y = layer(xa)
        (y * g).sum().backward()
        expected = ref.train_step(x, g)
        actual = (y, xa.grad, layer.weight.grad, layer.bias.grad)
        for name, a, e in zip(("y", "∂x", "∂γ", "∂β"), actual, expected, strict=True):
            torch.testing.assert_close(a, e, **TOL, msg=f"{name}, step {step}")
        layer.weight.grad = layer.bias.grad = None
        torch.testing.assert_close(layer.running_var, ref.running_var, **TOL)
        assert int(layer.sma_steps) == ref.steps
        for name, history in (("chi2", ref.chi2_history), ("psi", ref.psi_history)):
            count = int(getattr(layer, f"{name}_count"))
            rows = getattr(layer, f"{name}_window")[layer.window - count :]
            torch.testing.assert_close(rows, torch.stack(history[-layer.window :]), **TOL)
    assert layer._host_stale  # the host copies were not kept: re-read by an eager step
