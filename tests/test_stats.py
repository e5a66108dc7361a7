"""The statistics core (smallbn.stats, smallbn._distributed) against numpy float64 and
against direct formulas: moments, merging by count and by index, accumulation dtypes,
memory formats, numerical accuracy at large offsets, and gradients."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from smallbn import _distributed
from smallbn.stats import (
    Moments,
    all_gather_moments,
    apply_affine,
    apply_channel_affine,
    channel_moments,
    detached_channel_moments,
    ema_after,
    ema_sequence,
    group_sizes,
    merge_equal_moments,
    merge_moments,
    normalize,
    normalize_from_sample_moments,
    normalize_with_population,
    sample_groups,
    sample_moments,
    stats_dtype,
    update_running_stats,
)

SHAPES = [(5, 3), (1, 3, 6), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 3, 4), (1, 2, 1, 1)]


def np_channel(x: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """numpy float64 (count, mean, biased var) per channel over (N, *spatial)."""
    a = np.moveaxis(x.detach().double().numpy(), 1, 0).reshape(x.shape[1], -1)
    return a.shape[1], a.mean(axis=1), a.var(axis=1)


def np_sample(x: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """numpy float64 (count, mean, biased var) per (sample, channel) over *spatial."""
    a = x.detach().double().numpy().reshape(x.shape[0], x.shape[1], -1)
    return a.shape[2], a.mean(axis=2), a.var(axis=2)


def rand(shape: tuple[int, ...], seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def stack(parts: list[Moments]) -> Moments:
    return Moments(
        torch.stack([p.count for p in parts]),
        torch.stack([p.mean for p in parts]),
        torch.stack([p.var for p in parts]),
    )


def assert_np(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-10) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=tol, atol=tol)


# -- channel_moments / sample_moments ------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_channel_moments_match_numpy(shape):
    x = rand(shape)
    m = channel_moments(x)
    count, mean, var = np_channel(x)
    assert m.count.shape == () and float(m.count) == count
    assert m.mean.shape == m.var.shape == (shape[1],)
    assert_np(m.mean, mean)
    assert_np(m.var, var)
    assert_np(m.second_moment, var + mean**2)
    if count > 1:
        assert_np(m.unbiased_var(), var * count / (count - 1))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sample_moments_match_numpy(shape):
    x = rand(shape, seed=1)
    m = sample_moments(x)
    count, mean, var = np_sample(x)
    assert m.count.shape == (shape[0],) and (m.count == count).all()
    assert m.mean.shape == m.var.shape == shape[:2]
    assert_np(m.mean, mean)
    assert_np(m.var, var)  # a (N, C) input: each sample's variance is 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_detached_channel_moments_match_numpy(shape, dtype):
    x = rand(shape, seed=5, dtype=dtype).requires_grad_(dtype != torch.bfloat16)
    m = detached_channel_moments(x)
    count, mean, var = np_channel(x)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert not (m.mean.requires_grad or m.var.requires_grad)
    assert m.mean.dtype == stats_dtype(dtype) and m.mean.shape == (shape[1],)
    assert float(m.count) == count
    assert_np(m.mean, mean, tol)
    assert_np(m.var, var, tol)


def test_detached_channel_moments_channels_last_and_large_offset():
    gen = torch.Generator().manual_seed(6)
    x = (1e4 + torch.randn(6, 3, 8, 8, generator=gen)).float()
    count, mean, var = np_channel(x)
    for xs in (x, x.to(memory_format=torch.channels_last)):
        m = detached_channel_moments(xs)
        assert_np(m.mean, mean, 1e-6)
        np.testing.assert_allclose(m.var.numpy(), var, rtol=2e-3)  # as channel_moments


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 3), (1, 3, 6), (2, 3, 4, 5), (2, 3, 2, 3, 4)], ids=str)
def test_apply_channel_affine_is_scale_times_x_plus_shift(shape, dtype):
    x = rand(shape, seed=7, dtype=dtype)
    scale, shift = rand((shape[1],), seed=8), rand((shape[1],), seed=9)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    expected = x.double() * scale.view(view) + shift.view(view)
    y = apply_channel_affine(x, scale.float(), shift.float())
    assert y.dtype == dtype and y.shape == x.shape
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(y, apply_affine(x, scale.float(), shift.float()))


def test_unbiased_var_of_single_values_is_the_biased_one():
    m = Moments(torch.tensor([1.0, 4.0]), torch.zeros(2, 3), torch.full((2, 3), 2.0))
    torch.testing.assert_close(m.unbiased_var(), torch.tensor([[2.0] * 3, [2.0 * 4 / 3] * 3]))


def test_empty_batch_gives_zero_count_and_keeps_the_graph():
    x = torch.randn(0, 3, 4, dtype=torch.float64, requires_grad=True)
    m = channel_moments(x)
    assert float(m.count) == 0 and (m.mean == 0).all() and (m.var == 0).all()
    (m.mean.sum() + m.var.sum()).backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_stats_dtype():
    assert stats_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert stats_dtype(dtype) == torch.float32


# -- merging ---------------------------------------------------------------------------------


@st.composite
def split_batches(draw):
    """A float64 batch (N, C, *spatial), 0 to 3 spatial dims, and a split of N into pieces
    (empty pieces allowed, N may be 1)."""
    pieces = draw(st.lists(st.integers(0, 4), min_size=1, max_size=6))
    if sum(pieces) == 0:
        pieces[draw(st.integers(0, len(pieces) - 1))] = 1
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    channels = draw(st.integers(1, 4))
    shape = (sum(pieces), channels, *spatial)
    loc = draw(st.sampled_from([0.0, 3.0, -100.0]))
    x = rand(shape, seed=draw(st.integers(0, 2**16))) + loc
    return x, pieces


@given(split_batches())
def test_merge_of_any_split_equals_moments_of_the_whole(batch):
    x, pieces = batch
    parts = [channel_moments(p) for p in torch.split(x, pieces, dim=0)]
    merged = merge_moments(stack(parts))
    count, mean, var = np_channel(x)
    assert float(merged.count) == count
    assert_np(merged.mean, mean, 1e-9)
    assert_np(merged.var, var, 1e-9)
    if count > 1:
        assert_np(merged.unbiased_var(), var * count / (count - 1), 1e-9)
    # merging per-sample summaries (Ghost BN's route) gives the same
    per_sample = merge_moments(sample_moments(x))
    assert_np(per_sample.mean, mean, 1e-9)
    assert_np(per_sample.var, var, 1e-9)


@given(split_batches(), st.integers(1, 4), st.data())
def test_merge_by_index_equals_moments_of_each_group(batch, num_groups, data):
    x, _ = batch
    n = x.shape[0]
    groups = data.draw(st.lists(st.integers(0, num_groups - 1), min_size=n, max_size=n))
    index = torch.tensor(groups, dtype=torch.long)
    merged = merge_moments(sample_moments(x), index, num_groups)
    assert merged.count.shape == (num_groups,)
    assert merged.mean.shape == merged.var.shape == (num_groups, x.shape[1])
    for g in range(num_groups):
        members = [i for i, k in enumerate(groups) if k == g]
        if not members:  # an empty group: zero count, zero mean and variance
            assert float(merged.count[g]) == 0
            assert (merged.mean[g] == 0).all() and (merged.var[g] == 0).all()
            continue
        count, mean, var = np_channel(x[members])
        assert float(merged.count[g]) == count
        assert_np(merged.mean[g], mean, 1e-9)
        assert_np(merged.var[g], var, 1e-9)


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 6), st.integers(0, 1))
def test_merge_of_equal_counts_equals_the_general_merge(n, c, size, dim):
    x = rand((n, c, size), seed=n * 100 + c * 10 + size)
    instance = sample_moments(x)  # every summary counts `size` values
    mean, var = merge_equal_moments(instance.mean, instance.var, dim)
    if dim == 0:
        expected = merge_moments(instance)
        want_mean, want_var = expected.mean.unsqueeze(0), expected.var.unsqueeze(0)
    else:
        by_channel = Moments(
            instance.count.unsqueeze(0).expand(c, n),
            instance.mean.t().unsqueeze(-1),
            instance.var.t().unsqueeze(-1),
        )
        expected = merge_moments(by_channel)
        want_mean, want_var = expected.mean, expected.var
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    # and both equal numpy's variance of the pooled values
    values = x.numpy()
    if dim == 0:  # per channel over (N, size)
        want = np.moveaxis(values, 1, 0).reshape(c, -1).var(axis=1)
        np.testing.assert_allclose(var[0].numpy(), want, rtol=1e-10, atol=1e-12)
    else:  # per sample over (C, size)
        want = values.reshape(n, -1).var(axis=1)
        np.testing.assert_allclose(var[:, 0].numpy(), want, rtol=1e-10, atol=1e-12)


def test_merge_by_index_needs_num_groups():
    m = sample_moments(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match="num_groups is required"):
        merge_moments(m, torch.zeros(4, dtype=torch.long))


def test_merge_ignores_empty_summaries_exactly():
    x = rand((3, 2, 5))
    m = channel_moments(x)
    empty = channel_moments(x[:0])
    merged = merge_moments(stack([empty, m, empty]))
    torch.testing.assert_close(merged.mean, m.mean, rtol=0, atol=0)
    torch.testing.assert_close(merged.var, m.var, rtol=0, atol=0)


# -- dtypes, memory formats, accuracy ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 3), (16, 3, 64), (8, 3, 16, 16)], ids=str)
def test_half_inputs_accumulate_in_float32(dtype, shape):
    x = rand(shape, seed=2, dtype=dtype) + 4  # offset: E[x²] accumulated in half would be off
    truth = np_channel(x)  # numpy float64 over exactly the half-precision values
    for m in (channel_moments(x), merge_moments(sample_moments(x))):
        assert m.mean.dtype == m.var.dtype == torch.float32
        assert_np(m.mean, truth[1], 1e-5)
        assert_np(m.var, truth[2], 1e-4)
    per_sample = sample_moments(x)
    assert per_sample.mean.dtype == torch.float32
    assert_np(per_sample.mean, np_sample(x)[1], 1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 4, 3, 5, 6)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_channels_last_gives_the_same_moments(shape, dtype):
    x = rand(shape, seed=3, dtype=dtype)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    xl = x.to(memory_format=fmt)
    assert not xl.is_contiguous() and xl.is_contiguous(memory_format=fmt)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for f in (channel_moments, sample_moments):
        a, b = f(x), f(xl)
        torch.testing.assert_close(a.mean, b.mean, rtol=tol, atol=tol)
        torch.testing.assert_close(a.var, b.var, rtol=tol, atol=tol)
    count, mean, var = np_channel(x)
    assert_np(channel_moments(xl).var, var, tol)
    ml, m = channel_moments(xl), channel_moments(x)
    y, expected = normalize(xl, ml.mean, ml.var, 1e-5), normalize(x, m.mean, m.var, 1e-5)
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_large_mean_offset_stays_accurate_in_float32():
    # |μ| = 1e4 ≫ σ = 1: accumulating Σx² in float32 would lose the variance entirely.
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + torch.randn(12, 3, 16, 16, generator=gen)).float()
    count, mean, var = np_channel(x)  # float64 truth of the float32 values
    naive = x.double().square().mean(dim=(0, 2, 3)).float() - x.mean(dim=(0, 2, 3)).square()
    assert (naive - torch.from_numpy(var).float()).abs().max() > 0.05  # the trap is real
    parts = [channel_moments(p) for p in torch.split(x, [1, 0, 5, 2, 4], dim=0)]
    for m in (channel_moments(x), merge_moments(stack(parts)), merge_moments(sample_moments(x))):
        assert m.var.dtype == torch.float32
        assert_np(m.mean, mean, 1e-6)
        np.testing.assert_allclose(m.var.numpy(), var, rtol=2e-3)
    # normalizing with them: unit variance, zero mean
    m = merge_moments(stack(parts))
    y = normalize(x, m.mean, m.var, 1e-5).double()
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (y.var(dim=(0, 2, 3), correction=0) - 1).abs().max() < 5e-3


# -- gradients --------------------------------------------------------------------------------


def test_gradients_of_merged_moments_equal_direct_ones():
    x = rand((7, 3, 4, 2), seed=5).requires_grad_(True)
    gen = torch.Generator().manual_seed(6)
    wm, wv = torch.randn(2, 3, generator=gen, dtype=torch.float64)

    def loss_of(m: Moments) -> torch.Tensor:
        return (wm * m.mean).sum() + (wv * m.var).sum() + (m.mean * m.var).sum()

    def grad(loss: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss, x)
        return g

    parts = [channel_moments(p) for p in torch.split(x, [2, 0, 4, 1], dim=0)]
    g_split = grad(loss_of(merge_moments(stack(parts))))
    g_samples = grad(loss_of(merge_moments(sample_moments(x))))
    index = torch.tensor([0, 1, 0, 0, 1, 1, 1])
    by_group = merge_moments(sample_moments(x), index, 2)
    g_groups = grad(loss_of(merge_moments(by_group)))
    g_direct = grad(loss_of(channel_moments(x)))
    # formulas written out: mean and biased variance over (N, H, W)
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    g_truth = grad(loss_of(Moments(torch.tensor(56.0), mean, var)))
    for g in (g_split, g_samples, g_groups, g_direct):
        torch.testing.assert_close(g, g_truth, rtol=1e-10, atol=1e-12)


def test_gradcheck_moments_merge_normalize():
    x = rand((5, 2, 3), seed=7).requires_grad_(True)
    w = torch.tensor([1.5, 0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)

    def by_pieces(x, w, b):
        parts = [channel_moments(p) for p in torch.split(x, [2, 0, 3], dim=0)]
        m = merge_moments(stack(parts))
        return normalize(x, m.mean, m.var, 1e-3, w, b)

    def by_groups(x, w, b):
        m = merge_moments(sample_moments(x), torch.tensor([0, 0, 1, 1, 1]), 2)
        index = torch.tensor([0, 0, 1, 1, 1])
        return normalize(x, m.mean[index], m.var[index], 1e-3, w, b)

    assert torch.autograd.gradcheck(by_pieces, (x, w, b))
    assert torch.autograd.gradgradcheck(by_pieces, (x, w, b))
    assert torch.autograd.gradcheck(by_groups, (x, w, b))


# -- normalization from per-sample moments (Ghost BN, grouped BRN, SN, DomainBN) ------------


def _mixture_statistics(index: torch.Tensor, groups: int, logits, weight, bias, per_sample_affine):
    """A statistics function exercising every kind of dependence: per-group merge (Ghost BN),
    instance and layer branches mixed by softmax logits (SN), a per-sample affine (BRN)."""

    def statistics(instance: Moments):
        merged = merge_moments(instance, index, groups)
        n, c = instance.mean.shape
        layer = merge_moments(
            Moments(
                instance.count.unsqueeze(0).expand(c, n),
                instance.mean.t().unsqueeze(-1),
                instance.var.t().unsqueeze(-1),
            )
        )
        mix = torch.softmax(logits, 0)
        mean = mix[0] * instance.mean + mix[1] * layer.mean + mix[2] * merged.mean[index]
        var = mix[0] * instance.var + mix[1] * layer.var + mix[2] * merged.var[index]
        if per_sample_affine:
            scale = 1.0 + 0.1 * index.to(mean.dtype).unsqueeze(1)  # a constant per group, as r
            return mean, var, weight * scale, bias + scale
        return mean, var, weight, bias

    return statistics


@pytest.mark.parametrize("per_sample_affine", [False, True], ids=["affine", "per-sample-affine"])
@pytest.mark.parametrize("shape", [(6, 3, 4), (6, 3, 4, 5), (6, 2, 2, 3, 2), (1, 3, 4, 4)])
def test_normalize_from_sample_moments_gradcheck_and_equals_autograd(shape, per_sample_affine):
    x = rand(shape, seed=11).requires_grad_(True)
    c = shape[1]
    weight = torch.linspace(0.5, 1.5, c, dtype=torch.float64).requires_grad_(True)
    bias = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).requires_grad_(True)
    logits = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    index = torch.arange(shape[0]) // 2
    groups = int(index.max()) + 1

    def fused(x, weight, bias, logits):
        stats = _mixture_statistics(index, groups, logits, weight, bias, per_sample_affine)
        return normalize_from_sample_moments(x, stats, 1e-3, (weight, bias, logits))

    def reference(x, weight, bias, logits):
        stats = _mixture_statistics(index, groups, logits, weight, bias, per_sample_affine)
        mean, var, w, b = stats(sample_moments(x))
        return normalize(x, mean, var, 1e-3, w, b)

    inputs = (x, weight, bias, logits)
    assert torch.autograd.gradcheck(fused, inputs)
    grad_y = rand(shape, seed=12)
    expected = torch.autograd.grad(reference(*inputs), inputs, grad_y)
    y = fused(*inputs)
    torch.testing.assert_close(y, reference(*inputs), rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, inputs, grad_y), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if len(shape) in (4, 5):  # the channels-last path (no row reshape): the same gradients
        layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        xc = x.detach().contiguous(memory_format=layout).requires_grad_(True)
        assert not xc.is_contiguous()
        inputs_cl = (xc, weight, bias, logits)
        got = torch.autograd.grad(fused(*inputs_cl), inputs_cl, grad_y)
        for g, want in zip(got, expected, strict=True):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def test_normalize_from_sample_moments_runs_statistics_once_and_handles_partial_grads():
    x = rand((4, 3, 5), seed=13)
    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    calls = []

    def statistics(instance: Moments):
        calls.append(1)
        merged = merge_moments(instance)
        return merged.mean.expand(4, 3), merged.var.expand(4, 3), weight, None

    y = normalize_from_sample_moments(x, statistics, 1e-5, (weight, None))  # x without grad
    assert len(calls) == 1
    (grad_w,) = torch.autograd.grad(y.sum(), weight, retain_graph=True)
    torch.testing.assert_close(grad_w, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    (again,) = torch.autograd.grad((y * y).sum(), weight)  # a second backward of one graph
    torch.testing.assert_close(again, 2 * (y.detach() ** 2).sum((0, 2)) / weight.detach())
    with torch.no_grad():  # no gradients: the plain path, same numbers
        torch.testing.assert_close(
            normalize_from_sample_moments(x, statistics, 1e-5, (weight, None)), y.detach()
        )


def test_normalize_from_sample_moments_refuses_a_second_derivative():
    x = rand((4, 3, 5), seed=15).requires_grad_(True)

    def statistics(instance: Moments):
        merged = merge_moments(instance)
        return merged.mean.expand(4, 3), merged.var.expand(4, 3), None, None

    y = normalize_from_sample_moments(x, statistics, 1e-5)
    # create_graph with a constant incoming gradient: once_differentiable would return a
    # gradient without graph here, and a penalty on it would silently add nothing.
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad((y * rand((4, 3, 5), seed=16)).sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad((y * rand((4, 3, 5), seed=16)).sum(), x)  # first order: fine
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_normalize_from_sample_moments_half_inputs_use_float32_statistics(dtype):
    x64 = rand((4, 3, 6, 6), seed=14)
    x = x64.to(dtype).requires_grad_(True)

    def statistics(instance: Moments):
        assert instance.mean.dtype == torch.float32
        merged = merge_moments(instance, torch.tensor([0, 0, 1, 1]), 2)
        index = torch.tensor([0, 0, 1, 1])
        return merged.mean[index], merged.var[index], None, None

    y = normalize_from_sample_moments(x, statistics, 1e-5)
    assert y.dtype == dtype
    mean, var, _, _ = statistics(sample_moments(x.float()))
    reference = normalize(x.float(), mean, var, 1e-5)
    torch.testing.assert_close(y.float(), reference, rtol=1e-2, atol=1e-2)
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


# -- normalize and running statistics ---------------------------------------------------------


def test_normalize_matches_the_formula_for_shared_and_per_sample_stats():
    x = rand((4, 3, 5), seed=8)
    mean, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 4.0, 0.25])
    w, b = torch.tensor([2.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, 3.0])
    eps = 1e-3
    mean, var = mean.double(), var.double()
    expected = (x - mean[:, None]) / torch.sqrt(var[:, None] + eps) * w[:, None] + b[:, None]
    torch.testing.assert_close(normalize(x, mean, var, eps, w, b), expected)
    per_sample_mean = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
    per_sample_var = torch.linspace(0.5, 3, 12, dtype=torch.float64).reshape(4, 3)
    expected = (x - per_sample_mean[..., None]) / torch.sqrt(per_sample_var[..., None] + eps)
    torch.testing.assert_close(normalize(x, per_sample_mean, per_sample_var, eps), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_normalize_with_population_matches_the_formula(dtype, affine):
    """The fused path (matching dtypes) and the fallback (bf16 input, float32 stats) both
    compute BN's inference map, with gradients for the input and the affine parameters."""
    x = rand((4, 3, 5, 2), seed=9).to(dtype).requires_grad_(True)
    stats_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=stats_dtype)
    var = torch.tensor([1.0, 4.0, 0.25], dtype=stats_dtype)
    w = torch.tensor([2.0, 1.0, -1.0], dtype=stats_dtype, requires_grad=True) if affine else None
    b = torch.tensor([0.0, 1.0, 3.0], dtype=stats_dtype, requires_grad=True) if affine else None
    eps = 1e-3
    view = (1, 3, 1, 1)
    reference = (x.double() - mean.double().view(view)) / torch.sqrt(var.double().view(view) + eps)
    if affine:
        reference = reference * w.double().view(view) + b.double().view(view)
    with torch.no_grad():  # inference: torch's fused kernel where the dtypes match
        inferred = normalize_with_population(x, mean, var, eps, w, b)
    y = normalize_with_population(x, mean, var, eps, w, b)
    assert y.dtype == inferred.dtype == dtype
    tolerance = {
        torch.float64: {},
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.bfloat16: {"atol": 3e-2, "rtol": 1e-2},
    }[dtype]
    torch.testing.assert_close(y.double(), reference, **tolerance)
    torch.testing.assert_close(inferred.double(), reference.detach(), **tolerance)
    grad = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad.to(dtype))
    scale = torch.rsqrt(var.double() + eps) * (w.double() if affine else 1.0)
    torch.testing.assert_close(x.grad.double(), grad * scale.view(view), **tolerance)
    if affine:
        normalized = (x.double() - mean.double().view(view)) * torch.rsqrt(var.double() + eps).view(
            view
        )
        torch.testing.assert_close(w.grad.double(), (grad * normalized).sum((0, 2, 3)), **tolerance)
        torch.testing.assert_close(b.grad.double(), grad.sum((0, 2, 3)), **tolerance)


