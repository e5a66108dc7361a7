"""Moving Average Batch Normalization against the float64 reference written from docs/methods.md
(tests/reference.py: one SMA step per group, forward and the moving-average backward written
out), gradcheck of the autograd Function where its backward is an exact derivative, state,
checkpoints, errors, conversion, and synchronization over 2 gloo processes."""

from __future__ import annotations

import copy
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import smallbn
from reference import RefMovingAverageBatchNorm
from smallbn.layers.centered_conv import CenteredConv2d
from smallbn.layers.moving_average import (
    MABNPlan,
    MovingAverageBatchNorm,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
    SlidingWindow,
    mabn_function,
)

C = 3
# Trailing shapes: 1d without and with length, 2d, 3d.
TAILS = [(), (4,), (3, 2), (2, 2, 2)]
CLASSES = {
    0: MovingAverageBatchNorm1d,
    1: MovingAverageBatchNorm1d,
    2: MovingAverageBatchNorm2d,
    3: MovingAverageBatchNorm3d,
}
# Small schedule values so that 30 steps cross the warm-up and clamp-start switches.
SCHEDULE = dict(window=4, warmup=5, clamp_start=8)
# Batch sizes cycled over the steps: odd, 1, even, sizes that 2 and 3 do not divide.
BATCHES = [5, 1, 4, 3, 2, 7]
TOL = dict(rtol=1e-9, atol=1e-9)


def _pair(tail, *, norm_batch_size=None, momentum: float | None = 0.1, seed=0, **kwargs):
    """A float64 layer with random affine parameters and the reference holding the same."""
    options = {**SCHEDULE, **kwargs}
    layer = CLASSES[len(tail)](
        C,
        momentum=momentum,
        norm_batch_size=norm_batch_size,
        dtype=torch.float64,
        **options,
    )
    gen = torch.Generator().manual_seed(seed)
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
        **options,
    )
    return layer, ref


