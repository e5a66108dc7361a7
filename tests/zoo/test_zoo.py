"""smallbn on the models people train: every architecture of the zoo (``_architectures.py``)
through every registered method.

For each (architecture, method):

* ``test_convert``: ``convert_with_report`` replaces every BN-like layer (torch's BNs, timm's
  BatchNormAct2d, torchvision's FrozenBatchNorm2d; the report's count against the model's), a
  convert with nothing to replace says so, and CBN/MABN are paired with every producer the
  data flow shows (``_dataflow.py``, independent of torch.fx);
* ``test_train``: from BN statistics that fit the model (as a pretrained one has), three SGD
  steps at batch 1 and at batch 2: finite losses that change, finite gradients (clipped to
  norm 1), parameters and statistics;
* ``test_precise_bn``: PreciseBN on two batches sets every batch-statistics layer, then a
  finite eval forward;
* ``test_fold``: with random norm statistics, ``fold`` keeps the eval outputs (1e-5 relative
  to their scale) and folds every norm the data flow shows foldable (none for the methods
  that are not an affine map in eval: GN/LN/IN/SN);
* ``test_state_dict``: after a training step, the state_dict loads (strict) into a fresh
  model converted the same way, with the same eval outputs;
* ``test_back_to_bn``: after a training step, ``convert(model, "bn")`` loads (strict) into a
  freshly built original architecture with the same eval outputs (and, for methods that are
  BN's affine map in eval, the method's own eval outputs);

and for each architecture ``test_convert_to_bn_is_identity``: converting the unconverted model
to "bn" leaves its eval outputs unchanged.

``_known_failures.py`` lists the exceptions: library defects as ``xfail(strict=True)`` (each
XPASSes, failing the run, once fixed: remove its entry then), and cases a method cannot run
(a 1x1 map at batch 1...), where the test asserts smallbn's clear refusal instead.

``make test`` runs the architectures marked ``ci`` (one per family); ``make test-zoo`` all.
Set ``SMALLBN_ZOO_RECORD=path.jsonl`` to append what each convert/fold test measured.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from typing import Any

import pytest
import torch
from _architectures import ARCHITECTURES, Architecture
from _dataflow import Dataflow, bn_like, dataflow
from _known_failures import expected_refusal, known_failure
from torch import Tensor, nn

import smallbn
from _layer_checks import AFFINE_IN_EVAL
from smallbn.layers import CenteredConv1d, CenteredConv2d, CenteredConv3d

pytestmark = [
    pytest.mark.zoo,
    # The conversions that change a model's function say so; the report lists them too.
    pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning"),
]

METHODS = smallbn.available_norms()
#: Constructor options: Ghost BN normalizes each sample alone (the default group of 32 would
#: be BN at these batch sizes).
OPTIONS: dict[str, dict[str, Any]] = {"ghostbn": {"group_size": 1}}
STEPS = 3
LR = 0.01
CLIP = 1.0


def _cases(step: str, methods: list[str] | None = None) -> list[Any]:
    params = []
    for arch in ARCHITECTURES:
        for method in METHODS if methods is None else methods:
            marks = known_failure(arch, method, step)
            params.append(pytest.param(arch, method, id=f"{arch}-{method}", marks=marks))
    return params


def _train_cases() -> list[Any]:
    params = []
    for arch in ARCHITECTURES:
        for method in METHODS:
            for batch in (1, 2):
                marks = known_failure(arch, method, f"train_b{batch}")
                params.append(
                    pytest.param(arch, method, batch, id=f"{arch}-{method}-{batch}", marks=marks)
                )
    return params


# -- helpers ----------------------------------------------------------------------------------


def _build(arch: str) -> nn.Module:
    return ARCHITECTURES[arch].build()


def _convert(model: nn.Module, method: str) -> tuple[nn.Module, list[Any]]:
    return smallbn.convert_with_report(model, method, **OPTIONS.get(method, {}))


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def _dataflow(arch: str) -> Dataflow:
    """The foldable norm → producer pairs of the unconverted architecture (same for every
    method: convert keeps module paths)."""
    x, _ = ARCHITECTURES[arch].task.batch(2, _generator(1))
    return dataflow(_build(arch), x)


def _record(**entry: Any) -> None:
    path = os.environ.get("SMALLBN_ZOO_RECORD")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps(entry) + "\n")


def _eval_outputs(architecture: Architecture, model: nn.Module, x: Any) -> list[Tensor]:
    model.eval()
    with torch.no_grad():
        return [t.detach().clone() for t in architecture.task.outputs(model, x)]


def _assert_outputs_close(got: list[Tensor], expected: list[Tensor], rtol: float) -> None:
    """Each output within ``rtol`` of its reference, relative to the reference's scale (its
    largest magnitude), so that entries near zero do not demand more than the float32 noise
    of the largest."""
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.isfinite(b).all(), f"output {i}: the reference is not finite"
        scale = float(b.abs().max())
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m, i=i: f"output {i}: {m}"
        )


def _train_steps(
    architecture: Architecture, model: nn.Module, batch: int, steps: int
) -> list[float]:
    x, y = architecture.task.batch(batch, _generator(2))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = architecture.task.loss(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        # Clipped as fine-tuning recipes do: a random network whose norms do not adapt
        # (FrozenBN; torchvision's FrozenBatchNorm2d the same) has gradient norms of 1e3-1e4
        # and diverges in one unclipped step.  A non-finite gradient fails the test here.
        torch.nn.utils.clip_grad_norm_(params, CLIP, error_if_nonfinite=True)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _calibrated(arch: str) -> nn.Module:
    """The architecture with population statistics in its BNs (PreciseBN over two batches), as
    a pretrained model has them: a model converted to FrozenBN then trains from a normalized
    network, not from BN's initial identity statistics (an unnormalized ResNet-50 diverges)."""
    architecture = ARCHITECTURES[arch]
    model = _build(arch)
    batches = [architecture.task.batch(2, _generator(seed)) for seed in (11, 12)]
    return smallbn.precise_bn(
        model,
        batches,
        num_samples=4,
        forward=lambda m, batch: m(batch[0]),
        batch_size=lambda batch: len(batch[0]),
        progress=False,
    )


