"""SwitchableNorm against a float64 reference written from docs/methods.md, and the single-branch
identities with torch's InstanceNorm / LayerNorm (as GroupNorm) / BatchNorm."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import smallbn
from reference import switchable_norm

SHAPES = [(4, 3, 5), (3, 5, 4, 4), (2, 3, 2, 3, 3)]
CLASSES = {3: smallbn.SwitchableNorm1d, 4: smallbn.SwitchableNorm2d, 5: smallbn.SwitchableNorm3d}


def _randomized(shape, branches=("in", "ln", "bn"), seed=0, **kwargs):
    layer = CLASSES[len(shape)](shape[1], branches=branches, dtype=torch.float64, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        layer.mean_weight.copy_(torch.randn(len(layer.branches), generator=g, dtype=torch.float64))
        layer.var_weight.copy_(torch.randn(len(layer.branches), generator=g, dtype=torch.float64))
    return layer


def _params(layer):
    return [layer.weight, layer.bias, layer.mean_weight, layer.var_weight]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("branches", [("in", "ln", "bn"), ("in", "ln"), ("ln", "bn")])
def test_outputs_gradients_running_stats_match_reference(shape, branches):
    layer = _randomized(shape, branches)
    ref_params = [p.detach().clone().requires_grad_() for p in _params(layer)]
    running = [layer.running_mean.clone(), layer.running_var.clone()]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + step
        upstream = torch.randn(shape, generator=g, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(x1)
        weight, bias, mean_logits, var_logits = ref_params
        y_ref, *running = switchable_norm(
            x2,
            mean_logits,
            var_logits,
            weight,
            bias,
            *running,
            eps=layer.eps,
            momentum=0.1,
            training=True,
            branches=branches,
        )
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-9)
        for p, r in zip(_params(layer), ref_params, strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-9)
            p.grad, r.grad = None, None
        if "bn" in branches:
            torch.testing.assert_close(layer.running_mean, running[0])
            torch.testing.assert_close(layer.running_var, running[1])
    layer.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weight, bias, mean_logits, var_logits = (p.detach() for p in ref_params)
    y_ref, _, _ = switchable_norm(
        x,
        mean_logits,
        var_logits,
        weight,
        bias,
        layer.running_mean,
        layer.running_var,
        eps=layer.eps,
        momentum=0.1,
        training=False,
        branches=branches,
    )
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    ("branch", "torch_layer"),
    [
        ("in", lambda c: nn.GroupNorm(c, c)),
        ("ln", lambda c: nn.GroupNorm(1, c)),
        ("bn", None),
    ],
)
def test_single_branch_is_in_ln_or_bn(shape, branch, torch_layer):
    c = shape[1]
    if torch_layer is None:
        ref = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](c)
    else:
        ref = torch_layer(c)
    ref = ref.double()
    layer = _randomized(shape, (branch,))
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    x = torch.randn(shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(shape, dtype=torch.float64)
    (layer(x1) * upstream).sum().backward()
    (ref(x2) * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-9, atol=1e-9)


@given(
    n=st.integers(1, 5),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_any_shape_and_dtype_is_finite_and_close_to_reference(n, c, spatial, dtype):
    shape = (n, c, *spatial)
    assume(n * c * math.prod(spatial) > 1)  # one value in all: an error, tested below
    layer = smallbn.SwitchableNorm(c)
    x = torch.randn(shape).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    per_sample = int(torch.tensor(spatial).prod()) if spatial else 1
    if per_sample > 1 and n * per_sample > 1:  # every branch computable: compare numbers
        ref, _, _ = switchable_norm(
            x,
            layer.mean_weight,
            layer.var_weight,
            layer.weight,
            layer.bias,
            torch.zeros(c, dtype=torch.float64),
            torch.ones(c, dtype=torch.float64),
            eps=layer.eps,
            momentum=0.1,
            training=True,
        )
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol)


def test_one_by_one_inputs_leave_out_in_once_and_stay_finite():
    layer = smallbn.SwitchableNorm2d(4)
    x = torch.randn(3, 4, 1, 1)
    with pytest.warns(RuntimeWarning, match=r"SwitchableNorm2d\(4\): the IN branch is left out"):
        y = layer(x)
    assert torch.isfinite(y).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # said once
    # with IN left out the result is the LN/BN mixture with renormalized weights
    ref, _, _ = switchable_norm(
        x.double(),
        layer.mean_weight[1:],
        layer.var_weight[1:],
        layer.weight,
        layer.bias,
        torch.zeros(4, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64),
        eps=layer.eps,
        momentum=0.1,
        training=True,
        branches=("ln", "bn"),
    )
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "branches"),
    [
        ((1, 8, 1, 1), ("ln",)),  # batch 1, one value per channel: IN and BN left out
        ((3, 8, 1, 1), ("ln", "bn")),  # IN left out
        ((2, 8, 3, 3), ("in", "ln", "bn")),  # nothing left out
    ],
)
def test_gradients_with_branches_left_out_match_the_reference(shape, branches, dtype):
    # An ASPP image-pooling branch at batch 1 feeds SN one value per channel; the input
    # gradient once read memory past the mixed statistics (1e24 in float32, a different
    # value each run).  Reference: autograd of the formula with the computable branches only.
    layer = smallbn.SwitchableNorm2d(shape[1], dtype=dtype)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
        layer.var_weight.copy_(torch.tensor([-0.4, 0.1, 0.2]))
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    grad_y = torch.arange(x.numel(), dtype=dtype).reshape(shape) / x.numel() - 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (layer(x) * grad_y).sum().backward()
    keep = [smallbn.layers.switchable.BRANCHES.index(b) for b in branches]
    leaves = [
        t.detach().double().requires_grad_()
        for t in (x, layer.mean_weight, layer.var_weight, layer.weight, layer.bias)
    ]
    x64, mean_logits, var_logits, weight, bias = leaves
    ref, _, _ = switchable_norm(
        x64,
        mean_logits[keep],
        var_logits[keep],
        weight,
        bias,
        torch.zeros(shape[1], dtype=torch.float64),
        torch.ones(shape[1], dtype=torch.float64),
        eps=layer.eps,
        momentum=0.1,
        training=True,
        branches=branches,
    )
    (ref * grad_y.double()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for got, want in zip(
        (x, layer.mean_weight, layer.var_weight, layer.weight, layer.bias), leaves, strict=True
    ):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol)


def test_batch_one_without_spatial_dims_uses_layer_statistics():
    layer = smallbn.SwitchableNorm1d(5)
    x = torch.randn(1, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        y = layer.double()(x)
    expected = (x - x.mean()) / torch.sqrt(x.var(correction=0) + layer.eps)
    torch.testing.assert_close(y, expected)
    # no batch statistics were averaged in, so no step was counted (momentum=None divides
    # by the count)
    assert layer.num_batches_tracked.item() == 0 and torch.all(layer.running_mean == 0)


def test_cumulative_average_skips_batches_without_batch_statistics():
    layer = smallbn.SwitchableNorm1d(3, momentum=None, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer(torch.randn(1, 3, dtype=torch.float64))  # BN branch left out: no statistics
    x = torch.randn(6, 3, dtype=torch.float64) + 4
    layer(x)
    assert layer.num_batches_tracked.item() == 1
    np.testing.assert_allclose(layer.running_mean.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), x.numpy().var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("branches", [("bn",), ("in", "bn")])
def test_input_gradient_with_constant_statistics_in_eval(branches):
    """Eval mode with the mixture frozen: the statistics are constants (running BN ones, and
    IN is left out on 1×1 maps), and the input still gets its gradient, γ·x̂'s."""
    layer = smallbn.SwitchableNorm2d(3, branches=branches, dtype=torch.float64)
    for p in (layer.mean_weight, layer.var_weight):
        p.requires_grad_(False)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        layer.weight.copy_(torch.tensor([1.5, 0.7, -0.3]))
    layer.eval()
    x = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer(x).sum().backward()
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(x.grad, scale.detach().view(1, 3, 1, 1).expand(4, 3, 1, 1))


