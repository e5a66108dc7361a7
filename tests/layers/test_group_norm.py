"""GroupNorm / LayerNorm / InstanceNorm against torch.nn.GroupNorm(G, C) with G = fitted
groups / 1 / C, fit_num_groups, BN state kept untouched, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import smallbn
from _layer_checks import (
    check_step,
    make_input,
    randomize_affine,
    shape_id,
    upstream,
)
from smallbn import GroupNorm, InstanceNorm, LayerNorm
from smallbn.layers.group_norm import fit_num_groups

GN_SHAPES = [(1, 12), (3, 12, 5), (1, 12, 4, 3), (2, 12, 2, 3, 2)]


def compare_with_torch(layer: nn.Module, groups: int, shape: tuple[int, ...]) -> None:
    gn = nn.GroupNorm(groups, shape[1], eps=layer.eps, dtype=torch.float64)
    randomize_affine(layer, 3)
    with torch.no_grad():
        gn.weight.copy_(layer.weight)
        gn.bias.copy_(layer.bias)
    params = [("weight", layer.weight, gn.weight), ("bias", layer.bias, gn.bias)]
    gen = torch.Generator().manual_seed(4)
    for mode in (True, False):  # batch-independent: same in training and evaluation
        layer.train(mode)
        x = make_input(shape, 5, loc=2.0)
        check_step(layer, gn, x, upstream(shape, gen), 1e-6, params)


GROUPINGS = [(32, 12), (4, 4), (5, 4), (1, 1), (12, 12), (7, 6)]  # (requested, fitted) for C=12


@pytest.mark.parametrize(
    "shape, requested, fitted",
    # 12 groups of an (N, 12) input hold one value each: rejected (test_rejects_groups_of_one_value)
    [(s, r, f) for s in GN_SHAPES for r, f in GROUPINGS if not (f == 12 and len(s) == 2)],
    ids=str,
)
def test_group_norm_equals_torch(shape, requested, fitted):
    layer = GroupNorm(12, num_groups=requested, dtype=torch.float64)
    assert layer.num_groups == fitted
    compare_with_torch(layer, fitted, shape)


@pytest.mark.parametrize("shape", GN_SHAPES, ids=shape_id)
def test_layer_norm_and_instance_norm_equal_torch(shape):
    compare_with_torch(LayerNorm(12, dtype=torch.float64), 1, shape)
    if len(shape) > 2:
        compare_with_torch(InstanceNorm(12, dtype=torch.float64), 12, shape)


def test_layer_norm_is_over_channels_and_space():
    x = make_input((2, 6, 4, 5), 6)
    layer = LayerNorm(6, affine=False, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.layer_norm(x, x.shape[1:], eps=layer.eps))
    inorm = InstanceNorm(6, affine=False, dtype=torch.float64)
    torch.testing.assert_close(inorm(x), F.instance_norm(x, eps=inorm.eps))


def test_default_groups():
    assert GroupNorm(64).num_groups == 32
    assert GroupNorm(48).num_groups == 24
    assert GroupNorm(7).num_groups == 7
    assert GroupNorm(100).num_groups == 25
    assert LayerNorm(64).num_groups == 1
    assert InstanceNorm(64).num_groups == 64


@given(st.integers(1, 300), st.integers(1, 64))
def test_fit_num_groups_is_the_largest_divisor_not_above_the_request(channels, requested):
    groups = fit_num_groups(channels, requested)
    assert channels % groups == 0 and 1 <= groups <= requested
    assert all(channels % g for g in range(groups + 1, min(requested, channels) + 1))


def test_keeps_batchnorm_statistics_in_memory_but_not_in_its_checkpoints():
    # A BN checkpoint loads (strict) and converting back to BN restores its statistics; the
    # layer's own checkpoint is nn.GroupNorm's, so loading it into a BN fails on the missing
    # statistics instead of evaluating with placeholders (it used to load, 0/1 statistics).
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.num_batches_tracked.fill_(5)
    for cls in (GroupNorm, LayerNorm, InstanceNorm):
        layer = cls(8)
        assert list(layer.state_dict().keys()) == ["weight", "bias"]
        layer.load_state_dict(bn.state_dict(), strict=True)
        layer.train()
        layer(torch.randn(1, 8, 3, 3))  # a batch of one trains
        with pytest.raises(RuntimeError, match="Missing key.*running_mean"):
            nn.BatchNorm2d(8).load_state_dict(layer.state_dict(), strict=True)
        nn.GroupNorm(layer.num_groups, 8).load_state_dict(layer.state_dict(), strict=True)
        with pytest.warns(smallbn.ConversionWarning, match="keeps no population statistics"):
            back = smallbn.convert(nn.Sequential(layer), "bn", dim=2)[0]
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_a_bn_checkpoint_with_other_or_invalid_statistics_is_refused_not_dropped():
    """The statistics a batch-independent norm keeps in memory for a round trip to BN go
    through the checkpoint checks: another shape is an error naming the layer (it was
    dropped in silence), a NaN is refused before anything is copied."""
    layer = GroupNorm(8, affine=False)
    before = {k: v.clone() for k, v in layer._buffers.items() if v is not None}
    other = nn.BatchNorm2d(4, affine=False).state_dict()
    with pytest.raises(
        RuntimeError, match=r"GroupNorm\(8\): incompatible checkpoint.*running_mean"
    ):
        layer.load_state_dict(other)
    damaged = nn.BatchNorm2d(8, affine=False).state_dict()
    damaged["running_var"][0] = float("nan")
    with pytest.raises(RuntimeError, match="running_var' holds NaN"):
        layer.load_state_dict(damaged)
    for key, value in before.items():
        torch.testing.assert_close(layer._buffers[key], value, rtol=0, atol=0, equal_nan=True)


# -- bad input ----------------------------------------------------------------------------------


def test_rejects_bad_input():
    with pytest.raises(
        ValueError,
        match=r"GroupNorm\(8\): expected 8 channels in dim 1, got 4.*num_features=4",
    ):
        GroupNorm(8)(torch.randn(2, 4, 3))
    with pytest.raises(
        ValueError,
        match=r"LayerNorm\(8\): expected a \(N, C, \*spatial\) input, got a 1D tensor of shape "
        r"\(8,\).*unsqueeze",
    ):
        LayerNorm(8)(torch.randn(8))
    with pytest.raises(RuntimeError, match=r"InstanceNorm\(8\): incompatible checkpoint"):
        InstanceNorm(8).load_state_dict(nn.BatchNorm2d(16).state_dict())
    with pytest.raises(
        ValueError,
        match=r"GroupNorm: num_features must be a positive channel count",
    ):
        GroupNorm(0)


@pytest.mark.parametrize("batch", [1, 4])
def test_rejects_groups_of_one_value(batch):
    # torch raises for a batch of one only, and otherwise returns the bias alone
    for layer in (InstanceNorm(6), GroupNorm(6, num_groups=6)):
        for mode in (True, False):
            layer.train(mode)
            with pytest.raises(
                ValueError,
                match=rf"{type(layer).__name__}\(6\): each of its 6 groups holds a single value "
                rf"per sample \(input shape \({batch}, 6\)\).*Use fewer groups",
            ):
                layer(torch.randn(batch, 6))
    assert InstanceNorm(6)(torch.randn(1, 6, 2)).shape == (1, 6, 2)
    assert LayerNorm(6)(torch.randn(1, 6)).shape == (1, 6)


@pytest.mark.parametrize("layer", [GroupNorm(8, num_groups=2), LayerNorm(8), InstanceNorm(8)])
def test_channels_last_is_as_exact_as_contiguous_at_a_large_mean(layer):
    """Feature maps with |μ|/σ = 200: torch's channels-last CPU kernel alone lost ~10% of
    the output here; the layer keeps the input's layout and float32's accuracy."""
    gen = torch.Generator().manual_seed(0)
    x64 = 100 + 0.5 * torch.randn(3, 8, 6, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 8, 6, 6, generator=gen, dtype=torch.float64)
    x64.requires_grad_()
    reference = F.group_norm(x64, layer.num_groups, None, None, layer.eps)
    (reference * g).sum().backward()
    x = x64.detach().float().to(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    (y * g.float()).sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=2e-3)
    torch.testing.assert_close(
        x.grad.double(), x64.grad, rtol=0, atol=2e-3 * x64.grad.abs().max().item()
    )


@pytest.mark.parametrize(
    "option", [{"num_groups": 0}, {"num_groups": -3}, {"channels_per_group": 0}]
)
def test_rejects_group_counts_below_one(option):
    with pytest.raises(
        ValueError, match=r"GroupNorm: (num_groups|channels_per_group) must be >= 1"
    ):
        GroupNorm(8, **option)