def _batch(step: int, n: int, tail, seed: int = 0, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Input and upstream gradient of one step.  Steps 12 and 22 are 100× larger, so that
    ``sqrt(v/running_var)`` leaves ``[1/5, 5]`` and r is clamped (up, then down once the
    large values leave the window while ``running_var`` still remembers them)."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    scale = 100.0 if step in (12, 22) else 1.0
    loc = torch.linspace(-0.5, 1.0, C, dtype=torch.float64).reshape(1, C, *[1] * len(tail))
    x = (torch.randn(n, C, *tail, generator=gen, dtype=torch.float64) + loc) * scale
    g = torch.randn(n, C, *tail, generator=gen, dtype=torch.float64)
    return x.to(dtype), g


def _train_step(layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward and backward of ``Σ y·g``; returns ``(y, ∂x, ∂γ, ∂β)`` and clears the grads
    (zeros where an empty batch left no gradient)."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y.double() * g).sum().backward()
    grads = tuple(
        torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for p in (x, layer.weight, layer.bias)
    )
    layer.weight.grad = layer.bias.grad = None
    return (y.detach(), *grads)


def _window_rows(values: Tensor, count: Tensor) -> Tensor:
    return values[values.shape[0] - int(count) :]


def _assert_state_matches(layer, ref, what: str) -> None:
    torch.testing.assert_close(layer.running_var, ref.running_var, **TOL, msg=what)
    assert int(layer.sma_steps) == ref.steps, what
    for name, history in (("chi2", ref.chi2_history), ("psi", ref.psi_history)):
        rows = _window_rows(getattr(layer, f"{name}_window"), getattr(layer, f"{name}_count"))
        expected = torch.stack(history[-layer.window :])
        torch.testing.assert_close(rows, expected, **TOL, msg=f"{name} window, {what}")


# -- the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS, ids=lambda t: f"{len(t) or 1}d{t}")
@pytest.mark.parametrize("norm_batch_size", [None, 1, 2, 3], ids=lambda b: f"b={b}")
def test_matches_reference_over_30_steps(tail, norm_batch_size):
    layer, ref = _pair(tail, norm_batch_size=norm_batch_size)
    used_sma = clamped_up = clamped_down = False
    for step in range(30):
        x, g = _batch(step, BATCHES[step % len(BATCHES)], tail)
        actual = _train_step(layer, x, g)
        expected = ref.train_step(x, g)
        for name, a, e in zip(("output", "∂x", "∂γ", "∂β"), actual, expected, strict=True):
            what = f"step {step} {name}"
            torch.testing.assert_close(a, e, **TOL, msg=lambda m, w=what: f"{w}: {m}")
        _assert_state_matches(layer, ref, f"after step {step}")
        assert int(layer.num_batches_tracked) == step + 1
        assert torch.all(layer.running_mean == 0)
        used_sma |= any(ref.last_used_sma)
        clamped_up |= any(bool((r == 5.0).any()) for r in ref.last_r)
        clamped_down |= any(bool((r == 0.2).any()) for r in ref.last_r)
    assert used_sma and clamped_up and clamped_down  # the test crossed every switch
    layer.eval()
    x, _ = _batch(99, 4, tail)
    torch.testing.assert_close(layer(x), ref.eval(x), **TOL)


@pytest.mark.parametrize("momentum", [None, 0.02, 1.0], ids=lambda m: f"momentum={m}")
def test_momentum_conventions_match_reference(momentum):
    """``None``: cumulative average over SMA steps; 0.02: the release's keep factor 0.98;
    1.0: running_var = the latest v."""
    layer, ref = _pair((3, 2), norm_batch_size=2, momentum=momentum)
    for step in range(12):
        x, g = _batch(step, BATCHES[step % len(BATCHES)], (3, 2))
        for a, e in zip(_train_step(layer, x, g), ref.train_step(x, g), strict=True):
            torch.testing.assert_close(a, e, **TOL)
        _assert_state_matches(layer, ref, f"after step {step}")


def test_without_affine_matches_reference():
    layer = MovingAverageBatchNorm2d(C, affine=False, dtype=torch.float64, **SCHEDULE)
    ref = RefMovingAverageBatchNorm(C, **SCHEDULE)
    for step in range(10):
        x, g = _batch(step, 3, (2, 3))
        xa = x.clone().requires_grad_(True)
        y = layer(xa)
        (y * g).sum().backward()
        y_ref, gx_ref, _, _ = ref.train_step(x, g)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(xa.grad, gx_ref, **TOL)


@pytest.mark.parametrize(("n", "b"), [(7, 2), (6, 3), (5, 8), (1, 2), (9, 4)])
def test_groups_are_consecutive_calls(n, b):
    """A call with norm_batch_size=b is ceil(n/b) consecutive calls on the groups."""
    grouped = MovingAverageBatchNorm2d(C, norm_batch_size=b, dtype=torch.float64, **SCHEDULE)
    single = copy.deepcopy(grouped)
    single.norm_batch_size = None
    for step in range(6):
        x, g = _batch(step, n, (3, 3))
        y, gx, gw, gb = _train_step(grouped, x, g)
        parts = [_train_step(single, x[s : s + b], g[s : s + b]) for s in range(0, n, b)]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]), **TOL)
        torch.testing.assert_close(gx, torch.cat([p[1] for p in parts]), **TOL)
        torch.testing.assert_close(gw, sum(p[2] for p in parts), **TOL)
        torch.testing.assert_close(gb, sum(p[3] for p in parts), **TOL)
        for name in ("running_var", "chi2_window", "psi_window", "chi2_count", "sma_steps"):
            torch.testing.assert_close(getattr(grouped, name), getattr(single, name), **TOL)


# -- gradcheck of the Function ------------------------------------------------------------------


def _plan(window_rows: Tensor, psi_rows: Tensor, **kwargs) -> MABNPlan:
    """A plan over fixed windows (``frozen``: gradcheck runs backward many times)."""
    size = 4
    c = window_rows.shape[1]

    def window(rows: Tensor) -> SlidingWindow:
        values = torch.zeros(size, c, dtype=torch.float64)
        if len(rows):
            values[size - len(rows) :] = rows
        return SlidingWindow(values, torch.tensor(len(rows)), frozen=True)

    options = dict(eps=0.1, group_size=None, step=0, warmup=100, clamp_start=100)
    options.update(kwargs)
    return MABNPlan(chi2=window(window_rows), psi=window(psi_rows), **options)


def _inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    return tuple(t.requires_grad_(True) for t in (x, w, b))


@pytest.mark.parametrize(("shape", "group_size"), [((5, 3, 4), 2), ((3, 2, 2, 3), 1), ((1, 3), 4)])
def test_gradcheck_during_warmup(shape, group_size):
    """In warm-up each group is normalized by its own E[x²] and Ψ̄ = Ψ_t: then MABN's backward
    is the exact derivative of its forward (with r = 1), for any grouping."""
    plan = _plan(
        torch.empty(0, shape[1]),
        torch.empty(0, shape[1]),
        group_size=group_size,
        running_var=torch.full((shape[1],), 2.0, dtype=torch.float64),
    )
    assert torch.autograd.gradcheck(lambda *t: mabn_function(*t, plan)[0], _inputs(shape))
    assert int(plan.psi.count) == 0  # frozen: backward pushed nothing