@torch.no_grad()
def _randomize_norms(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial affine parameters and running statistics in every norm (as a trained model
    has), so that folding and converting are checked on maps other than the identity."""
    generator = _generator(seed)
    for module in bn_like(model).values():
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
            if name == "running_var":
                tensor.copy_(0.5 + noise)  # in [0.5, 1.5]
            elif name == "running_mean" or name == "bias":
                tensor.copy_(0.2 * (noise - 0.5))
            elif name == "weight":
                tensor.copy_(0.5 + noise)


def _centred(model: nn.Module) -> set[str]:
    kinds = (CenteredConv1d, CenteredConv2d, CenteredConv3d)
    return {name for name, m in model.named_modules() if isinstance(m, kinds)}


def _cbn_producers(model: nn.Module) -> dict[str, str]:
    names = {id(m): name for name, m in model.named_modules()}
    bound = {}
    for name, m in model.named_modules():
        producer = m.producer if isinstance(m, smallbn.CrossIterationBatchNorm) else None
        if isinstance(producer, nn.Module):
            bound[name] = names.get(id(producer), "<outside the model>")
    return bound


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "method"), _cases("convert"))
def test_convert(arch: str, method: str) -> None:
    model = _build(arch)
    norms = bn_like(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model, report = _convert(model, method)
        except (ValueError, TypeError) as error:
            if norms:
                raise
            report, said = [], str(error)  # no norm: refusing, naming the problem, is fine
        else:
            said = "; ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    replaced = {item.name for item in report}
    flow = _dataflow(arch)
    entry: dict[str, Any] = {
        "test": "convert",
        "arch": arch,
        "method": method,
        "bn_like": len(norms),
        "replaced": len(replaced),
        "foldable": len(flow.pairs),
    }
    if method == "cbn":
        entry["cbn_paired"] = len(_cbn_producers(model))
    if method == "mabn":
        entry["mabn_centred"] = len(_centred(model))
    _record(**entry)
    assert replaced == set(norms), (
        f"replaced {len(replaced)} of the {len(norms)} BN-like layers; not replaced: "
        f"{sorted(set(norms) - replaced)[:5]}"
    )
    if not norms:
        assert said, "convert found no norm layer to replace and said nothing"
    if method == "cbn":
        assert _cbn_producers(model) == flow.pairs, (
            f"CBN paired {len(_cbn_producers(model))} of the {len(flow.pairs)} norms whose "
            f"producer the data flow shows"
        )
    if method == "mabn":
        centred, expected = _centred(model), set(flow.pairs.values())
        assert centred == expected, (
            f"MABN centred {len(centred & expected)} of the {len(expected)} convs that feed "
            f"a norm alone; uncentred: {sorted(expected - centred)[:5]}"
        )


@pytest.mark.parametrize(("arch", "method", "batch"), _train_cases())
def test_train(arch: str, method: str, batch: int) -> None:
    architecture = ARCHITECTURES[arch]
    with expected_refusal(arch, method, f"train_b{batch}"):
        model, _ = _convert(_calibrated(arch), method)
        losses = _train_steps(architecture, model, batch, STEPS)
        assert all(math.isfinite(v) for v in losses), f"losses {losses}"
        assert losses[0] != losses[-1], f"the loss did not change over {STEPS} steps: {losses}"
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"'{name}' is not finite after training"


@pytest.mark.parametrize(("arch", "method"), _cases("precise_bn"))
def test_precise_bn(arch: str, method: str) -> None:
    architecture = ARCHITECTURES[arch]
    with expected_refusal(arch, method, "precise_bn"):
        model, _ = _convert(_build(arch), method)
        batches = [architecture.task.batch(2, _generator(seed)) for seed in (4, 5)]
        layers = [m for m in model.modules() if smallbn.uses_batch_stats(m)]
        before = [m.running_var.clone() for m in layers]
        smallbn.precise_bn(
            model,
            batches,
            num_samples=4,
            forward=lambda m, batch: m(batch[0]),
            batch_size=lambda batch: len(batch[0]),
            progress=False,
        )
        changed = sum(
            not torch.equal(m.running_var, b) for m, b in zip(layers, before, strict=True)
        )
        assert changed == len(layers), f"PreciseBN changed {changed} of {len(layers)} layers"
        x, _ = architecture.task.batch(2, _generator(6))
        for i, out in enumerate(_eval_outputs(architecture, model, x)):
            assert torch.isfinite(out).all(), f"eval output {i} is not finite after PreciseBN"


def _double(x: Any) -> Any:
    return [_double(t) for t in x] if isinstance(x, list) else x.double()


def _assert_folded_close(
    architecture: Architecture,
    model: nn.Module,
    got: list[Tensor],
    expected: list[Tensor],
    x: Any,
    rtol: float = 1e-5,
) -> None:
    """The folded outputs ``got`` within ``rtol`` of the unfolded ``expected``; where they are
    not, the model's own float32 rounding is the cause if the folded outputs are as close to
    the model's float64 function as the unfolded float32 ones (a random model can amplify
    rounding past ``rtol``: MABN's centred ResNet-50 with random statistics, 3e-5)."""
    try:
        _assert_outputs_close(got, expected, rtol)
    except AssertionError as error:
        exact = _eval_outputs(architecture, copy.deepcopy(model).double(), _double(x))
        for i, (folded, unfolded, truth) in enumerate(zip(got, expected, exact, strict=True)):
            scale = float(truth.abs().max())
            folded_error = float((folded.double() - truth).abs().max()) / scale
            unfolded_error = float((unfolded.double() - truth).abs().max()) / scale
            assert folded_error <= max(rtol, 2 * unfolded_error), (
                f"output {i}: the folded model is {folded_error:.2e} (relative to the output's "
                f"scale) from the float64 function, the unfolded float32 model "
                f"{unfolded_error:.2e}\n{error}"
            )


@pytest.mark.parametrize(("arch", "method"), _cases("fold"))
def test_fold(arch: str, method: str) -> None:
    architecture = ARCHITECTURES[arch]
    with expected_refusal(arch, method, "fold"):
        model, _ = _convert(_build(arch), method)
        _randomize_norms(model)
        x, _ = architecture.task.batch(2, _generator(7))
        expected = _eval_outputs(architecture, model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fold's warning about untraceable models
            folded, report = smallbn.fold_with_report(model)
        pairs = {item.norm: item.producer for item in report.folded}
        foldable = _dataflow(arch).pairs if method in AFFINE_IN_EVAL else {}
        _record(test="fold", arch=arch, method=method, folded=len(pairs), foldable=len(foldable))
        got = _eval_outputs(architecture, folded, x)
        _assert_folded_close(architecture, model, got, expected, x)
        kept = {k.norm: k.reason for k in report.kept}
        missing = {n: kept.get(n, "?") for n in foldable if pairs.get(n) != foldable[n]}
        assert not missing, (
            f"folded {len(foldable) - len(missing)} of the {len(foldable)} foldable norms; "
            f"e.g. {list(missing.items())[:2]}"
        )
        assert pairs == foldable


@pytest.mark.parametrize(("arch", "method"), _cases("state_dict"))
def test_state_dict(arch: str, method: str) -> None:
    architecture = ARCHITECTURES[arch]
    with expected_refusal(arch, method, "state_dict"):
        model, _ = _convert(_build(arch), method)
        _train_steps(architecture, model, 2, 1)
        x, _ = architecture.task.batch(2, _generator(8))
        expected = _eval_outputs(architecture, model, x)
        fresh, _ = _convert(_build(arch), method)
        fresh.load_state_dict(model.state_dict(), strict=True)
        _assert_outputs_close(_eval_outputs(architecture, fresh, x), expected, rtol=1e-6)


@pytest.mark.parametrize(("arch", "method"), _cases("back_to_bn"))
def test_back_to_bn(arch: str, method: str) -> None:
    architecture = ARCHITECTURES[arch]
    with expected_refusal(arch, method, "back_to_bn"):
        model, _ = _convert(_build(arch), method)
        _train_steps(architecture, model, 2, 1)
        x, _ = architecture.task.batch(2, _generator(9))
        method_outputs = _eval_outputs(architecture, model, x)
        back = smallbn.convert(model, "bn")
        original = _build(arch)
        original.load_state_dict(back.state_dict(), strict=True)
        expected = _eval_outputs(architecture, back, x)
        # 1e-5: the original's layers may compute BN's map another way (FrozenBatchNorm2d)
        _assert_outputs_close(_eval_outputs(architecture, original, x), expected, rtol=1e-5)
        if method in AFFINE_IN_EVAL:
            _assert_outputs_close(expected, method_outputs, rtol=1e-5)


@pytest.mark.parametrize(("arch", "method"), _cases("bn_identity", ["bn"]))
def test_convert_to_bn_is_identity(arch: str, method: str) -> None:
    architecture = ARCHITECTURES[arch]
    model = _build(arch)
    _randomize_norms(model)
    x, _ = architecture.task.batch(2, _generator(10))
    expected = _eval_outputs(architecture, model, x)
    converted = smallbn.convert(model, method)
    # 1e-5: a FrozenBatchNorm2d (scale and shift) and BN ((x - mean) / std) round differently
    _assert_outputs_close(_eval_outputs(architecture, converted, x), expected, rtol=1e-5)
