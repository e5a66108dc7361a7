"""Layers whose backward is written out to first order refuse a second derivative with a clear
error (instead of gradients that silently lack the second-order terms); torch's BN and the
layers built from differentiable torch ops support it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from smallbn import build_norm
from smallbn.convert import bind_producers

FIRST_ORDER: list[tuple[str, dict[str, Any]]] = [
    ("ghostbn", {"group_size": 2}),
    ("brn", {"norm_batch_size": 2}),
    ("sn", {}),
    ("domainbn", {"num_domains": 1}),
    ("cbn", {"window": 2, "burnin": 0}),
    ("cbn", {"window": 2, "burnin": 0, "norm_batch_size": 2}),
]


def _penalty_grad(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    return grad


@pytest.mark.parametrize("name,options", FIRST_ORDER, ids=[f"{n}-{len(o)}" for n, o in FIRST_ORDER])
def test_first_order_layers_refuse_create_graph(name: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), build_norm(name, 3, **options)).double()
    bind_producers(block)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    block(x).sum().backward()  # a first training step (CBN: fills its window)
    with pytest.raises(RuntimeError, match="differentiable once"):
        _penalty_grad(block, x)


def test_torch_bn_keeps_its_second_derivative() -> None:
    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), build_norm("bn", 3)).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    _penalty_grad(block, x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
