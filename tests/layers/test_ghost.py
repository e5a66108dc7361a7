"""Ghost BN: BN when one group holds the batch, the float64 reference (uneven last group,
group size 1, cumulative average) otherwise, instance norm at group size 1, BN state and
error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from _layer_checks import (
    BN_STATE_KEYS,
    SHAPES,
    cases,
    check_step,
    close,
    lockstep_vs_torch_bn,
    make_input,
    randomize_affine,
    run_case,
    shape_id,
    upstream,
)
from reference import RefGhostBatchNorm
from smallbn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

GHOST = {2: GhostBatchNorm1d, 3: GhostBatchNorm1d, 4: GhostBatchNorm2d, 5: GhostBatchNorm3d}


@pytest.mark.parametrize("extra", [0, 3], ids=lambda e: f"group_size=batch+{e}")
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_one_group_is_batchnorm(shape, momentum, extra):
    layer = GHOST[len(shape)](
        shape[1], momentum=momentum, group_size=shape[0] + extra, dtype=torch.float64
    )
    lockstep_vs_torch_bn(layer, shape, steps=3, momentum=momentum)


@pytest.mark.parametrize(
    "shape, group_size",
    [
        ((7, 3, 5), 3),  # groups 3, 3, 1: the last group is one sample (with a length)
        ((8, 3), 3),  # groups 3, 3, 2 without spatial dims
        ((5, 2, 3, 4), 2),  # groups 2, 2, 1
        ((3, 2, 2, 2, 3), 2),  # groups 2, 1 in 3d
        ((4, 3, 5), 1),  # group size 1: per-sample statistics
        ((3, 2, 4, 4), 1),
    ],
    ids=str,
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
def test_matches_reference(shape, group_size, momentum):
    layer = GHOST[len(shape)](
        shape[1], momentum=momentum, group_size=group_size, dtype=torch.float64
    )
    weight, bias = randomize_affine(layer, 4)
    ref = RefGhostBatchNorm(shape[1], group_size, momentum=momentum, weight=weight, bias=bias)
    gen = torch.Generator().manual_seed(5)
    params = [("weight", layer.weight, ref.weight), ("bias", layer.bias, ref.bias)]
    for step in range(3):
        # shift each sample differently, so the group means differ from the batch mean
        x = make_input(shape, step, scale=1 + step)
        x = x + torch.arange(shape[0], dtype=x.dtype).reshape(-1, *[1] * (len(shape) - 1))
        g = upstream(shape, gen)
        check_step(layer, ref.train_step, x, g, 1e-6, params)
        close(layer.running_mean, ref.running_mean, 1e-6, f"running_mean after step {step}")
        close(layer.running_var, ref.running_var, 1e-6, f"running_var after step {step}")
    layer.eval()
    x = make_input(shape, 9, loc=2.0)
    check_step(layer, ref.eval, x, upstream(shape, gen), 1e-6, params)


def test_running_var_averages_group_variances_not_the_batch_variance():
    # two groups with means -10 and +10 and unit spread: the batch variance is ~100, but the
    # groups were normalized with ~1, and that is what inference must use
    x = torch.cat([torch.randn(4, 2, 8) - 10, torch.randn(4, 2, 8) + 10]).double()
    layer = GhostBatchNorm1d(2, momentum=1.0, group_size=4, dtype=torch.float64)
    layer(x)
    assert (layer.running_var < 2).all() and (layer.running_var > 0.5).all()
    torch.testing.assert_close(layer.running_mean, x.mean(dim=(0, 2)))


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 2, 4, 4), (2, 2, 2, 3, 3)], ids=shape_id)
def test_group_size_one_is_instance_norm(shape):
    layer = GHOST[len(shape)](shape[1], group_size=1, dtype=torch.float64)
    weight, bias = randomize_affine(layer, 6)
    x = make_input(shape, 7).requires_grad_(True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.instance_norm(x2, weight=weight, bias=bias, use_input_stats=True, eps=layer.eps)
    torch.testing.assert_close(y, y2)
    g = torch.randn(shape, dtype=torch.float64)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@given(cases(), st.integers(1, 4))
def test_matches_reference_over_shapes_and_dtypes(case, group_size):
    n = case.shape[0]
    last = n - (-(-n // group_size) - 1) * group_size
    assume(last * case.values_per_sample >= 2)
    layer = GhostBatchNorm(
        case.shape[1], momentum=0.3, group_size=group_size, dtype=case.param_dtype
    )
    weight, bias = randomize_affine(layer, case.seed)
    ref = RefGhostBatchNorm(case.shape[1], group_size, momentum=0.3, weight=weight, bias=bias)
    run_case(layer, ref, case, steps=2)


def test_state_dict_is_batchnorms():
    layer = GhostBatchNorm2d(4, group_size=2)
    assert list(layer.state_dict().keys()) == BN_STATE_KEYS
    layer.load_state_dict(nn.BatchNorm2d(4).state_dict())
    nn.BatchNorm2d(4).load_state_dict(layer.state_dict())


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, group_size, hint",
    [
        ((5, 4), 2, ": a batch that is a multiple of 2 has no short last group"),
        ((4, 4), 1, ""),
        ((1, 4), 8, ": a batch that is a multiple of 8 has no short last group"),
    ],
    ids=str,
)
def test_rejects_a_group_with_one_value(shape, group_size, hint):
    layer = GhostBatchNorm1d(4, group_size=group_size)
    with pytest.raises(
        ValueError,
        match=rf"GhostBatchNorm1d\(4\): training needs more than one value per channel.*smallest "
        rf"group of samples \(groups of {group_size}, batch {shape[0]}{hint}\) has 1.*larger batch",
    ):
        layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 0
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape


def test_rejects_wrong_rank_and_channels():
    with pytest.raises(
        ValueError,
        match=r"GhostBatchNorm2d\(4\): expected a \(N, C, H, W\) input, got a 3D "
        r"tensor.*GhostBatchNorm1d for \(N, C\) or \(N, C, L\)",
    ):
        GhostBatchNorm2d(4)(torch.randn(8, 4, 5))
    with pytest.raises(
        ValueError,
        match=r"GhostBatchNorm3d\(4\): expected 4 channels in dim 1, got 2.*num_features=2",
    ):
        GhostBatchNorm3d(4)(torch.randn(8, 2, 2, 2, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
def test_rejects_non_finite_input_in_training(bad):
    x = torch.randn(8, 3, 4)
    x[5, 1, 0] = bad  # in the second group only
    layer = GhostBatchNorm1d(3, group_size=4)
    with pytest.raises(
        FloatingPointError,
        match=r"GhostBatchNorm1d\(3\): batch statistics are NaN or Inf in channel\(s\) \[1\]",
    ):
        layer(x)
    assert int(layer.num_batches_tracked) == 0


def test_rejects_incompatible_checkpoint():
    with pytest.raises(RuntimeError, match=r"GhostBatchNorm2d\(8\): incompatible checkpoint"):
        GhostBatchNorm2d(8).load_state_dict(nn.BatchNorm2d(16).state_dict())


def test_rejects_bad_constructor_args():
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d: group_size must be >= 1, got 0"):
        GhostBatchNorm2d(4, group_size=0)
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d: momentum .* must lie in \[0, 1\]"):
        GhostBatchNorm2d(4, momentum=-0.5)