@pytest.mark.parametrize("running_var", [1e-6, 1e6], ids=["r=r_max", "r=r_min"])
def test_gradcheck_after_warmup_with_zero_psi_history(running_var):
    """One group after warm-up: v = (Σ past χ² + χ²_t)/k, and with past Ψ values 0 the
    moving-average backward is (ĝ − z·Ψ_t/k)/sqrt(v + eps), the exact derivative.  r is
    clamped (constant), so the renormalization path is covered too.  (Past Ψ values ≠ 0 add
    −z·ΣΨ_past/k/sqrt(v + eps), which does not scale with ∂L/∂y: by design MABN's backward is
    then no derivative of anything, and gradcheck does not apply.)"""
    shape = (4, 3, 5)
    history = torch.rand(3, shape[1], dtype=torch.float64) + 0.5
    plan = _plan(
        history,
        torch.zeros_like(history),
        step=20,
        warmup=5,
        clamp_start=0,
        r_min=0.5,
        r_max=2.0,
        running_var=torch.full((shape[1],), running_var, dtype=torch.float64),
    )
    y, (_, var, r, _) = mabn_function(*_inputs(shape), plan)
    expected_r = 2.0 if running_var < 1 else 0.5
    assert torch.all(r == expected_r)
    chi2 = _inputs(shape)[0].detach().square().mean((0, 2))
    torch.testing.assert_close(var[0], (history.sum(0) + chi2) / 4)
    assert torch.autograd.gradcheck(lambda *t: mabn_function(*t, plan)[0], _inputs(shape))


def test_function_leaves_state_alone_and_backward_pushes_psi():
    layer = MovingAverageBatchNorm2d(C, dtype=torch.float64, **SCHEDULE)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    plan = layer._plan(training=True, tracking=True)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y, _ = mabn_function(x, layer.weight, layer.bias, plan)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    y.sum().backward()
    assert int(layer.psi_count) == 1 and int(layer.chi2_count) == 0


# -- any shape, dtype and batch size ------------------------------------------------------------


@given(
    n=st.integers(1, 6),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    norm_batch_size=st.one_of(st.none(), st.integers(1, 4)),
    momentum=st.sampled_from([0.1, None]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_dtype_and_batch_matches_reference(
    n, c, spatial, dtype, norm_batch_size, momentum, seed
):
    layer_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    schedule = dict(window=2, warmup=1, clamp_start=2)
    layer = MovingAverageBatchNorm(
        c, momentum=momentum, norm_batch_size=norm_batch_size, dtype=layer_dtype, **schedule
    )
    ref = RefMovingAverageBatchNorm(
        c, momentum=momentum, norm_batch_size=norm_batch_size, **schedule
    )
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    gen = torch.Generator().manual_seed(seed)
    for step in range(4):
        shape = (n, c, *spatial)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step)).to(dtype)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        y, gx, gw, gb = _train_step(layer, x, g)
        assert y.dtype == dtype and gx.dtype == dtype
        # the reference sees the values the layer saw: x and ∂L/∂y rounded to dtype
        expected = ref.train_step(x, g.to(dtype))
        for a, e in zip((y, gx, gw, gb), expected, strict=True):
            scale = max(1.0, float(e.abs().max()))
            torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(layer.running_var.double(), ref.running_var, rtol=tol, atol=tol)
    layer.eval()
    x = torch.randn(n, c, *spatial, generator=gen, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(layer(x).double(), ref.eval(x), rtol=tol, atol=tol * 10)


def test_float16_input_keeps_float32_statistics():
    layer = MovingAverageBatchNorm2d(C, **SCHEDULE)
    x = torch.randn(4, C, 5, 5).half().requires_grad_(True)
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.float16
    assert layer.chi2_window.dtype == layer.psi_window.dtype == torch.float32
    expected = x.detach().float() / torch.sqrt(
        x.detach().float().square().mean((0, 2, 3)) + 1e-5
    ).reshape(1, C, 1, 1)
    torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)


HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # ~8 ulps of each format


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_module_keeps_float32_windows_and_matches_a_float32_layer(dtype):
    """``model.half()`` / ``.to(bfloat16)``: inputs of RMS 70 have E[x²] ≈ 4900, which fits in
    float16, but the SMA sums 16 of them (> 65504): summed in a float16 window this overflowed,
    running_var became Inf, then every output NaN.  The windows must stay float32, and the
    layer must follow a float32 layer fed the same inputs to the format's precision."""
    kw = dict(warmup=0, clamp_start=0)  # window = 16: the SMA and r from the first step
    narrow = MovingAverageBatchNorm2d(C, **kw).to(dtype)
    wide = MovingAverageBatchNorm2d(C, **kw)
    assert narrow.chi2_window.dtype == narrow.psi_window.dtype == torch.float32
    assert narrow.running_var.dtype == narrow.weight.dtype == dtype  # as nn.BatchNorm's
    gen = torch.Generator().manual_seed(0)
    tol = HALF_TOL[dtype]
    for step in range(20):
        x = (torch.randn(4, C, 8, 8, generator=gen) * 70).to(dtype)
        g = torch.randn(4, C, 8, 8, generator=gen)
        results = []
        for layer in (narrow, wide):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            (y.float() * g).sum().backward()
            grads = (xi.grad, layer.weight.grad, layer.bias.grad)
            layer.weight.grad = layer.bias.grad = None
            results.append([t.detach().float() for t in (y, *grads, layer.running_var)])
        for name, got, want in zip(("y", "dx", "dγ", "dβ", "running_var"), *results, strict=True):
            assert got.isfinite().all(), f"{name} not finite at step {step}"
            torch.testing.assert_close(
                got, want, rtol=tol, atol=tol * float(want.abs().max()), msg=f"{name}, {step}"
            )
    assert int(narrow.chi2_count) == int(narrow.psi_count) == narrow.window
    # SMA windows are float32 sums of float32 E[x²] values in both layers
    torch.testing.assert_close(narrow.chi2_window, wide.chi2_window, rtol=1e-5, atol=0)


def test_casting_keeps_the_window_values_and_checkpoints_load_across_dtypes():
    """``.half()`` after float32 training keeps the windows' float32 values exactly (no round
    trip through float16, where E[x²] = 9·10⁴ would become Inf); float64 stays float64; a
    checkpoint loads whatever the dtypes on either side."""
    layer = MovingAverageBatchNorm2d(C, window=4, warmup=0)
    for _ in range(3):
        layer(torch.randn(2, C, 3, 3) * 300)  # E[x²] ≈ 9·10⁴ > 65504
    windows = (layer.chi2_window.clone(), layer.psi_window.clone())
    assert windows[0].max() > torch.finfo(torch.float16).max
    half = copy.deepcopy(layer).half()
    assert half.chi2_window.dtype == torch.float32 and half.running_var.dtype == torch.float16
    assert torch.equal(half.chi2_window, windows[0]) and torch.equal(half.psi_window, windows[1])
    assert copy.deepcopy(half).double().chi2_window.dtype == torch.float64
    assert layer.double().chi2_window.dtype == torch.float64
    assert layer.to(torch.bfloat16).chi2_window.dtype == torch.float32
    fresh = MovingAverageBatchNorm2d(C, window=4, warmup=0).half()
    fresh.load_state_dict(half.state_dict())
    assert fresh.chi2_window.dtype == torch.float32
    assert torch.equal(fresh.chi2_window, windows[0])
    wide = MovingAverageBatchNorm2d(C, window=4, warmup=0)
    wide.load_state_dict(fresh.state_dict())
    assert torch.equal(wide.chi2_window, windows[0])
    assert torch.equal(wide.running_var, half.running_var.float())
    # a checkpoint whose windows were saved in float16 loads as float32, also by assignment
    state = {k: v.half() if v.is_floating_point() else v for k, v in half.state_dict().items()}
    assigned = MovingAverageBatchNorm2d(C, window=4, warmup=0).half()
    with pytest.raises(RuntimeError, match="'chi2_window' holds NaN/Inf"):
        assigned.load_state_dict(state, assign=True)  # E[x²] = 9·10⁴ is Inf in float16
    state["chi2_window"] = state["chi2_window"].clamp(max=6e4)
    assigned.load_state_dict(state, assign=True)
    assert assigned.chi2_window.dtype == assigned.psi_window.dtype == torch.float32
    assert torch.equal(assigned.psi_window, windows[1].half().float())


def test_running_var_overflowing_a_half_module_raises_and_changes_nothing():
    """E[x²] ≈ 9·10⁴ is finite in float32 but not in a float16 running_var: an Inf there
    would make r, then every later output NaN; the layer raises instead."""
    layer = MovingAverageBatchNorm2d(C, momentum=0.5, window=1, warmup=0, clamp_start=0).half()
    layer(torch.full((2, C, 3, 3), 5.0).half())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    # v = E[x²] = 1.6·10⁵; running_var would become 0.5·25 + 0.5·1.6·10⁵ > 65504
    x = torch.full((2, C, 3, 3), 400.0).half().requires_grad_(True)
    with pytest.raises(
        FloatingPointError,
        match=r"MovingAverageBatchNorm2d\(3\): the running variance .* not be finite in "
        r"torch.float16 in channel\(s\) \[0, 1, 2\]",
    ):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert layer(torch.randn(2, C, 3, 3).half()).isfinite().all()  # still usable


