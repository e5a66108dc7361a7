"""Every method's eval-mode model through ``torch.export`` and ONNX (issue 23).

For each registered method, two converted models — a block ``Conv2d → norm → ReLU`` and a
small two-block network (two such blocks, the second strided, then a pooled linear head) —
with random parameters and running statistics from three training batches, in eval mode,
unfolded and folded (:func:`smallbn.fold`):

* ``torch.export.export`` gives a program whose outputs equal eager's, also on an input
  other than the one it was traced with, and that mutates no buffer (an inference program
  keeps no state: eval-mode finite checks are left out of exports, see
  :func:`smallbn.stats.exporting`);
* ``torch.onnx.export(..., dynamo=True)`` gives an ONNX model that onnxruntime runs with
  eager's outputs (atol 1e-5);
* the legacy TorchScript-based ``torch.onnx.export(..., dynamo=False)`` too (SN and GN/LN/IN
  failed there before).

Under the default finite check (``"auto"``); with ``"step"``, whose eager checks read the
host, the eval models export the same (a host read in an exported program failed
``torch.export`` on a data-dependent guard for SN and GN/LN/IN before).

The legacy exporter's TorchScript tracer warns (``TracerWarning``) wherever shapes are
compared in Python (the layers' input checks): shapes are static here, those warnings are
silenced.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import smallbn
from _layer_checks import AFFINE_IN_EVAL  # fold leaves none of their norms

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # the legacy exporter says it is
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.onnx's own pytree deprecations
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # shape checks, see above
]

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it

#: Options as in tests/test_compile.py (a full window, past warm-ups, Ghost BN in pairs).
OPTIONS: dict[str, dict[str, Any]] = {
    "ghostbn": {"group_size": 2},
    "brn": {"warmup_steps": 0},
    "cbn": {"window": 3, "burnin": 0},
    "mabn": {"window": 2, "warmup": 0},
}


#: The exported program runs the same kernels as eager, up to the decomposition of a few ops.
EXPORT_TOL = dict(rtol=1e-5, atol=1e-6)
#: onnxruntime's kernels against torch's.
ONNX_ATOL = 1e-5

N, C_IN, SIZE = 4, 3, 6


def _block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(C_IN, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def _two_blocks() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(C_IN, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


MODELS = {"block": _block, "two_blocks": _two_blocks}


CASES = [
    pytest.param(
        method,
        model,
        folded,
        id=f"{method}-{model}-{'folded' if folded else 'unfolded'}",
    )
    for method in smallbn.available_norms()
    for model in MODELS
    for folded in (False, True)
]


@pytest.fixture(autouse=True)
def _default_finite_check() -> Iterator[None]:
    old = smallbn.set_finite_check("auto")
    yield
    smallbn.set_finite_check(old)


def _inputs(seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, C_IN, SIZE, SIZE, generator=generator) * 2 + 0.5


def _eval_model(method: str, model: str, folded: bool) -> nn.Module:
    """The converted model with random parameters (γ, β, SN's mixture logits...), running
    statistics from three training batches, in eval mode; folded if asked."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", smallbn.ConversionWarning)
        converted = smallbn.convert(MODELS[model](), method, **OPTIONS.get(method, {}))
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for step in range(3):
            converted(_inputs(100 + step))
    converted.eval()
    if not folded:
        return converted
    result, report = smallbn.fold_with_report(converted)
    if method in AFFINE_IN_EVAL:
        assert not report.kept, report.kept
        assert not any(smallbn.is_norm_layer(m) for m in result.modules())
    return result


def _onnx_run(model_bytes: bytes, x: Tensor) -> Tensor:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def _legacy_onnx(net: nn.Module, x: Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False)
    return buffer.getvalue()


@pytest.mark.parametrize("method,model,folded", CASES)
def test_eval_model_exports_and_runs_with_eager_outputs(
    method: str, model: str, folded: bool
) -> None:
    net = _eval_model(method, model, folded)
    traced, other = _inputs(0), _inputs(1)
    with torch.no_grad():
        expected = {"traced": net(traced), "other": net(other)}

    program = torch.export.export(net, (traced,))
    mutated = program.run_decompositions().graph_signature.buffers_to_mutate
    assert not mutated, f"the exported inference program mutates buffers: {mutated}"
    exported = program.module()
    for name, x in (("traced", traced), ("other", other)):
        torch.testing.assert_close(exported(x), expected[name], **EXPORT_TOL, msg=name)

    onnx_program = torch.onnx.export(net, (traced,), dynamo=True, verbose=False)
    assert onnx_program is not None
    model_bytes = onnx_program.model_proto.SerializeToString()
    for name, x in (("traced", traced), ("other", other)):
        got = _onnx_run(model_bytes, x)
        torch.testing.assert_close(got, expected[name], rtol=0, atol=ONNX_ATOL, msg=name)

    legacy = _legacy_onnx(net, traced)
    for name, x in (("traced", traced), ("other", other)):
        got = _onnx_run(legacy, x)
        torch.testing.assert_close(got, expected[name], rtol=0, atol=ONNX_ATOL, msg=name)


@pytest.mark.parametrize(
    "method",
    smallbn.available_norms(),
)
def test_eval_model_exports_with_the_strict_finite_check(method: str) -> None:
    """``set_finite_check("step")`` reads the host in eager eval steps of SN and GN/LN/IN;
    exports leave the check out instead of failing (or baking a branch into a trace)."""
    old = smallbn.set_finite_check("step")
    try:
        net = _eval_model(method, "block", folded=False)
        x = _inputs(1)
        with torch.no_grad():
            expected = net(x)
        program = torch.export.export(net, (_inputs(0),), strict=True)
        torch.testing.assert_close(program.module()(x), expected, **EXPORT_TOL)
        program = torch.export.export(net, (_inputs(0),))
        torch.testing.assert_close(program.module()(x), expected, **EXPORT_TOL)
        got = _onnx_run(_legacy_onnx(net, _inputs(0)), x)
        torch.testing.assert_close(got, expected, rtol=0, atol=ONNX_ATOL)
    finally:
        smallbn.set_finite_check(old)
