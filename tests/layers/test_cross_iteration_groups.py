"""Cross-Iteration BN with ``norm_batch_size=b``: one call on a batch is exactly
``GroupedNorm(layer, b)`` — the layer called on each group of b consecutive samples in turn,
the groups acting as consecutive iterations — in outputs, gradients, running statistics and
window state, over SGD trajectories whose weights change (so stored entries are compensated);
plus the plain path, errors, checkpoints, the derivative budget and pooling across
processes (groups over the concatenated global batch)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import smallbn
import smallbn.layers.cross_iteration as cross_iteration
from _spawn import run_world
from _sync_training import assert_ranks_equal_concatenated, train_on_slices
from smallbn.layers.cross_iteration import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)

NORMS = {1: CrossIterationBatchNorm1d, 2: CrossIterationBatchNorm2d, 3: CrossIterationBatchNorm3d}


@dataclass(frozen=True)
class Producer:
    """The layer before the norm, the shape of one sample of its input and the norm's rank."""

    build: Callable[[], nn.Module]
    sample: tuple[int, ...]
    dim: int


PRODUCERS = {
    "conv1d": Producer(lambda: nn.Conv1d(3, 4, 3, padding=1, bias=False), (3, 7), 1),
    "conv2d": Producer(lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 5, 4), 2),
    "linear": Producer(lambda: nn.Linear(5, 4), (5,), 1),
    "conv3d": Producer(lambda: nn.Conv3d(2, 3, 3, padding=1, bias=False), (2, 3, 4, 3), 3),
    "strided_grouped": Producer(
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
        (4, 7, 6),
        2,
    ),
    "same_reflect": Producer(
        lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"), (3, 8), 1
    ),
}


def _pair(
    producer: str, size: int, dtype: torch.dtype = torch.float64, bind: bool = True, **options: Any
) -> tuple[nn.Sequential, nn.Sequential]:
    """Two identical producer + CBN blocks: the native ``norm_batch_size=size`` one and the
    GroupedNorm-wrapped one."""
    spec = PRODUCERS[producer]
    blocks = []
    for native in (True, False):
        torch.manual_seed(0)
        conv = spec.build().to(dtype)
        channels = conv.weight.shape[0]
        norm_options = {"norm_batch_size": size} if native else {}
        norm = NORMS[spec.dim](channels, dtype=dtype, **options, **norm_options)
        gen = torch.Generator().manual_seed(1)
        if norm.weight is not None:
            with torch.no_grad():
                norm.weight.copy_(torch.rand(channels, generator=gen, dtype=dtype) + 0.5)
                norm.bias.copy_(torch.randn(channels, generator=gen, dtype=dtype))
        block = nn.Sequential(conv, norm if native else smallbn.GroupedNorm(norm, size))
        if bind:
            smallbn.bind_producers(block)
        blocks.append(block)
    return blocks[0], blocks[1]


def _norm(block: nn.Sequential) -> cross_iteration.CrossIterationBatchNorm:
    layer = block[1]
    return layer.norm if isinstance(layer, smallbn.GroupedNorm) else layer


def _close(actual: Tensor | None, expected: Tensor | None, what: str, tol: float) -> None:
    """Close relative to the tensor's scale (a gradient that is zero up to rounding, such as a
    conv bias before plain BN, has no meaningful elementwise relative error)."""
    assert (actual is None) == (expected is None), what
    if actual is None or expected is None:
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _lockstep(
    producer: str,
    native: nn.Sequential,
    wrapped: nn.Sequential,
    batch: int,
    steps: int = 12,
    tol: float = 1e-9,
    lr: float = 0.1,
    seed: int = 2,
) -> None:
    """Train both blocks with the same batches and SGD (momentum: the weights keep changing),
    comparing outputs, gradients and the whole norm state after every step."""
    dtype = native[0].weight.dtype
    opts = [torch.optim.SGD(b.parameters(), lr=lr, momentum=0.9) for b in (native, wrapped)]
    gen = torch.Generator().manual_seed(seed)
    sample = PRODUCERS[producer].sample
    for step in range(steps):
        u = torch.randn(batch, *sample, generator=gen, dtype=dtype) * (1 + 0.1 * step) + 0.3
        inputs = [u.clone().requires_grad_() for _ in range(2)]
        outputs = [block(x) for block, x in zip((native, wrapped), inputs, strict=True)]
        g = torch.randn(outputs[0].shape, generator=gen, dtype=dtype)
        for y in outputs:
            (y * g).sum().backward()
        where = f"step {step}"
        _close(outputs[0], outputs[1], f"output ({where})", tol)
        _close(inputs[0].grad, inputs[1].grad, f"input gradient ({where})", tol)
        for (name, p), q in zip(native.named_parameters(), wrapped.parameters(), strict=True):
            _close(p.grad, q.grad, f"{name} gradient ({where})", tol)
        mine, theirs = _norm(native).state_dict(), _norm(wrapped).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            _close(mine[key], theirs[key], f"state {key} ({where})", tol)
        assert _norm(native)._iteration == _norm(wrapped)._iteration
        assert _norm(native)._fill == _norm(wrapped)._fill
        for opt in opts:
            opt.step()
            opt.zero_grad()


