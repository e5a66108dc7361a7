"""SyncBatchNorm without a process group is BN: torch.nn.BatchNorm{1,2,3}d in float64 and the
float64 reference; plus BN state, memory formats and error messages.  (Synchronization
across processes is tested in tests/test_distributed.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from torch import nn

import smallbn
from _layer_checks import (
    BN_STATE_KEYS,
    SHAPES,
    cases,
    lockstep_vs_torch_bn,
    make_input,
    randomize_affine,
    run_case,
    shape_id,
)
from reference import RefBatchNorm
from smallbn import SyncBatchNorm


@pytest.mark.parametrize("momentum", [0.1, None, 0.7], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_equals_torch_batchnorm(shape, momentum):
    layer = SyncBatchNorm(shape[1], momentum=momentum, dtype=torch.float64)
    lockstep_vs_torch_bn(layer, shape, steps=3, momentum=momentum)


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 4, 5)], ids=shape_id)
def test_equals_torch_batchnorm_without_affine_or_running_stats(shape):
    layer = SyncBatchNorm(shape[1], affine=False, dtype=torch.float64)
    lockstep_vs_torch_bn(layer, shape, affine=False)
    layer = SyncBatchNorm(shape[1], track_running_stats=False, dtype=torch.float64)
    lockstep_vs_torch_bn(layer, shape, track_running_stats=False)


def test_sync_off_is_plain_bn_too():
    layer = SyncBatchNorm(3, sync=False, dtype=torch.float64)
    lockstep_vs_torch_bn(layer, (4, 3, 5))


@given(cases())
def test_matches_reference_over_shapes_and_dtypes(case):
    layer = SyncBatchNorm(case.shape[1], momentum=0.3, dtype=case.param_dtype)
    weight, bias = randomize_affine(layer, case.seed)
    ref = RefBatchNorm(case.shape[1], momentum=0.3, weight=weight, bias=bias)
    run_case(layer, ref, case, steps=2)


def test_batch_of_one_with_spatial_dims_trains():
    x = make_input((1, 3, 4, 4), seed=1)
    layer, bn = SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.running_var, bn.running_var)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 4, 3, 4, 5)], ids=shape_id)
def test_channels_last_input(shape):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = make_input(shape, seed=2)
    a, b = SyncBatchNorm(4, dtype=torch.float64), SyncBatchNorm(4, dtype=torch.float64)
    ya, yb = a(x), b(x.to(memory_format=fmt))
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)


def test_state_dict_is_batchnorms():
    layer = SyncBatchNorm(4)
    assert list(layer.state_dict().keys()) == BN_STATE_KEYS
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_()
        bn.running_var.uniform_(1, 2)
        bn.num_batches_tracked.fill_(17)
        bn.weight.uniform_()
    layer.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(layer.state_dict())
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


# -- bad input ----------------------------------------------------------------------------------


def test_rejects_a_tensor_without_channel_dim():
    with pytest.raises(
        ValueError,
        match=r"SyncBatchNorm\(4\): expected a \(N, C, \*spatial\) input, got a 1D "
        r"tensor.*unsqueeze",
    ):
        SyncBatchNorm(4)(torch.randn(4))


def test_rejects_wrong_channel_count():
    with pytest.raises(
        ValueError,
        match=r"SyncBatchNorm\(4\): expected 4 channels in dim 1, got 3.*num_features=3",
    ):
        SyncBatchNorm(4)(torch.randn(2, 3, 5))


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1)], ids=shape_id)
def test_rejects_a_single_value_per_channel_in_training(shape):
    layer = SyncBatchNorm(4)
    with pytest.raises(
        ValueError,
        match=r"SyncBatchNorm\(4\): training needs more than one value per channel.*has 1.*larger "
        r"batch",
    ):
        layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 0 and (layer.running_var == 1).all()
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # evaluation uses running statistics


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_rejects_non_finite_input_in_training(bad):
    layer = SyncBatchNorm(4)
    x = torch.randn(3, 4, 5)
    x[1, 2, 3] = bad
    with pytest.raises(
        FloatingPointError,
        match=r"SyncBatchNorm\(4\): batch statistics are NaN or Inf in channel\(s\) "
        r"\[2\].*set_detect_anomaly",
    ):
        layer(x)
    # a rejected batch leaves the layer as it was (a caller may skip the batch and go on)
    assert int(layer.num_batches_tracked) == 0
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()
    old = smallbn.set_finite_check(False)
    try:
        assert torch.isnan(layer(x)[:, 2]).all()
    finally:
        smallbn.set_finite_check(old)


def test_rejects_incompatible_checkpoint():
    model = nn.Sequential(SyncBatchNorm(8))
    with pytest.raises(
        RuntimeError,
        match=r"SyncBatchNorm\(8\): incompatible checkpoint .*running_mean.*num_features",
    ):
        model.load_state_dict(nn.Sequential(nn.BatchNorm2d(16)).state_dict())


@pytest.mark.parametrize("momentum", [-0.1, 1.5], ids=str)
def test_rejects_bad_constructor_args(momentum):
    with pytest.raises(ValueError, match=r"SyncBatchNorm: momentum .* must lie in \[0, 1\] .*None"):
        SyncBatchNorm(4, momentum=momentum)
    with pytest.raises(
        ValueError,
        match=r"SyncBatchNorm: num_features must be a positive channel count, got 0",
    ):
        SyncBatchNorm(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_statistics_are_float32_without_affine(dtype):
    """methods.md: statistics in float32 at least, also when there is no γ/β to carry the dtype."""
    x = (torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 + 7).to(dtype)
    layer = smallbn.SyncBatchNorm(3, affine=False, momentum=1.0)
    layer(x)
    values = x.double().numpy()
    mean = values.mean(axis=(0, 2, 3))
    var = values.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(layer.running_mean.double().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var.double().numpy(), var, rtol=1e-4)