def test_double_backward_raises_naming_mabn():
    """The backward is written out to first order (Ψ̄ from the window, v and r constants):
    a second derivative through it would silently miss terms, so create_graph=True raises
    (before touching the Ψ window)."""
    layer = MovingAverageBatchNorm2d(C, dtype=torch.float64, **SCHEDULE)
    x = torch.randn(3, C, 2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"MABN\) is differentiable once.*create_graph=True"):
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        torch.autograd.grad(gx.square().sum(), x)
    assert int(layer.psi_count) == 0
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x)  # first order still works
    assert gx.isfinite().all() and int(layer.psi_count) == 1


def test_single_value_per_channel_is_normalized():
    """Batch 1 without spatial dims: E[x²] = x², so z = x/sqrt(x² + eps) (no error)."""
    layer = MovingAverageBatchNorm1d(4, dtype=torch.float64)
    x = torch.tensor([[2.0, -0.5, 3.0, 1e-3]], dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, x / torch.sqrt(x.square() + layer.eps))
    assert int(layer.num_batches_tracked) == int(layer.sma_steps) == 1


def test_empty_batch_changes_nothing():
    layer = MovingAverageBatchNorm2d(C, norm_batch_size=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.randn(0, C, 2, 2))
    assert y.shape == (0, C, 2, 2)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_running_stats():
    """Training: r = 1, windows as usual; eval: each group's own E[x²], no state change."""
    layer = MovingAverageBatchNorm2d(
        C, track_running_stats=False, dtype=torch.float64, window=2, warmup=0, clamp_start=0
    )
    ref = RefMovingAverageBatchNorm(C, window=2, warmup=0, clamp_start=10**9)
    for step in range(4):
        x, g = _batch(step, 3, (2, 2))
        for a, e in zip(_train_step(layer, x, g), ref.train_step(x, g), strict=True):
            torch.testing.assert_close(a, e, **TOL)
    assert layer.running_var is None and "running_var" not in layer.state_dict()
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x, _ = _batch(9, 3, (2, 2))
    expected = x / torch.sqrt(x.square().mean((0, 2, 3), keepdim=True) + layer.eps)
    torch.testing.assert_close(layer(x), expected)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_sync_without_process_group_is_local():
    plain, synced = (MovingAverageBatchNorm2d(C, sync=s, **SCHEDULE) for s in (False, True))
    for step in range(3):
        x, g = _batch(step, 3, (2, 2), dtype=torch.float32)
        for a, e in zip(_train_step(synced, x, g), _train_step(plain, x, g), strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


# -- eval ---------------------------------------------------------------------------------------


def test_eval_is_the_affine_map_and_folds():
    layer = MovingAverageBatchNorm2d(C, dtype=torch.float64, **SCHEDULE)
    for step in range(12):
        _train_step(layer, *_batch(step, 4, (3, 3)))
    layer.eval()
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    expected = x * scale.reshape(1, C, 1, 1) + layer.bias.reshape(1, C, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    a, b = layer.eval_affine()
    torch.testing.assert_close(a, scale)
    torch.testing.assert_close(b, layer.bias.detach())
    conv = nn.Conv2d(2, C, 3, padding=1, bias=False).double()
    model = nn.Sequential(conv, layer).eval()
    folded, report = smallbn.fold_with_report(model)
    assert len(report.folded) == 1
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x))


# -- state -----------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically():
    kwargs = dict(norm_batch_size=2, window=3, warmup=3, clamp_start=4, momentum=0.1)
    straight = MovingAverageBatchNorm2d(C, **kwargs)
    resumed = MovingAverageBatchNorm2d(C, **kwargs)
    batches = [_batch(step, BATCHES[step % 6], (3, 3), dtype=torch.float32) for step in range(10)]
    straight_out = [_train_step(straight, x, g) for x, g in batches]
    first = MovingAverageBatchNorm2d(C, **kwargs)
    for x, g in batches[:5]:
        _train_step(first, x, g)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for (x, g), expected in zip(batches[5:], straight_out[5:], strict=True):
        for a, e in zip(_train_step(resumed, x, g), expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_state_dict_keys_are_bns_plus_the_windows():
    layer = MovingAverageBatchNorm2d(4)
    extra = {"chi2_window", "psi_window", "chi2_count", "psi_count", "sma_steps"}
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(4).state_dict()) | extra
    assert layer.chi2_window.shape == (16, 4)
    assert (layer.window, layer.warmup, layer.clamp_start, layer.momentum) == (16, 100, 1000, 0.02)