def _single_value_group(producer: str, batch: int, size: int) -> bool:
    """Whether some group would hold a single value per channel (BN's statistics fail)."""
    per_sample = 1 if producer == "linear" else 2  # every conv here keeps >= 2 positions
    last = batch - (-(-batch // size) - 1) * size
    return min(size, last) * per_sample <= 1


# -- equality with GroupedNorm --------------------------------------------------------------


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("batch", [4, 7])
@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("producer", ["conv1d", "conv2d", "linear"])
def test_native_groups_equal_grouped_norm_over_sgd_steps(
    producer: str, size: int, batch: int, compensate: bool
) -> None:
    native, wrapped = _pair(producer, size, window=3, compensate=compensate)
    if _single_value_group(producer, batch, size):
        for block in (native, wrapped):
            with pytest.raises(ValueError, match="more than one value per channel"):
                block(torch.randn(batch, *PRODUCERS[producer].sample, dtype=torch.float64))
        norm = _norm(native)
        assert int(norm.iteration) == 0 and int(norm.num_batches_tracked) == 0  # nothing counted
        return
    _lockstep(producer, native, wrapped, batch)


@pytest.mark.parametrize("producer", ["linear", "conv2d"])
@pytest.mark.parametrize(("batch", "size"), [(6, 2), (8, 3), (32, 2)])
def test_native_groups_equal_grouped_norm_more_sizes(producer: str, batch: int, size: int) -> None:
    native, wrapped = _pair(producer, size, window=None)  # k chosen from the group size
    _lockstep(producer, native, wrapped, batch)
    assert _norm(native).window_size == cross_iteration.recommended_window(size)


@pytest.mark.parametrize(
    "options",
    [
        {"window": 3, "burnin": 5},
        {"window": 4, "burnin": 9, "burnin_mode": "linear"},
        {"window": 8, "burnin": 20, "burnin_mode": "linear"},
        {"window": 3, "aggregation": "drop"},
        {"window": 3, "eps_placement": "outside"},
        {"window": 3, "momentum": None},
        {"window": 1},
        {"window": 5},
        {"window": 3, "affine": False},
        {"window": 3, "track_running_stats": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_native_groups_equal_grouped_norm_for_every_option(options: dict[str, Any]) -> None:
    native, wrapped = _pair("conv2d", 2, **options)
    _lockstep("conv2d", native, wrapped, 7, steps=14)


@pytest.mark.parametrize("producer", ["conv3d", "strided_grouped", "same_reflect"])
def test_native_groups_equal_grouped_norm_for_other_producers(producer: str) -> None:
    native, wrapped = _pair(producer, 2, window=3)
    _lockstep(producer, native, wrapped, 5, steps=10)


def test_naive_without_producer_equals_grouped_norm() -> None:
    native, wrapped = _pair("conv2d", 2, bind=False, window=4, compensate=False)
    _lockstep("conv2d", native, wrapped, 7)
    with pytest.warns(RuntimeWarning, match="no producing layer is bound"):
        native, wrapped = _pair("conv2d", 3, bind=False, window=4)  # compensate=True, unbound
        _lockstep("conv2d", native, wrapped, 8, steps=4)
    assert _norm(native).window_var_grad is None


@pytest.mark.parametrize("producer", ["conv2d", "linear"])
def test_float32_agrees_to_rounding(producer: str) -> None:
    native, wrapped = _pair(producer, 2, dtype=torch.float32, window=4)
    _lockstep(producer, native, wrapped, 8, tol=2e-5)


@given(
    batch=st.integers(1, 9),
    size=st.integers(1, 5),
    height=st.integers(1, 4),
    window=st.integers(1, 4),
    burnin=st.integers(0, 6),
    linear=st.booleans(),
    drop=st.booleans(),
)
def test_odd_sizes_and_schedules_equal_grouped_norm(
    batch: int, size: int, height: int, window: int, burnin: int, linear: bool, drop: bool
) -> None:
    torch.manual_seed(0)
    options = {
        "window": window,
        "burnin": burnin,
        "burnin_mode": "linear" if linear else "two_stage",
        "aggregation": "drop" if drop else "max",
        "dtype": torch.float64,
    }
    blocks = []
    for native in (True, False):
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 3, (height, 1), padding=(0, 0)).double()
        norm = CrossIterationBatchNorm2d(3, **options, norm_batch_size=size if native else None)
        block = nn.Sequential(conv, norm if native else smallbn.GroupedNorm(norm, size))
        smallbn.bind_producers(block)
        blocks.append(block)
    opts = [torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.9) for b in blocks]
    gen = torch.Generator().manual_seed(batch * 100 + size)
    for step in range(4):
        u = torch.randn(batch, 2, height + 1, 2, generator=gen, dtype=torch.float64) + step
        results: list[Any] = []
        for block in blocks:
            x = u.clone().requires_grad_()
            try:
                y = block(x)
            except ValueError as error:  # a group of one value: both must refuse it
                assert "more than one value per channel" in str(error)
                results.append(None)
                continue
            y.square().mean().backward()
            results.append((y.detach(), x.grad, [p.grad for p in block.parameters()]))
        assert (results[0] is None) == (results[1] is None)
        if results[0] is None:
            return
        (y1, g1, p1), (y2, g2, p2) = results
        _close(y1, y2, "output", 1e-9)
        _close(g1, g2, "input gradient", 1e-9)
        for a, b in zip(p1, p2, strict=True):
            _close(a, b, "parameter gradient", 1e-9)
        for key, value in _norm(blocks[0]).state_dict().items():
            _close(value, _norm(blocks[1]).state_dict()[key], key, 1e-9)
        for opt in opts:
            opt.step()
            opt.zero_grad()


# -- plain path, eval, options ----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_a_batch_of_at_most_b_samples_is_one_iteration(batch: int) -> None:
    grouped, plain = _pair("conv2d", 3, window=3)
    plain = nn.Sequential(plain[0], plain[1].norm)  # the layer itself, no wrapper
    for step in range(4):
        u = torch.randn(batch, 3, 5, 4, dtype=torch.float64) + step
        assert torch.equal(grouped(u), plain(u))
    assert torch.equal(_norm(grouped).window_mean, _norm(plain).window_mean)
    assert int(_norm(grouped).iteration) == 4


def test_eval_is_bn_with_running_statistics() -> None:
    native, _ = _pair("conv2d", 2, window=3)
    for _ in range(3):
        native(torch.randn(6, 3, 5, 4, dtype=torch.float64))
    native.eval()
    norm = _norm(native)
    u = torch.randn(6, 3, 5, 4, dtype=torch.float64)
    x = native[0](u)
    expected = nn.functional.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
    )
    before = copy.deepcopy(norm.state_dict())
    torch.testing.assert_close(native(u), expected)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("size", [0, -2, True, 1.5])
def test_bad_norm_batch_size_is_an_error_naming_the_layer_and_the_fix(size: Any) -> None:
    if size == 1.5:  # int() of a float: accepted as 1, as the other layers do
        assert CrossIterationBatchNorm2d(4, norm_batch_size=size).norm_batch_size == 1
        return
    with pytest.raises(
        ValueError,
        match=r"CrossIterationBatchNorm2d: norm_batch_size is the number of samples of each "
        r"simulated normalization batch .* must be >= 1, or None to make the whole batch one "
        r"iteration; got ",
    ):
        CrossIterationBatchNorm2d(4, norm_batch_size=size)


def test_repr_and_registry_pass_the_option() -> None:
    layer = smallbn.build_norm("cbn", 4, dim=2, norm_batch_size=2, window=3)
    assert isinstance(layer, CrossIterationBatchNorm2d) and layer.norm_batch_size == 2
    assert "norm_batch_size=2" in repr(layer)


def test_rejected_batches_change_nothing() -> None:
    native, _ = _pair("linear", 2, window=3)
    norm = _norm(native)
    native(torch.randn(6, 5, dtype=torch.float64))
    state = copy.deepcopy(norm.state_dict())
    with pytest.raises(ValueError, match=r"smallest group of samples \(norm_batch_size=2, batch 5"):
        native(torch.randn(5, 5, dtype=torch.float64))  # the last group: one value
    x = torch.randn(6, 4, dtype=torch.float64)
    x[4, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in channel\(s\) \[1\]"):
        norm(x)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert norm._iteration == 3 and norm._fill == int(norm.window_fill)


# -- cost: derivatives only where a later iteration reads them ---------------------------------


@pytest.mark.parametrize(
    ("window", "burnin", "expected"),
    [
        (3, 0, [3, 3, 3]),
        (8, 0, [8, 8, 8]),
        # two-stage burn-in: iteration t is recorded from t = burnin − (k − 1) on
        (3, 40, [0, 0, 3]),  # iterations 38, 39, … of the third call (32 … 47)
        (8, 20, [3, 8, 8]),  # iterations 13, 14, 15 of the first call
    ],
)
def test_derivatives_for_the_last_k_recorded_groups_only_in_one_batched_call(
    window: int, burnin: int, expected: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = cross_iteration.group_derivatives

    def counting(producer: nn.Module, u: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        calls.append(u.shape[0])
        return original(producer, u, *args)

    monkeypatch.setattr(cross_iteration, "group_derivatives", counting)
    native, wrapped = _pair("conv2d", 2, window=window, burnin=burnin)
    for groups in expected:
        calls.clear()
        u = torch.randn(32, 3, 5, 4, dtype=torch.float64)  # 16 groups
        torch.testing.assert_close(native(u), wrapped(u), rtol=1e-9, atol=1e-9)
        assert calls == ([groups] if groups else [])


# -- exactness and checkpoints ---------------------------------------------------------------


def test_frozen_producer_compensates_exactly_nothing() -> None:
    compensated, _ = _pair("conv2d", 2, window=4)
    naive, _ = _pair("conv2d", 2, window=4, compensate=False)
    for block in (compensated, naive):
        block[0].requires_grad_(False)
    opts = [torch.optim.SGD(b.parameters(), lr=0.5) for b in (compensated, naive)]
    for step in range(5):
        u = torch.randn(7, 3, 5, 4, dtype=torch.float64) + step
        y, y_naive = compensated(u), naive(u)
        assert torch.equal(y, y_naive)
        for out in (y, y_naive):
            out.square().sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert _norm(compensated).window_var_grad is not None  # derivatives were recorded


def _train(block: nn.Sequential, opt: torch.optim.Optimizer, steps: range) -> list[Tensor]:
    outputs = []
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        u = torch.randn(7, 3, 5, 4, generator=gen, dtype=torch.float64) * (1 + 0.2 * step)
        y = block(u)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outputs.append(y.detach())
    return outputs


@pytest.mark.parametrize("source", ["native", "wrapped"])
def test_resuming_from_a_checkpoint_continues_identically(source: str) -> None:
    """A native run resumes from its own checkpoint or from a GroupedNorm run's (the layer's
    state means the same in both)."""
    full, _ = _pair("conv2d", 2, window=3, burnin=6, burnin_mode="linear")
    full_opt = torch.optim.SGD(full.parameters(), lr=0.3, momentum=0.9)
    expected = _train(full, full_opt, range(9))

    first = _pair("conv2d", 2, window=3, burnin=6, burnin_mode="linear")[source == "wrapped"]
    first_opt = torch.optim.SGD(first.parameters(), lr=0.3, momentum=0.9)
    _train(first, first_opt, range(4))
    conv_state = copy.deepcopy(first[0].state_dict())
    norm_state = copy.deepcopy(_norm(first).state_dict())
    opt_state = copy.deepcopy(first_opt.state_dict())

    torch.manual_seed(5)  # other initial weights: everything comes from the checkpoint
    resumed = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1).double(),
        CrossIterationBatchNorm2d(4, window=3, burnin=6, burnin_mode="linear", norm_batch_size=2,
                                  dtype=torch.float64),
    )  # fmt: skip
    resumed[0].load_state_dict(conv_state)
    resumed[1].load_state_dict(norm_state)
    smallbn.bind_producers(resumed)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    resumed_opt.load_state_dict(opt_state)
    for got, want in zip(_train(resumed, resumed_opt, range(4, 9)), expected[4:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# -- pooling across processes ----------------------------------------------------------------

#: Per-rank batch sizes per step (b = 2): groups spanning both ranks, an empty rank, and a
#: global batch of at most b (the plain path).
SYNC_SIZES = [[3, 2], [1, 4], [0, 5], [1, 1], [4, 3], [2, 3], [5, 0]]


def _sync_block(sync: bool) -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        CrossIterationBatchNorm2d(4, window=None, sync=sync, norm_batch_size=2),
    ).double()
    smallbn.bind_producers(block)
    return block


def _sync_body(rank: int, world: int) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every step compensated, nothing falls back
        return train_on_slices(_sync_block(sync=True), SYNC_SIZES, rank, record_state=True)


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_sync_groups_span_the_concatenated_batch(tmp_path: Path) -> None:
    """With ``sync=True`` the groups are b consecutive samples of the concatenation of every
    process's batch (rank order), as Ghost BN, BRN and SN form them: two processes equal one
    process on the concatenated batch."""
    world = 2
    ranks = run_world(_sync_body, world, tmp_path)
    expected = train_on_slices(_sync_block(sync=False), SYNC_SIZES, None, record_state=True)
    assert_ranks_equal_concatenated(
        ranks, expected, SYNC_SIZES, lambda a, b, what: _close(a, b, what, 1e-9)
    )