@given(group_size=st.integers(1, 9), ranks=st.lists(st.integers(0, 12), min_size=1, max_size=4))
def test_sample_groups_are_consecutive_groups_of_the_global_batch(group_size, ranks):
    """Each process's view of the groups of the concatenated batch equals a naive loop over
    the whole batch: sample n (global) is in group n // b, sizes count the members."""
    total = sum(ranks)  # the global batch: the concatenation of the ranks' batches
    naive_group = [n // group_size for n in range(total)]
    naive_sizes = [naive_group.count(g) for g in range(max(naive_group, default=0) + 1)]
    offset = 0
    for local in ranks:
        groups = sample_groups(local, group_size, torch.device("cpu"), offset, total)
        assert groups.index.tolist() == naive_group[offset : offset + local]
        assert list(groups.sizes) == naive_sizes and groups.count == len(naive_sizes)
        assert groups.equal == (local == total and total % group_size == 0 and total > 0)
        offset += local
    assert group_sizes(total, group_size) == tuple(naive_sizes)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        sample_groups(3, 0, torch.device("cpu"))


@given(
    groups=st.integers(1, 7),
    step=st.integers(0, 5),
    momentum=st.sampled_from([None, 0.0, 0.1, 0.5, 1.0]),
    on_device=st.booleans(),
)
def test_ema_sequence_equals_one_update_per_group(groups, step, momentum, on_device):
    """The closed forms (``ema_sequence``, and ``ema_after`` for the last average alone)
    equal G updates in a loop (float64 numpy): BN's EMA with the momentum, or the cumulative
    average 1/(t + 1) counting ``step`` earlier updates."""
    rng = np.random.default_rng(groups * 31 + step)
    start, values = rng.normal(size=3), rng.normal(size=(groups, 3))
    running, before = start.copy(), []
    for k in range(groups):
        before.append(running.copy())
        factor = momentum if momentum is not None else 1.0 / (step + k + 1)
        running = (1 - factor) * running + factor * values[k]
    given_step = torch.tensor(step) if on_device else step
    got_before, got_after = ema_sequence(
        torch.from_numpy(start), torch.from_numpy(values), given_step, momentum
    )
    np.testing.assert_allclose(got_after.numpy(), running, rtol=1e-12, atol=1e-12)
    only_after = ema_after(torch.from_numpy(start), torch.from_numpy(values), given_step, momentum)
    np.testing.assert_allclose(only_after.numpy(), running, rtol=1e-12, atol=1e-12)
    if groups == 1:
        np.testing.assert_allclose(got_before.numpy(), start)
    else:
        np.testing.assert_allclose(got_before.numpy(), np.stack(before), rtol=1e-12, atol=1e-12)


def test_update_running_stats_is_bn_ema():
    rm, rv = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    update_running_stats(rm, rv, torch.tensor([5.0, 6.0]), torch.tensor([7.0, 8.0]), 0.25)
    torch.testing.assert_close(rm, torch.tensor([0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * 6]))
    torch.testing.assert_close(rv, torch.tensor([0.75 * 3 + 0.25 * 7, 0.75 * 4 + 0.25 * 8]))


# -- the autograd all-gather on a one-process gloo group ---------------------------------------


@pytest.fixture
def gloo_group(tmp_path) -> Iterator[object]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_all_gather_with_grad_gradcheck(gloo_group):
    t = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = _distributed._AllGatherWithGrad.apply(t, gloo_group)
    assert out.shape == (1, 2, 3)
    torch.testing.assert_close(out[0], t, rtol=0, atol=0)
    gather = _distributed._AllGatherWithGrad.apply
    assert torch.autograd.gradcheck(lambda u: gather(u, gloo_group), (t,))
    # a one-member group needs no collective: layers skip it
    assert _distributed.active_group(True, None) is None


def test_all_gather_moments_then_merge_gradcheck(gloo_group):
    x = rand((4, 2, 3), seed=9).requires_grad_(True)

    def f(x):
        m = merge_moments(all_gather_moments(channel_moments(x), gloo_group))
        return normalize(x, m.mean, m.var, 1e-3)

    m = all_gather_moments(channel_moments(x), gloo_group)
    assert m.count.shape == (1,) and float(m.count[0].detach()) == 12
    assert torch.autograd.gradcheck(f, (x,))
    count, mean, var = np_channel(x)
    merged = merge_moments(m)
    assert_np(merged.mean, mean)
    assert_np(merged.var, var)