def test_bn_checkpoint_loads_strictly_and_back():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(), bn.running_mean.uniform_()
        bn.running_var.uniform_(1, 2)
    bn.num_batches_tracked.fill_(7)
    layer = MovingAverageBatchNorm2d(4, window=3)
    layer.load_state_dict(bn.state_dict())  # strict; the windows keep their (empty) values
    assert int(layer.chi2_count) == 0 and int(layer.sma_steps) == 0
    assert int(layer.num_batches_tracked) == 7
    bn.eval(), layer.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), bn(x))  # before MABN training: BN's eval map
    # after MABN training, the BN-keys part of the state loads into BN with the same eval map
    layer.train()
    for step in range(3):
        layer(torch.randn(2, 4, 3, 3) + step)
    layer.eval()
    back = nn.BatchNorm2d(4).eval()
    missing, unexpected = back.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and set(unexpected) == {
        "chi2_window",
        "psi_window",
        "chi2_count",
        "psi_count",
        "sma_steps",
    }
    torch.testing.assert_close(back(x), layer(x))


_MABN_STATE = ("chi2_window", "psi_window", "chi2_count", "psi_count", "sma_steps")


def _trained(steps: int = 5, **kwargs) -> MovingAverageBatchNorm2d:
    layer = MovingAverageBatchNorm2d(
        C, norm_batch_size=2, window=3, warmup=2, clamp_start=3, momentum=0.1, **kwargs
    )
    for step in range(steps):
        _train_step(layer, *_batch(step, BATCHES[step % 6], (3, 3), dtype=torch.float32))
    return layer


def test_versioned_checkpoint_round_trips_exactly(tmp_path):
    """The state_dict says its layout (version 3, in torch's metadata, also inside a model and
    through torch.save); loaded, it gives the same state and the same next step, bit for bit."""
    layer = _trained()
    assert MovingAverageBatchNorm2d._version == 3 > nn.BatchNorm2d._version
    assert layer.state_dict()._metadata[""]["version"] == 3
    model = nn.Sequential(nn.Conv2d(C, C, 1), _trained())
    assert model.state_dict()._metadata["1"]["version"] == 3
    torch.save(layer.state_dict(), tmp_path / "mabn.pt")
    loaded = MovingAverageBatchNorm2d(
        C, norm_batch_size=2, window=3, warmup=2, clamp_start=3, momentum=0.1
    )
    loaded.load_state_dict(torch.load(tmp_path / "mabn.pt"))
    for key, value in layer.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, g = _batch(9, 5, (3, 3), dtype=torch.float32)
    for a, e in zip(_train_step(loaded, x, g), _train_step(layer, x, g), strict=True):
        assert torch.equal(a, e)


def test_a_current_checkpoint_must_hold_the_windows():
    """Version 3 is complete: a state without the windows is reported missing (strict) instead
    of being taken for a BN checkpoint; strict=False keeps the layer's own windows."""
    state = _trained().state_dict()
    for name in _MABN_STATE:
        del state[name]
    layer = _trained(steps=2)
    windows = {name: getattr(layer, name).clone() for name in _MABN_STATE}
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict(state)
    result = layer.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == set(_MABN_STATE)
    for name, value in windows.items():
        assert torch.equal(getattr(layer, name), value), name


@pytest.mark.parametrize("version", [None, 2], ids=["no_metadata", "version2"])
def test_an_old_checkpoint_loads_as_before_versions(version):
    """No version (a state_dict copied without torch's metadata) or version 2 (BN's, or MABN's
    before versions) is upgraded: missing windows are the layer's own, float16 windows (saved
    by a half-precision module before they were kept in float32) become float32, also by
    assignment."""
    trained = _trained()
    state = trained.state_dict()
    for name in ("chi2_window", "psi_window"):
        state[name] = state[name].half()
    if version is None:
        state = dict(state)  # no torch metadata
    else:
        state._metadata[""]["version"] = version
    layer = MovingAverageBatchNorm2d(C, window=3).half()
    layer.load_state_dict(state, assign=True)
    assert layer.chi2_window.dtype == layer.psi_window.dtype == torch.float32
    assert torch.equal(layer.chi2_window, trained.chi2_window.half().float())
    assert int(layer.sma_steps) == int(trained.sma_steps)
    bn_state = nn.BatchNorm2d(C).state_dict()  # version 2, BN's keys only
    assert bn_state._metadata[""]["version"] == 2
    if version is None:
        bn_state = dict(bn_state)
    fresh = MovingAverageBatchNorm2d(C, window=3)
    fresh.load_state_dict(bn_state)  # strict: the windows keep their (empty) values
    assert int(fresh.chi2_count) == int(fresh.sma_steps) == 0


