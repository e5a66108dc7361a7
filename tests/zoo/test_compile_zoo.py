"""No graph break of smallbn's making in the training step of a converted zoo model (issue 23).

For each registered method, torchvision's resnet18 (random weights, ``_architectures.py``)
is converted, takes two eager training steps (so that lazily filled state, e.g. CBN's
window, is in place), then ``torch._dynamo.explain`` traces its training loss: every graph
break it reports must come from outside smallbn (none do today: the whole step is one graph).
A custom autograd Function whose backward dynamo cannot trace breaks the graph at its
``apply`` (dynamo traces the backward there), so the backward is covered as well.

``explain`` traces without compiling (a full inductor compile of resnet18 takes minutes on
a 2-core CPU; tests/test_compile.py compiles small blocks of every method, fullgraph, in
every run): 2-17 s per method, 5-26 s with building the model and its eager steps, about
2.5 min for every method on resnet18.  So ``make test`` (``--zoo=ci``) traces resnet18 with
SN alone (the per-sample statistics path: instance moments, the mixture, the custom
normalization Function, the running statistics); ``--zoo=all`` every method, on resnet18 and
on timm's mobilenetv3_small_050, whose ``BatchNormAct2d`` layers become smallbn's
norm-with-activation classes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _architectures import ARCHITECTURES

import smallbn

pytestmark = [
    pytest.mark.zoo,
    pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning"),
]

#: As in test_zoo.py (Ghost BN per sample), with CBN's window and MABN past their warm-ups.
OPTIONS: dict[str, dict[str, Any]] = {
    "ghostbn": {"group_size": 1},
    "brn": {"warmup_steps": 0},
    "cbn": {"window": 3, "burnin": 0},
    "mabn": {"window": 2, "warmup": 0},
}

#: Architectures traced (all with ``--zoo=all``), and what ``make test`` (``--zoo=ci``) traces.
EXPLAINED = ("tv_resnet18", "timm_mobilenetv3_small_050")
CI = {("tv_resnet18", "sn")}

_SMALLBN = str(Path(smallbn.__file__).resolve().parent)

CASES = [
    pytest.param(
        arch,
        method,
        id=f"{arch}-{method}",
    )
    for arch in EXPLAINED
    for method in smallbn.available_norms()
]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _in_smallbn(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_SMALLBN)


@pytest.mark.parametrize("explained_arch,method", CASES)
def test_training_step_has_no_graph_break_in_smallbn(
    explained_arch: str,
    method: str,
    request: pytest.FixtureRequest,
    record_property: Any,
) -> None:
    if (explained_arch, method) not in CI and request.config.getoption("--zoo") != "all":
        pytest.skip("runs with --zoo=all (make test-zoo)")
    architecture = ARCHITECTURES[explained_arch]
    model = smallbn.convert(architecture.build(), method, **OPTIONS.get(method, {}))
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = architecture.task.batch(2, generator)
        architecture.task.loss(model, x, y).backward()
    x, y = architecture.task.batch(2, generator)

    def step(x: Any, y: Any) -> torch.Tensor:
        return architecture.task.loss(model, x, y)

    start = time.perf_counter()
    explained = torch._dynamo.explain(step)(x, y)
    record_property("explain_s", round(time.perf_counter() - start, 1))
    ours = [
        (str(b.reason).splitlines()[0], [f"{f.filename}:{f.lineno}" for f in b.user_stack])
        for b in explained.break_reasons
        if any(_in_smallbn(f.filename) for f in b.user_stack)
    ]
    assert not ours, f"{method}: graph breaks in smallbn: {ours}"
    if explained.graph_break_count == 0:
        assert explained.graph_count == 1
