"""What every smallbn layer inherits from ``layers/_base.py``: the input checks, the step
counter a failed forward leaves untouched, and BN's loading of checkpoints that predate
``num_batches_tracked`` (compared with torch's BatchNorm2d itself)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import smallbn
from smallbn import available_norms, build_norm
from smallbn.layers import NormBase

SMALLBN_NAMES = [n for n in available_norms() if isinstance(build_norm(n, 4), NormBase)]


@pytest.mark.parametrize("name", SMALLBN_NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_integer_input_is_rejected_with_the_fix(name, training):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CBN without a producer says so once
        layer = build_norm(name, 4).train(training)
    with pytest.raises(TypeError, match=r"expected a floating-point input, got torch.int64.*"):
        layer(torch.ones(3, 4, 2, 2, dtype=torch.long))


def test_a_failed_forward_of_any_kind_leaves_the_step_counter():
    layer = smallbn.BatchRenorm2d(4)
    layer(torch.randn(3, 4, 2, 2))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    layer._forward_train = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="out of memory"):
        layer(torch.randn(3, 4, 2, 2))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("layer_class", [smallbn.BatchRenorm2d, smallbn.SyncBatchNorm])
def test_a_checkpoint_without_the_step_counter_keeps_the_layers_count(layer_class):
    layer, torch_bn = layer_class(4), nn.BatchNorm2d(4)
    for module in (layer, torch_bn):
        for _ in range(5):
            module(torch.randn(3, 4, 2, 2))
    old = {k: v for k, v in torch_bn.state_dict().items() if k != "num_batches_tracked"}
    for module in (layer, torch_bn):  # no metadata: a checkpoint from before the buffer
        module.load_state_dict(old, strict=False)
    assert int(torch_bn.num_batches_tracked) == 5
    assert int(layer.num_batches_tracked) == int(torch_bn.num_batches_tracked)


BATCH_STATS_METHODS = ["syncbn", "brn", "ghostbn", "sn", "mabn", "cbn", "domainbn", "shufflebn"]


def _named(name: str, channels: int) -> nn.Module:
    options = {"group_size": 2} if name == "ghostbn" else {}
    layer = build_norm(name, channels, **options)
    layer.model_path = "block.norm"
    return layer.train()


@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30])
@pytest.mark.parametrize("name", BATCH_STATS_METHODS)
def test_finite_inputs_whose_variance_overflows_say_so(name: str, scale: float) -> None:
    # They used to be reported as "the input to this layer contains NaN/Inf".
    x = torch.randn(4, 3, 3, 3) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match=r"at 'block.norm'.*overflow.*input is finite"):
            _named(name, 3)(x)


@pytest.mark.parametrize("name", BATCH_STATS_METHODS)
def test_non_finite_inputs_are_reported_as_such(name: str) -> None:
    x = torch.randn(4, 3, 3, 3)
    x[1, 2, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match=r"at 'block.norm'.*contains NaN/Inf"):
            _named(name, 3)(x)


@pytest.mark.parametrize("name", BATCH_STATS_METHODS)
def test_large_finite_statistics_whose_sum_overflows_are_not_an_error(name: str) -> None:
    # 64 channels of variance ~1e37 are each representable; only their sum is not, which the
    # check's one-reduction fast path must not mistake for a non-finite statistic.
    x = torch.randn(2, 64, 1, 1) * 3e18  # two values per channel: no sum of squares overflows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = _named(name, 64)(x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["sn", "ghostbn", "domainbn", "brn"])
def test_an_input_without_spatial_dims_is_left_as_it_was(name: str) -> None:
    # The per-sample-statistics path takes an (N, C) input's instance mean as x itself; the
    # backward's leaves once made the caller's tensor require grad.
    options = {"group_size": 2} if name == "ghostbn" else {}
    if name == "brn":
        options = {"norm_batch_size": 2}
    layer = build_norm(name, 3, dim=1, **options).train()
    x = torch.randn(6, 3)
    layer(x).sum().backward()
    assert not x.requires_grad and x.grad_fn is None


def _damaged(layer: nn.Module, key: str, value: float) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state[key].view(-1)[0] = value
    return state


@pytest.mark.parametrize(
    ("name", "options", "key", "value"),
    [
        ("mabn", {}, "chi2_count", -3),
        ("mabn", {}, "sma_steps", -1),
        ("mabn", {}, "chi2_window", float("inf")),
        ("mabn", {}, "psi_window", float("nan")),
        ("cbn", {"window": 3}, "window_mean", float("inf")),
        ("cbn", {"window": 3}, "window_var", -1.0),
        ("cbn", {"window": 3}, "window_fill", -2),
        ("sn", {}, "mean_weight", float("nan")),
        *[(name, {}, "running_var", float("nan")) for name in ("brn", "syncbn", "ghostbn")],
        *[(name, {}, "running_var", -0.5) for name in ("frozenbn", "domainbn", "mabn")],
        ("brn", {}, "running_mean", float("inf")),
        ("brn", {}, "num_batches_tracked", -7),
    ],
)
def test_a_checkpoint_with_invalid_values_is_refused_naming_the_layer_and_key(
    name: str, options: dict, key: str, value: float
) -> None:
    # They used to load, and outputs became non-finite later (or never, silently wrong).
    source = build_norm(name, 4, **options)
    state = _damaged(source, key, value)
    target = build_norm(name, 4, **options)
    target.model_path = "block.norm"
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"at 'block.norm': the checkpoint's values .*'{key}'"):
        target.load_state_dict(state)
    for k, v in target.state_dict().items():  # this layer kept its own state
        assert torch.equal(before[k], v), k


def test_switchable_checkpoint_with_other_branches_says_which() -> None:
    three = build_norm("sn", 4)
    two = build_norm("sn", 4, branches=("in", "ln"))
    with pytest.raises(RuntimeError, match=r"mixes 3 branch.*this layer 2: \('in', 'ln'\)"):
        two.load_state_dict(three.state_dict())