@pytest.mark.parametrize("version", [None, 2], ids=["no_metadata", "version2"])
def test_an_old_mabn_checkpoint_missing_some_entries_is_incomplete(version):
    """An old MABN checkpoint held all of MABN's entries: one without ``sma_steps`` is reported
    missing (strict), not completed with the layer's own step count beside the checkpoint's
    windows (warm-up and the clamping of r restarted in silence)."""
    state = _trained().state_dict()
    del state["sma_steps"]
    if version is None:
        state = dict(state)  # no torch metadata
    else:
        state._metadata[""]["version"] = version
    layer = MovingAverageBatchNorm2d(C, window=3)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"sma_steps\""):
        layer.load_state_dict(state)
    result = MovingAverageBatchNorm2d(C, window=3).load_state_dict(state, strict=False)
    assert result.missing_keys == ["sma_steps"]


def test_checkpoint_with_another_window_keeps_the_latest_values():
    small = MovingAverageBatchNorm2d(C, window=2, warmup=0)
    for step in range(3):
        _train_step(small, *_batch(step, 2, (2, 2), dtype=torch.float32))
    large = MovingAverageBatchNorm2d(C, window=4, warmup=0)
    large.load_state_dict(small.state_dict())
    assert int(large.chi2_count) == 2
    torch.testing.assert_close(large.chi2_window[2:], small.chi2_window)
    shrunk = MovingAverageBatchNorm2d(C, window=1, warmup=0)
    shrunk.load_state_dict(small.state_dict())
    assert int(shrunk.psi_count) == 1
    torch.testing.assert_close(shrunk.psi_window, small.psi_window[1:])


def test_reset_running_stats_empties_the_windows():
    layer = MovingAverageBatchNorm2d(C)
    _train_step(layer, *_batch(0, 2, (2, 2), dtype=torch.float32))
    layer.reset_running_stats()
    for name in ("chi2_window", "psi_window", "chi2_count", "psi_count", "sma_steps"):
        assert not getattr(layer, name).any(), name
    assert torch.all(layer.running_var == 1)


# -- errors ------------------------------------------------------------------------------------


def test_rejects_wrong_rank():
    with pytest.raises(
        ValueError, match=r"MovingAverageBatchNorm2d\(3\): expected a \(N, C, H, W\)"
    ):
        MovingAverageBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="MovingAverageBatchNorm3d for"):
        MovingAverageBatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"expected 3 channels in dim 1, got 5"):
        MovingAverageBatchNorm2d(3)(torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_with_the_layer_name_and_changes_nothing(bad):
    model = smallbn.convert(
        nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), MovingAverageBatchNorm2d
    )
    layer = model[1]
    _train_step(layer, *_batch(0, 2, (2, 2), dtype=torch.float32))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, 2, 2)
    x[1, 2, 0, 1] = bad
    with pytest.raises(
        FloatingPointError, match=r"MovingAverageBatchNorm2d\(3\) at '1'.*channel\(s\) \[2\]"
    ):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window=0), "window must be >= 1"),
        (dict(warmup=-1), "warmup and clamp_start"),
        (dict(r_min=2.0), "r_min <= 1 <= r_max"),
        (dict(r_max=0.5), "r_min <= 1 <= r_max"),
        (dict(norm_batch_size=0), "norm_batch_size must be >= 1"),
        (dict(momentum=0.98 + 1), "momentum"),
    ],
)
def test_rejects_bad_constructor_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MovingAverageBatchNorm2d(3, **kwargs)


# -- conversion ---------------------------------------------------------------------------------


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Linear(3, 3),
        nn.BatchNorm2d(4),
    )


def test_convert_centres_the_producing_conv_keeping_parameters():
    model = _model()
    weight = model[0].weight
    with pytest.warns(
        RuntimeWarning, match="Linear, left uncentred because Linear has no weight-centred variant"
    ):
        model = smallbn.convert(model, MovingAverageBatchNorm2d)
    assert isinstance(model[0], CenteredConv2d) and model[0].weight is weight
    assert isinstance(model[1], MovingAverageBatchNorm2d)
    assert model[1].producer_note == "Conv2d replaced by CenteredConv2d"
    assert type(model[3]) is nn.Linear  # not centred (warned)
    x = torch.randn(2, 2, 3, 3)
    model(x)  # trains
    assert torch.equal(model[0].weight, weight)


