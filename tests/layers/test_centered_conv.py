"""Weight-centred convolutions (MABN's weight centralization) and their installation by
``convert``: outputs against ``F.conv`` with the centred kernel, gradients, Parameter
identity, and the path to folding."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import smallbn
from smallbn.layers.centered_conv import (
    CenteredConv1d,
    CenteredConv2d,
    CenteredConv3d,
    centered_conv_from,
    centered_weight,
    centering_obstacle,
)
from smallbn.layers.moving_average import (
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)

DIMS = {
    1: (nn.Conv1d, CenteredConv1d, F.conv1d, MovingAverageBatchNorm1d, nn.BatchNorm1d),
    2: (nn.Conv2d, CenteredConv2d, F.conv2d, MovingAverageBatchNorm2d, nn.BatchNorm2d),
    3: (nn.Conv3d, CenteredConv3d, F.conv3d, MovingAverageBatchNorm3d, nn.BatchNorm3d),
}
CONFIGS = [
    dict(),
    dict(groups=2, bias=True),
    dict(stride=2, padding=1, dilation=1, bias=True),
    dict(groups=4, padding="same", dilation=2),
    dict(padding=1, padding_mode="reflect", groups=2),
]


def _centred(weight: torch.Tensor) -> torch.Tensor:
    """Straight from methods.md: W_j − mean(W_j) over (C_in/groups, *kernel), one j at a time."""
    rows = [w - w.mean() for w in weight]
    return torch.stack(rows)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_output_is_the_conv_with_the_centred_kernel(dim, config):
    _, centred_cls, conv_fn, _, _ = DIMS[dim]
    config = dict(config)
    padding_mode = config.pop("padding_mode", "zeros")
    conv = centred_cls(4, 8, 3, padding_mode=padding_mode, dtype=torch.float64, **config)
    x = torch.randn(2, 4, *[7] * dim, dtype=torch.float64)
    weight = _centred(conv.weight.detach())
    expected_input = x
    padding = config.get("padding", 0)
    if padding_mode != "zeros":
        expected_input = F.pad(x, [padding] * (2 * dim), mode=padding_mode)
        padding = 0
    expected = conv_fn(
        expected_input,
        weight,
        conv.bias,
        stride=config.get("stride", 1),
        padding=padding,
        dilation=config.get("dilation", 1),
        groups=config.get("groups", 1),
    )
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)
    # the stored weight is the raw one; the centred one has zero mean per output channel
    kernel_means = conv.centered_weight().mean(dim=tuple(range(1, dim + 2)))
    torch.testing.assert_close(kernel_means, torch.zeros(8, dtype=torch.float64))
    assert conv.weight.mean().abs() > 1e-6  # (so the test is not vacuous)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_gradcheck_and_weight_gradient_is_the_centred_plain_gradient(dim):
    _, centred_cls, conv_fn, _, _ = DIMS[dim]
    conv = centred_cls(4, 6, 2, groups=2, bias=True, dtype=torch.float64)
    x = torch.randn(2, 4, *[3] * dim, dtype=torch.float64, requires_grad=True)

    def run(inp, weight, bias):  # the module's own path: its centring Function, then conv
        return conv_fn(inp, centered_weight(weight), bias, groups=2)

    assert torch.autograd.gradcheck(run, (x, conv.weight, conv.bias))
    upstream = torch.randn_like(conv(x))
    (conv(x) * upstream).sum().backward()
    plain_weight = conv.centered_weight().detach().requires_grad_(True)
    (conv_fn(x.detach(), plain_weight, conv.bias.detach(), groups=2) * upstream).sum().backward()
    # ∂L/∂W = g − mean(g) per output channel: the plain gradient projected onto zero mean
    torch.testing.assert_close(conv.weight.grad, _centred(plain_weight.grad))


def test_adding_a_constant_per_output_channel_changes_nothing():
    conv = CenteredConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    before = conv(x)
    with torch.no_grad():
        conv.weight.add_(torch.randn(5, 1, 1, 1))
    torch.testing.assert_close(conv(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_from_conv_shares_parameters_and_configuration(dim):
    plain_cls, centred_cls, _, _, _ = DIMS[dim]
    conv = plain_cls(4, 6, 3, stride=2, padding=1, groups=2, bias=True).eval()
    centred = centered_conv_from(conv)
    assert type(centred) is centred_cls and not centred.training
    assert centred.weight is conv.weight and centred.bias is conv.bias
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups"):
        assert getattr(centred, name) == getattr(conv, name), name
    assert [p for p in centred.parameters()] == [conv.weight, conv.bias]
    x = torch.randn(2, 4, *[5] * dim)
    torch.testing.assert_close(centred.to_plain()(x), centred(x))


def test_only_plain_convs_are_centred():
    class Custom(nn.Conv2d):
        pass

    assert centered_conv_from(Custom(2, 2, 1)) is None
    assert centered_conv_from(nn.Linear(2, 2)) is None
    assert centered_conv_from(CenteredConv2d(2, 2, 1)) is None
    with pytest.raises(TypeError, match="expected a Conv2d, got Conv1d"):
        CenteredConv2d.from_conv(nn.Conv1d(2, 2, 1))


def test_obstacles_name_the_reason():
    assert centering_obstacle(nn.Conv2d(2, 3, 3)) is None
    assert centering_obstacle(nn.Linear(2, 2)) == "Linear has no weight-centred variant"
    assert "already weight-centred" in centering_obstacle(CenteredConv2d(2, 2, 3))
    parametrized = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3))
    assert "parametrized" in centering_obstacle(parametrized)
    assert centered_conv_from(parametrized) is None


def _hooked(kind: str) -> nn.Conv2d:
    """A conv whose ``weight`` a forward pre-hook recomputes from other Parameters."""
    conv = nn.Conv2d(2, 3, 3, bias=True)
    if kind == "prune":
        prune.l1_unstructured(conv, "weight", amount=0.3)
    elif kind == "weight_norm":
        with warnings.catch_warnings():  # deprecated in favour of parametrizations
            warnings.simplefilter("ignore")
            nn.utils.weight_norm(conv)
    else:
        nn.utils.spectral_norm(conv)
    return conv


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_pruned_and_reparametrized_convs_are_left_alone_with_the_reason(kind):
    """Their ``weight`` is a plain tensor a forward pre-hook computes: a centred wrapper
    sharing "the" weight Parameter cannot exist (and would skip the hook)."""
    conv = _hooked(kind)
    assert centered_conv_from(conv) is None
    assert "weight is not a Parameter" in centering_obstacle(conv)
    with pytest.raises(
        TypeError, match=r"CenteredConv2d.from_conv: cannot centre.*Conv2d's weight is not a Par"
    ):
        CenteredConv2d.from_conv(conv)
    x = torch.randn(2, 2, 5, 5)
    model = nn.Sequential(conv, nn.BatchNorm2d(3))
    with pytest.warns(
        RuntimeWarning, match=r"Conv2d, left uncentred because Conv2d's weight is not a Param"
    ):
        model = smallbn.convert(model, MovingAverageBatchNorm2d)
    assert model[0] is conv and isinstance(model[1], MovingAverageBatchNorm2d)
    assert "not centred" in model[1].producer_note
    y = model[0](x)  # runs the hook (spectral_norm's power iteration updates the weight)
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias))
    model(x).square().sum().backward()  # trains through the hook


def test_a_conv_with_a_forward_pre_hook_is_left_alone():
    conv = nn.Conv2d(2, 3, 3)
    conv.register_forward_pre_hook(lambda module, args: None)
    assert centered_conv_from(conv) is None
    assert "has forward pre-hooks" in centering_obstacle(conv)
    with pytest.raises(TypeError, match="Conv2d has forward pre-hooks"):
        CenteredConv2d.from_conv(conv)


@pytest.mark.parametrize(
    ("plain_cls", "centred_cls", "args"),
    [
        (nn.Conv2d, CenteredConv2d, dict(in_channels=4, out_channels=4, groups=4)),  # depthwise
        (nn.Conv2d, CenteredConv2d, dict(in_channels=2, out_channels=4, groups=2)),
        (nn.Conv1d, CenteredConv1d, dict(in_channels=1, out_channels=3)),
    ],
)
def test_one_entry_kernels_are_not_centred_to_zero(plain_cls, centred_cls, args):
    """One weight per output channel minus its mean is 0: the conv would output its bias."""
    conv = plain_cls(kernel_size=1, **args)
    assert centered_conv_from(conv) is None
    assert "single kernel entry per output channel" in centering_obstacle(conv)
    with pytest.raises(ValueError, match=r"from_conv: cannot centre.*exactly zero"):
        centred_cls.from_conv(conv)
    with pytest.raises(ValueError, match=rf"{centred_cls.__name__} has a single kernel entry"):
        centred_cls(kernel_size=1, **args)
    dim = 1 if plain_cls is nn.Conv1d else 2
    mabn = DIMS[dim][3]
    model = nn.Sequential(conv, DIMS[dim][4](args["out_channels"]))
    with pytest.warns(RuntimeWarning, match="left uncentred because .* single kernel entry"):
        model = smallbn.convert(model, mabn)
    assert model[0] is conv
    # more than one entry per output channel is centred as before
    wider = plain_cls(kernel_size=3, **args)
    assert type(centered_conv_from(wider)) is centred_cls


def test_to_plain_bakes_the_centred_weight():
    conv = CenteredConv2d(3, 4, 3, bias=True)
    plain = conv.to_plain()
    assert type(plain) is nn.Conv2d and plain.bias is conv.bias
    assert plain.weight is not conv.weight
    torch.testing.assert_close(plain.weight, conv.centered_weight().detach())


# -- convert and fold ---------------------------------------------------------------------------


def _net(dim: int) -> nn.Sequential:
    plain_cls, _, _, _, bn_cls = DIMS[dim]
    return nn.Sequential(
        plain_cls(3, 4, 3, padding=1, bias=False),
        bn_cls(4),
        nn.ReLU(),
        plain_cls(4, 4, 1),
        bn_cls(4),
    )


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_convert_swaps_the_producing_convs_keeping_parameters(dim):
    plain_cls, centred_cls, _, mabn_cls, _ = DIMS[dim]
    model = _net(dim)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model = smallbn.convert(model, mabn_cls)
    assert [type(m) for m in model] == [centred_cls, mabn_cls, nn.ReLU, centred_cls, mabn_cls]
    assert list(model.parameters()) == params  # the same objects: the optimizer still trains them
    x = torch.randn(2, 3, *[4] * dim)
    model(x).square().sum().backward()
    before = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_center_producer_false_keeps_the_plain_convs():
    model = smallbn.convert(_net(2), MovingAverageBatchNorm2d, center_producer=False)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Conv2d


@pytest.mark.skipif("mabn" not in smallbn.available_norms(), reason="'mabn' not registered yet")
def test_convert_by_name():
    model = smallbn.convert(_net(2), "mabn")
    assert type(model[0]) is CenteredConv2d and type(model[1]) is MovingAverageBatchNorm2d


def test_eval_output_and_folding_after_baking_the_centred_weights():
    model = smallbn.convert(_net(2), MovingAverageBatchNorm2d, warmup=0, window=2).double()
    for step in range(5):
        model(torch.randn(2, 3, 5, 5, dtype=torch.float64) * (1 + step))
    model.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    norm = model[1]
    z = model[0](x)
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).reshape(1, -1, 1, 1)
    torch.testing.assert_close(norm(z), z * scale + norm.bias.reshape(1, -1, 1, 1))
    expected = model(x)
    # fold bakes the centred weights into plain convs, then folds MABN into them
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and the model stays traceable by torch.fx
        folded, report = smallbn.fold_with_report(model)
    assert len(report.folded) == 2 and report.method == "fx"
    assert not any(isinstance(m, CenteredConv2d) for m in folded.modules())
    # the same as baking by hand
    baked = copy.deepcopy(model)
    for i in (0, 3):
        baked[i] = baked[i].to_plain()
    torch.testing.assert_close(baked(x), expected)
    torch.testing.assert_close(folded(x), expected)
