"""Helpers shared by the layer tests: inputs, affine initialization and lockstep comparison
of a smallbn layer with an independent implementation (torch.nn.BatchNorm or tests/reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import Tensor, nn

#: Registered methods whose eval forward is BN's per-channel affine map of their state
#: (foldable, and the same function after converting back to BN).
AFFINE_IN_EVAL = frozenset(
    {"bn", "syncbn", "brn", "ghostbn", "frozenbn", "domainbn", "mabn", "cbn", "shufflebn"}
)

BN_STATE_KEYS = list(nn.BatchNorm2d(3).state_dict().keys())

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# Input shapes covering 1d without and with length, 2d and 3d.
SHAPES = [(6, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 3, 2, 4)]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def make_input(
    shape: tuple[int, ...],
    seed: int,
    dtype: torch.dtype = torch.float64,
    loc: float | Tensor = 0.0,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """Normal data with a different mean and spread per channel (so channels are not alike),
    shifted by ``loc`` and stretched by ``scale``; generated in float64, then cast."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    view = (1, channels, *([1] * (len(shape) - 2)))
    per_loc = torch.linspace(-1.0, 2.0, channels, dtype=torch.float64).reshape(view)
    per_scale = torch.linspace(0.5, 2.5, channels, dtype=torch.float64).reshape(view)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * per_scale + per_loc
    return (x * scale + loc).to(dtype)


def randomize_affine(layer: nn.Module, seed: int) -> tuple[Tensor, Tensor]:
    """Set a layer's weight/bias to random values; returns float64 copies of what the layer
    holds (after rounding to its dtype)."""
    gen = torch.Generator().manual_seed(seed)
    c = layer.weight.shape[0]
    weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.weight.detach().double(), layer.bias.detach().double()


def close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        rtol=tol,
        atol=tol,
        msg=lambda m: f"{what}: {m}",
    )


def check_step(
    layer_forward: Callable[[Tensor], Tensor],
    ref_forward: Callable[[Tensor], Tensor],
    x: Tensor,
    grad_out: Tensor,
    tol: float,
    params: list[tuple[str, Tensor | None, Tensor | None]] = (),
    grad_tol: float | None = None,
    grads: bool = True,
) -> Tensor:
    """One forward/backward of both implementations on copies of ``x``; compares outputs,
    input gradients and the ``(name, layer_param, ref_param)`` gradients (which are then
    reset).  Returns the layer's output."""
    grad_tol = tol if grad_tol is None else grad_tol
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    ya, yb = layer_forward(xa), ref_forward(xb)
    assert ya.shape == x.shape and ya.dtype == x.dtype
    close(ya, yb, tol, "output")
    if not grads:
        return ya
    (ya.double() * grad_out).sum().backward()
    (yb.double() * grad_out).sum().backward()
    close(xa.grad, xb.grad, grad_tol, "input gradient")
    for name, pa, pb in params:
        if pa is None and pb is None:
            continue
        assert pa is not None and pb is not None and pa.grad is not None, name
        close(pa.grad, pb.grad, grad_tol, f"{name} gradient")
        pa.grad, pb.grad = None, None
    return ya


def lockstep_vs_torch_bn(
    layer: nn.Module,
    shape: tuple[int, ...],
    steps: int = 3,
    seed: int = 0,
    tol: float = 1e-6,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
) -> None:
    """Train ``layer`` (float64) and torch's BatchNorm side by side for ``steps`` steps,
    comparing outputs, gradients, running statistics and the step counter; then compare
    evaluation outputs."""
    bn = TORCH_BN[len(shape)](
        shape[1],
        momentum=momentum,
        affine=affine,
        track_running_stats=track_running_stats,
        dtype=torch.float64,
    )
    if affine:
        randomize_affine(layer, seed)
        bn.load_state_dict(layer.state_dict())
    layer.train()
    bn.train()
    gen = torch.Generator().manual_seed(seed + 1)
    params = [("weight", layer.weight, bn.weight), ("bias", layer.bias, bn.bias)]
    for step in range(steps):
        x = make_input(shape, seed + 10 * step, loc=0.7 * step, scale=1.0 + step)
        g = upstream(shape, gen)
        check_step(layer, bn, x, g, tol, params)
        if track_running_stats:
            close(layer.running_mean, bn.running_mean, tol, f"running_mean after step {step}")
            close(layer.running_var, bn.running_var, tol, f"running_var after step {step}")
            assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
        else:
            assert layer.running_mean is None and layer.num_batches_tracked is None
    layer.eval()
    bn.eval()
    x = make_input(shape, seed + 99, loc=0.5)
    g = upstream(shape, gen)
    check_step(layer, bn, x, g, tol, params)