def test_bind_producer_accepts_an_already_centred_conv_silently():
    layer = MovingAverageBatchNorm2d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer.bind_producer(CenteredConv2d(2, 3, 3)) is None
    assert layer.producer_note == "CenteredConv2d producer is already weight-centred"


def test_center_producer_false_leaves_the_conv():
    model = smallbn.convert(_model(), MovingAverageBatchNorm2d, center_producer=False)
    assert type(model[0]) is nn.Conv2d
    assert model[1].producer_note.startswith("center_producer=False")


# -- two processes --------------------------------------------------------------------------------

WORLD = 2
# Local batch sizes per step and rank: unequal, empty, 1, empty on every rank (no state
# changes, decided on the device); and norm_batch_size per scenario.  With groups of 2 and 3
# several groups span both ranks (e.g. step 0: samples 2, 3 of the 8 are on rank 0 and 1).
DIST_SIZES = [[3, 5], [0, 2], [1, 1], [0, 0], [4, 3], [2, 0], [5, 4]]
DIST_SCENARIOS = {"whole_batch": None, "groups_of_2": 2, "groups_of_3": 3}
DIST_KW = dict(window=3, warmup=1, clamp_start=2, momentum=0.1, dtype=torch.float64)
DIST_STATE = (
    "running_var",
    "running_mean",
    "num_batches_tracked",
    "chi2_window",
    "psi_window",
    "chi2_count",
    "psi_count",
    "sma_steps",
)


def _dist_batch(step: int, rank: int, size: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randn(size, C, 2, 3, generator=gen, dtype=torch.float64) * (1 + step % 3)
    return x, torch.randn(size, C, 2, 3, generator=gen, dtype=torch.float64)


def _dist_worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name, b in DIST_SCENARIOS.items():
            layer = MovingAverageBatchNorm2d(C, sync=True, norm_batch_size=b, **DIST_KW)
            steps = []
            for step, sizes in enumerate(DIST_SIZES):
                y, gx, gw, gb = _train_step(layer, *_dist_batch(step, rank, sizes[rank]))
                state = {k: v.clone() for k, v in layer.state_dict().items()}
                steps.append((y, gx, gw, gb, state))
            results[name] = steps
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dist_scenarios_have_groups_spanning_both_ranks():
    """The data pin the meaning of norm_batch_size under sync: groups of the concatenated
    batch, several of which hold samples of both ranks (per-process groups would differ)."""
    for name, b in DIST_SCENARIOS.items():
        if b is None:
            continue
        spanning = sum(
            1
            for n0, n1 in DIST_SIZES
            for k in range(-(-(n0 + n1) // b))
            if k * b < n0 < min((k + 1) * b, n0 + n1)
        )
        assert spanning >= 3, name


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_sync_over_two_processes_equals_one_process(tmp_path):
    """sync=True normalizes the concatenation of the ranks' batches (rank order) as one process
    would, with the same norm_batch_size (groups of b consecutive samples of the global
    batch, a group may span both ranks): outputs, input gradients, the whole state after every
    step, and the weight/bias gradients summed over ranks (what DDP's all-reduce gives)."""
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, b in DIST_SCENARIOS.items():
        ref = MovingAverageBatchNorm2d(C, norm_batch_size=b, **DIST_KW)
        for step, sizes in enumerate(DIST_SIZES):
            batches = [_dist_batch(step, r, sizes[r]) for r in range(WORLD)]
            x = torch.cat([bx for bx, _ in batches])
            g = torch.cat([bg for _, bg in batches])
            y, gx, grad_w, grad_b = _train_step(ref, x, g)
            expected_state = ref.state_dict()
            start = 0
            for r in range(WORLD):
                part = slice(start, start + sizes[r])
                start += sizes[r]
                got_y, got_gx, _, _, state = ranks[r][name][step]
                what = f"{name}, step {step} (sizes {sizes}), rank {r}"
                if max(sizes) == 0:  # nothing anywhere: the whole state as before, uncounted
                    before = ranks[r][name][step - 1][4]
                    assert all(torch.equal(v, before[k]) for k, v in state.items()), what
                torch.testing.assert_close(got_y, y[part], **TOL, msg=what)
                torch.testing.assert_close(got_gx, gx[part], **TOL, msg=what)
                for key in DIST_STATE:
                    torch.testing.assert_close(
                        state[key], expected_state[key], **TOL, msg=f"{key}, {what}"
                    )
            what = f"{name}, step {step}: summed over ranks"
            torch.testing.assert_close(
                sum(ranks[r][name][step][2] for r in range(WORLD)), grad_w, **TOL, msg=what
            )
            torch.testing.assert_close(
                sum(ranks[r][name][step][3] for r in range(WORLD)), grad_b, **TOL, msg=what
            )
