"""Sequence tests: each tool leaves every piece of layer state it does not document changing
exactly as it was.

For every method, a small conv net is trained a few steps (so windows, counters and running
statistics hold real values), then a tool runs, and the full state is compared before and
after: every ``state_dict`` entry bit for bit, which buffers exist at all, and the host-side
state layers keep beside their buffers (CBN's chosen window and counters, MABN's step).

* ``precise_bn``: only ``running_mean``/``running_var`` change.
* ``batch_stats_eval``: nothing changes, and two identical calls give identical outputs.
* ``fold`` (not in place): the source model is untouched.
* ``freeze_norms`` / ``convert``: the modules they do not replace keep their state.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import smallbn

METHODS = [
    "bn",
    "brn",
    "ghostbn",
    "sn",
    "mabn",
    "cbn",
    "domainbn",
    "syncbn",
    "gn",
    "frozenbn",
    "shufflebn",
]
OPTIONS: dict[str, dict[str, Any]] = {
    "ghostbn": {"group_size": 2},
    "mabn": {"warmup": 1, "clamp_start": 1, "window": 3},
    "cbn": {"window": None},
    "domainbn": {"num_domains": 2},
}


def _net(method: str, **options: Any) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return smallbn.convert(model, method, **{**OPTIONS.get(method, {}), **options})


def _train(model: nn.Module, steps: int = 4, batch: int = 2) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(batch, 3, 8, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


_HOST_STATE = (
    "_iteration",
    "_fill",
    "_auto_window",
    "window_size",
    "active_domain",
    "_steps",
    "_chi2_fill",
    "_psi_fill",
)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a tool could change: state_dict values, which buffer slots exist (``None``
    ones too), modes, and the host-side copies layers keep."""
    state: dict[str, Any] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        state[f"{name}:buffers"] = sorted(
            (k, v is None)
            for k, v in module._buffers.items()  # noqa: SLF001
        )
        state[f"{name}:training"] = module.training
        for attr in _HOST_STATE:
            if hasattr(module, attr):
                state[f"{name}:{attr}"] = copy.copy(getattr(module, attr))  # not a live object
    return state


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    keys = before.keys() | after.keys()
    changed = []
    for key in sorted(keys):
        a, b = before.get(key, "<absent>"), after.get(key, "<absent>")
        same = (
            torch.equal(a, b)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            else (
                a == b
                if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)
                else False
            )
        )
        if not same:
            changed.append(key)
    return changed


def _batches(count: int, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(count)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_precise_bn_changes_only_running_statistics(method: str, training: bool) -> None:
    model = _net(method)
    _train(model)
    model.train(training)
    before = _snapshot(model)
    smallbn.precise_bn(model, _batches(4, size=8), num_samples=32, progress=False)
    changed = _differences(before, _snapshot(model))
    allowed = [k for k in changed if k.endswith(("running_mean", "running_var"))]
    assert changed == allowed, f"{method}: precise_bn changed {sorted(set(changed) - set(allowed))}"
    if smallbn.uses_batch_stats(model[1]):
        assert allowed, f"{method}: precise_bn changed no running statistics"


def test_precise_bn_never_chooses_cbn_window_or_allocates_it() -> None:
    # window=None picks k from the first *training* batch; a PreciseBN pass at batch 16
    # used to pick k = 1, so a later batch-2 training run was plain BN.
    model = _net("cbn")
    before = _snapshot(model)
    smallbn.precise_bn(model, _batches(2, size=16), num_samples=32, progress=False)
    assert _differences(before, _snapshot(model)) == [
        k for k in _differences(before, _snapshot(model)) if k.endswith(("mean", "var"))
    ]
    assert model[1].window_size is None and model[1].window_mean is None
    _train(model, steps=1, batch=2)
    assert model[1].window_size == smallbn.layers.cross_iteration.recommended_window(2) == 8


@pytest.mark.parametrize("method", METHODS)
def test_batch_stats_eval_changes_nothing_and_repeats(method: str) -> None:
    model = _net(method)
    _train(model)
    before = _snapshot(model)
    x = torch.randn(4, 3, 8, 8)
    with smallbn.batch_stats_eval(model):
        first = model(x)
        second = model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert _differences(before, _snapshot(model)) == []


@pytest.mark.parametrize("method", ["mabn", "cbn"])
def test_batch_stats_eval_uses_the_current_batch_alone(method: str) -> None:
    # MABN used its training moving averages (and advanced them); the output must be that of
    # the same layer with empty windows and counters reset: the current batch alone.
    model = _net(method)
    _train(model)
    fresh = copy.deepcopy(model)
    for layer in fresh.modules():
        if isinstance(layer, smallbn.MovingAverageBatchNorm):
            layer.reset_moving_averages()
        if isinstance(layer, smallbn.CrossIterationBatchNorm):
            layer.reset_window()
    x = torch.randn(4, 3, 8, 8)
    with smallbn.batch_stats_eval(model):
        got = model(x)
    with smallbn.batch_stats_eval(fresh):
        want = fresh(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and it is plain batch-statistics normalization: for MABN E[x²] of this batch, for CBN
    # BN's mean and variance of this batch
    layer = model[1]
    z = model[0](x)
    if method == "mabn":
        expected = z / torch.sqrt(z.square().mean((0, 2, 3), keepdim=True) + layer.eps)
    else:
        mean = z.mean((0, 2, 3), keepdim=True)
        expected = (z - mean) / torch.sqrt(z.var((0, 2, 3), correction=0, keepdim=True) + 1e-5)
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    with smallbn.batch_stats_eval(model):
        torch.testing.assert_close(layer(z), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_fold_leaves_the_source_model_untouched(method: str) -> None:
    model = _net(method)
    _train(model)
    model.eval()
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        smallbn.fold(model)
    assert _differences(before, _snapshot(model)) == []


@pytest.mark.parametrize("method", METHODS)
def test_freeze_norms_keeps_every_state_value(method: str) -> None:
    model = _net(method)
    _train(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = smallbn.freeze_norms(model)
    after = frozen.state_dict()
    # BN's keys of a frozen layer hold the same values (domain BN: its active domain's
    # statistics, as documented); nothing else moved
    for key, value in after.items():
        old = before[key]
        if old.dim() == 2 and value.dim() == 1:
            old = old[0]
        assert torch.equal(old.to(value.dtype), value), key
    replaced = {k.rsplit(".", 1)[0] for k in before.keys() - after.keys()}
    assert all(isinstance(frozen.get_submodule(n), smallbn.FrozenBatchNorm) for n in replaced)


@pytest.mark.parametrize("method", METHODS)
def test_convert_leaves_modules_it_does_not_replace_untouched(method: str) -> None:
    model = _net(method)
    _train(model)
    first, last = copy.deepcopy(model[0].state_dict()), copy.deepcopy(model[8].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        converted = smallbn.convert(model, "ghostbn", group_size=2)
    for key, value in converted[8].state_dict().items():
        assert torch.equal(last[key], value)
    # the first conv's function is kept (MABN's centred conv turns back into a plain conv
    # holding the centred weight, see test_convert)
    x = torch.randn(2, 3, 8, 8)
    plain = nn.Conv2d(3, 6, 3, padding=1)
    plain.load_state_dict(first)
    if method == "mabn":
        with torch.no_grad():
            plain.weight -= plain.weight.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(converted[0](x), plain(x))