# -- property-based comparisons with tests/reference.py --------------------------------------

# Tolerances by input dtype for outputs and running statistics (bfloat16: 8 mantissa bits,
# and the layers compute the output in the input's dtype).
TOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.bfloat16: 8e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    param_dtype: torch.dtype
    seed: int
    loc: float
    scale: float

    @property
    def values_per_sample(self) -> int:
        return math.prod(self.shape[2:])


@st.composite
def cases(draw, ndims=(2, 3, 4, 5), min_batch: int = 1, max_batch: int = 6) -> Case:
    """Input shape (batch 1 included), input dtype, parameter dtype (the input's, or float32
    as under autocast), data seed, offset and scale.  Guarantees at least two values per
    channel."""
    ndim = draw(st.sampled_from(ndims))
    n = draw(st.integers(min_batch, max_batch))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(ndim - 2))
    assume(n * math.prod(spatial) >= 2)
    dtype = draw(st.sampled_from(DTYPES))
    param_dtype = draw(st.sampled_from(sorted({dtype, torch.float32}, key=str)))
    scale = draw(st.sampled_from([1.0, 0.05, 20.0]))
    loc = scale * draw(st.sampled_from([0.0, 1.0, -2.0]))
    return Case(
        (n, draw(st.integers(1, 4)), *spatial),
        dtype,
        param_dtype,
        draw(st.integers(0, 2**16)),
        loc,
        scale,
    )


def conditioned_input(case: Case, step: int) -> Tensor:
    """``loc + scale·(±1 + U(−½, ½))`` with the sign alternating along the flattened
    ``(N, *spatial)`` order: any two consecutive values differ by at least ``scale``, so every
    group of consecutive samples has a spread of order ``scale`` and half-precision
    tolerances stay meaningful (a near-constant group would amplify rounding without bound)."""
    gen = torch.Generator().manual_seed(case.seed + 7919 * step)
    n, c = case.shape[:2]
    k = case.values_per_sample
    sign = (1 - 2 * (torch.arange(n * k) % 2)).to(torch.float64).reshape(n, 1, k)
    noise = torch.rand((n, c, k), generator=gen, dtype=torch.float64) - 0.5
    shift = step * 0.3 * case.scale  # the batch statistics move from step to step
    x = case.loc + shift + case.scale * (sign + noise)
    return x.reshape(case.shape).to(case.dtype)


def run_case(
    layer: nn.Module,
    ref: object,
    case: Case,
    steps: int = 2,
    layer_call: Callable[[nn.Module, Tensor, int], Tensor] | None = None,
    ref_train: Callable[[object, Tensor, int], Tensor] | None = None,
    ref_eval: Callable[[object, Tensor], Tensor] | None = None,
) -> None:
    """Train ``layer`` and a reference (built from the layer's affine, in float64) for
    ``steps`` steps on ``case``'s inputs; compare outputs, gradients (float32/float64 inputs),
    running statistics after each step, and the evaluation output."""
    layer_call = layer_call or (lambda m, x, step: m(x))
    ref_train = ref_train or (lambda r, x, step: r.train_step(x))
    ref_eval = ref_eval or (lambda r, x: r.eval(x))
    tol = max(TOL[case.dtype], TOL[case.param_dtype])
    grads = case.dtype != torch.bfloat16
    gen = torch.Generator().manual_seed(case.seed)
    params = [("weight", layer.weight, ref.weight), ("bias", layer.bias, ref.bias)]
    layer.train()
    for step in range(steps):
        x = conditioned_input(case, step)
        g = upstream(case.shape, gen)
        check_step(
            lambda u, step=step: layer_call(layer, u, step),
            lambda u, step=step: ref_train(ref, u, step),
            x,
            g,
            tol,
            params,
            grad_tol=max(tol, 1e-4) if case.dtype == torch.float32 else tol,
            grads=grads,
        )
        for name in ("running_mean", "running_var"):
            actual, expected = getattr(layer, name), getattr(ref, name)
            if isinstance(expected, list):
                expected = torch.stack(expected)
            torch.testing.assert_close(
                actual.double(),
                expected,
                rtol=tol,
                atol=tol * max(1.0, case.scale**2),
                msg=lambda m, name=name, step=step: f"{name} after step {step}: {m}",
            )
    layer.eval()
    x = conditioned_input(case, steps)
    with torch.no_grad():
        close(layer_call(layer, x, steps), ref_eval(ref, x), tol, "eval output")


def upstream(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """A random float64 upstream gradient dL/dy."""
    return torch.randn(shape, generator=gen, dtype=torch.float64)
