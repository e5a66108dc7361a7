"""Domain-specific BN under ``torch.compile(fullgraph=True)``: a block whose forward takes a
domain id (an int, or a tensor of per-sample ids), compiled training steps and eval equal
eager ones, with no recompile once each domain value has been compiled (an int domain is a
Python constant of the graph: one graph per domain; a tensor of ids is data), with a shared
affine and with one per domain (``per_domain_affine=True``: the fused one-domain path and the
per-sample path index the domains' γ, β rows)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import smallbn
from smallbn import DomainBatchNorm2d

COMPILED_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    old = smallbn.set_finite_check("deferred")
    yield
    smallbn.set_finite_check(old)
    torch._dynamo.reset()


class _Block(nn.Module):
    """Conv2d + DomainBN + ReLU, converted from BN by smallbn.convert, taking the domain."""

    def __init__(self, per_domain_affine: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = smallbn.convert(plain, "domainbn", per_domain_affine=per_domain_affine)
        assert isinstance(self.body[1], DomainBatchNorm2d)

    def forward(self, x: Tensor, domain: int | Tensor) -> Tensor:
        conv, norm, act = self.body
        return act(norm(conv(x), domain))


def _assert_same_state(compiled: nn.Module, eager: nn.Module, what: str) -> None:
    for (name, a), (_, b) in zip(
        compiled.named_parameters(), eager.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, **COMPILED_TOL, msg=f"{name}, {what}")
        torch.testing.assert_close(a.grad, b.grad, **COMPILED_TOL, msg=f"{name}.grad, {what}")
    for (name, a), (_, b) in zip(compiled.named_buffers(), eager.named_buffers(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, **COMPILED_TOL, msg=f"{name}, {what}")
        else:
            assert torch.equal(a, b), f"{name}, {what}: {a} != {b}"


# Domains per step: each int domain and the ids tensor are compiled once (first two steps and
# step 2), the rest must reuse those graphs.
SCHEDULE: list[int | list[int]] = [0, 1, [0, 1, 1, 0], 1, 0, [1, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("per_domain_affine", [False, True], ids=["shared", "per_domain"])
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_training_and_eval_equal_eager(backend: str, per_domain_affine: bool) -> None:
    eager = _Block(per_domain_affine)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    gen = torch.Generator().manual_seed(1)
    for step, domains in enumerate(SCHEDULE):
        arg = domains if isinstance(domains, int) else torch.tensor(domains)
        x = torch.randn(4, 3, 6, 6, generator=gen) * (1 + step) + step
        with torch._dynamo.config.patch(error_on_recompile=step > 2):
            outputs = []
            for forward, optimizer in zip((compiled, eager), optimizers, strict=True):
                optimizer.zero_grad()
                y = forward(x, arg)
                y.square().mean().backward()
                outputs.append(y.detach())
        torch.testing.assert_close(*outputs, **COMPILED_TOL, msg=f"output, step {step}")
        _assert_same_state(model, eager, f"step {step}")
        for optimizer in optimizers:
            optimizer.step()
    assert int(model.body[1]._nonfinite_call) == -1  # nothing recorded by the deferred checks
    if per_domain_affine:  # the domains' rows (all BN's γ, β at first) trained apart
        weight = model.body[1].weight
        assert weight.shape == (2, 8) and not torch.allclose(weight[0], weight[1])
    model.eval()
    eager.eval()
    x = torch.randn(4, 3, 6, 6, generator=gen)
    with torch.no_grad():
        for arg in (0, 1, torch.tensor([1, 0, 0, 1])):  # each compiles its eval graph once
            torch.testing.assert_close(compiled(x, arg), eager(x, arg), **COMPILED_TOL)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for arg in (1, torch.tensor([0, 0, 1, 1]), 0):
                torch.testing.assert_close(compiled(x, arg), eager(x, arg), **COMPILED_TOL)


def test_compiled_step_defers_a_one_value_domain_to_check_finite() -> None:
    """In a compiled graph a check of the ids' values cannot raise (it would read them
    back): a domain with one value per channel is recorded on the device, and
    smallbn.check_finite reports it, naming the layer, the call and the cause."""
    block = _Block()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 1, 1)  # one value per sample and channel
    compiled(x, torch.tensor([0, 0, 1, 1])).sum().backward()
    smallbn.check_finite(block)  # every present domain has 2 values
    compiled(x, torch.tensor([0, 0, 0, 1])).sum().backward()
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm2d\(8\) at '[\w.]+': training call 2 of this layer had a domain "
        r"present in the batch with a single value per channel",
    ):
        smallbn.check_finite(block)