def test_eval_without_the_bn_branch_on_single_values_says_what_to_change():
    layer = smallbn.SwitchableNorm2d(3, branches=("in",)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="Include 'bn' in branches"):
            layer(torch.randn(2, 3, 1, 1))


def test_single_value_everywhere_is_an_error():
    layer = smallbn.SwitchableNorm1d(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="every branch of the mixture"):
            layer(torch.randn(1, 1))


def test_nan_input_is_reported():
    with pytest.raises(FloatingPointError, match=r"SwitchableNorm2d\(3\).*NaN or Inf"):
        smallbn.SwitchableNorm2d(3)(torch.full((2, 3, 4, 4), float("nan")))


def test_momentum_none_is_the_batch_average():
    layer = smallbn.SwitchableNorm2d(3, momentum=None, dtype=torch.float64)
    xs = [torch.randn(4, 3, 3, 3, dtype=torch.float64) + i for i in range(3)]
    for x in xs:
        layer(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    variances = torch.stack([x.var((0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(layer.running_mean, means)
    torch.testing.assert_close(layer.running_var, variances)


def test_bn_checkpoint_loads_and_convert_keeps_state():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(), bn.bias.uniform_(), bn.running_mean.uniform_()
        bn.running_var.uniform_(1, 2)
    layer = smallbn.SwitchableNorm2d(4)
    layer.load_state_dict(bn.state_dict())  # strict: mixture logits keep their initial values
    assert torch.equal(layer.mean_weight, torch.ones(3))
    assert set(layer.state_dict()) == set(bn.state_dict()) | {"mean_weight", "var_weight"}
    model = smallbn.convert(nn.Sequential(copy.deepcopy(bn)), "sn")
    assert isinstance(model[0], smallbn.SwitchableNorm2d)
    assert torch.equal(model[0].running_var, bn.running_var)
    assert torch.equal(model[0].weight, bn.weight)


def test_last_gamma_and_mixture_report():
    layer = smallbn.SwitchableNorm2d(4, last_gamma=True)
    assert torch.all(layer.weight == 0)
    mixture = smallbn.SwitchableNorm2d(4).mixture()
    assert mixture["mean"] == pytest.approx({"in": 1 / 3, "ln": 1 / 3, "bn": 1 / 3})


def test_bad_branches():
    with pytest.raises(ValueError, match="non-empty subset"):
        smallbn.SwitchableNorm2d(4, branches=("gn",))


def test_mixture_report_table_and_plot(tmp_path):
    from smallbn.mixture import format_mixture_table, mixture_weights, plot_mixture

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        smallbn.SwitchableNorm2d(4),
        smallbn.SwitchableNorm2d(4, branches=("in", "ln")),
    )
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([0.0, 0.0, 2.0]))
    weights = mixture_weights(model)
    assert list(weights) == ["1", "2"]
    expected = torch.softmax(torch.tensor([0.0, 0.0, 2.0]), 0)[2].item()
    assert weights["1"]["mean"]["bn"] == pytest.approx(expected)
    table = format_mixture_table(model)
    assert f"| 1 | 0.11 | 0.11 | {expected:.2f} | 0.33 | 0.33 | 0.33 |" in table
    assert "| 2 | 0.50 | 0.50 | – |" in table
    assert plot_mixture(model, tmp_path / "mix.png").stat().st_size > 1000


def _release_switch_norm(x, layer):
    """The authors' SwitchNorm2d forward (devkit/ops/switchable_norm.py), float64: IN's
    variance by torch.var's default (unbiased), LN from IN's moments, BN from the running
    statistics (eval) or from IN's moments (training), eps after the mixture."""
    n, c, h, w = x.shape
    v = x.double().view(n, c, -1)
    mean_in, var_in = v.mean(-1, keepdim=True), v.var(-1, keepdim=True)
    mean_ln = mean_in.mean(1, keepdim=True)
    temp = var_in + mean_in**2
    var_ln = temp.mean(1, keepdim=True) - mean_ln**2
    if layer.training:
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = temp.mean(0, keepdim=True) - mean_bn**2
    else:
        mean_bn = layer.running_mean.double().view(1, c, 1)
        var_bn = layer.running_var.double().view(1, c, 1)
    mw = torch.softmax(layer.mean_weight.double(), 0)
    vw = torch.softmax(layer.var_weight.double(), 0)
    mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
    var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
    y = ((v - mean) / (var + layer.eps).sqrt()).view(n, c, h, w)
    return y * layer.weight.double().view(1, c, 1, 1) + layer.bias.double().view(1, c, 1, 1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("spatial", [(2, 1), (3, 5), (7, 7)])
def test_unbiased_instance_var_is_the_release_inference(training, spatial):
    torch.manual_seed(0)
    layer = smallbn.SwitchableNorm2d(6, unbiased_instance_var=True).double()
    with torch.no_grad():
        layer.mean_weight.normal_()
        layer.var_weight.normal_()
        layer.weight.normal_()
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    x = torch.randn(4, 6, *spatial, dtype=torch.float64) * 3 + 1
    expected = _release_switch_norm(x, layer)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert "unbiased_instance_var=True" in repr(layer)
    default = smallbn.SwitchableNorm2d(6).double()
    default.load_state_dict(layer.state_dict())
    default.train(training)
    assert not torch.allclose(default(x), expected, rtol=1e-4)  # the paper's population moments
