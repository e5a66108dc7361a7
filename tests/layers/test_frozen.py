"""FrozenBN: torch BN in eval mode, frozen in train mode, BN's state_dict both ways, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _layer_checks import BN_STATE_KEYS, SHAPES, TORCH_BN, check_step, make_input, shape_id
from smallbn import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

FROZEN = {2: FrozenBatchNorm1d, 3: FrozenBatchNorm1d, 4: FrozenBatchNorm2d, 5: FrozenBatchNorm3d}


def trained_bn(shape: tuple[int, ...], affine: bool = True) -> nn.Module:
    """A float64 torch BN with non-trivial statistics and affine."""
    bn = TORCH_BN[len(shape)](shape[1], affine=affine, dtype=torch.float64)
    bn.train()
    with torch.no_grad():
        for step in range(3):
            bn(make_input(shape, 40 + step, loc=2.0, scale=3.0))
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize("affine", [True, False], ids=lambda a: f"affine={a}")
@pytest.mark.parametrize("cls", ["exact", "any-rank"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_equals_torch_batchnorm_in_eval_mode_and_in_train_mode(shape, cls, affine):
    bn = trained_bn(shape, affine)
    layer_cls = FROZEN[len(shape)] if cls == "exact" else FrozenBatchNorm
    layer = layer_cls(shape[1], affine=affine, dtype=torch.float64)
    layer.load_state_dict(bn.state_dict())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for mode in (False, True):
        layer.train(mode)
        x = make_input(shape, 3, loc=1.0)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        check_step(layer, bn, x, g, 1e-6)  # the input gradient is BN-eval's
    # nothing moved, nothing learns
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert list(layer.parameters()) == []
    if affine:
        assert layer.weight.grad is None and not layer.weight.requires_grad
        assert layer.bias.grad is None and not layer.bias.requires_grad


def test_batch_of_one_works_in_train_mode():
    bn = trained_bn((4, 3))
    layer = FrozenBatchNorm1d(3, dtype=torch.float64).train()
    layer.load_state_dict(bn.state_dict())
    x = make_input((1, 3), 5)
    torch.testing.assert_close(layer(x), bn(x))


def test_state_dict_round_trips_with_batchnorm2d_strictly():
    bn = trained_bn((3, 4, 5, 5))
    bn.num_batches_tracked.fill_(123)
    layer = FrozenBatchNorm2d(4, dtype=torch.float64)
    layer.load_state_dict(bn.state_dict(), strict=True)
    state = layer.state_dict()
    assert list(state.keys()) == BN_STATE_KEYS
    for key, value in bn.state_dict().items():
        assert state[key].shape == value.shape and state[key].dtype == value.dtype
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    back = nn.BatchNorm2d(4, dtype=torch.float64)
    back.load_state_dict(state, strict=True)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_channels_last_input():
    bn = trained_bn((2, 4, 3, 3))
    layer = FrozenBatchNorm2d(4, dtype=torch.float64)
    layer.load_state_dict(bn.state_dict())
    x = make_input((2, 4, 3, 3), 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), bn(x.contiguous()))


# -- bad input ----------------------------------------------------------------------------------


def test_rejects_wrong_rank_and_channels():
    with pytest.raises(
        ValueError,
        match=r"FrozenBatchNorm2d\(4\): expected a \(N, C, H, W\) input, got a 3D tensor.*Use "
        r"FrozenBatchNorm1d for \(N, C\) or \(N, C, L\)",
    ):
        FrozenBatchNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(
        ValueError,
        match=r"FrozenBatchNorm1d\(4\): expected 4 channels in dim 1, got 5.*num_features=5",
    ):
        FrozenBatchNorm1d(4)(torch.randn(2, 5))
    with pytest.raises(
        ValueError,
        match=r"FrozenBatchNorm\(4\): expected a \(N, C, \*spatial\) input, got a 1D tensor",
    ):
        FrozenBatchNorm(4)(torch.randn(4))


def test_rejects_incompatible_checkpoint():
    with pytest.raises(
        RuntimeError,
        match=r"FrozenBatchNorm2d\(8\): incompatible checkpoint.*weight.*num_features",
    ):
        FrozenBatchNorm2d(8).load_state_dict(nn.BatchNorm2d(16).state_dict())


def test_rejects_bad_constructor_args():
    with pytest.raises(
        ValueError,
        match=r"FrozenBatchNorm2d: a frozen BN .* needs track_running_stats=True",
    ):
        FrozenBatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: momentum .* must lie in \[0, 1\]"):
        FrozenBatchNorm2d(4, momentum=2.0)
