"""Memory accounting counts what is really kept: known tensors, once per allocation, without
the input and the module's own state."""

from typing import Any

import torch
from torch import Tensor, nn

import smallbn
from smallbn.bench import conv_block, saved_bytes, state_bytes


class _ExpSquare(nn.Module):
    """``exp(x)²``: exp saves its result h, the product saves h twice (one allocation)."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.exp()
        return h * h


class _ScaleWithCtx(torch.autograd.Function):
    """Keeps a tensor as a plain ``ctx`` attribute (not through save_for_backward)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.kept = torch.full((7,), 2.0, dtype=torch.float64)
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad * 2


class _WithCtx(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _ScaleWithCtx.apply(x)


def test_saved_bytes_counts_each_allocation_once_and_not_the_input():
    x = torch.randn(3, 5, requires_grad=True)
    assert saved_bytes(_ExpSquare(), x) == 3 * 5 * 4
    assert x.grad is not None  # the backward ran, freeing the graph


def test_saved_bytes_sees_tensors_kept_on_ctx_attributes():
    x = torch.randn(4, requires_grad=True)
    assert saved_bytes(_WithCtx(), x) == 7 * 8


def test_bn_block_saves_the_conv_output_and_two_vectors():
    n, c, h, w = 2, 6, 5, 4
    block = conv_block(nn.BatchNorm2d(c), c).train()
    x = torch.randn(n, c, h, w, requires_grad=True)
    # conv: input and weight (excluded); BN: conv output, save_mean, save_invstd (its weight
    # and running statistics are state, excluded)
    assert saved_bytes(block, x) == 4 * (n * c * h * w + 2 * c)


def test_frozen_bn_keeps_no_activation_map():
    block = conv_block(smallbn.FrozenBatchNorm2d(6), 6)
    # y = z·a + b with a computed from the buffers: backward needs a (C values), not z
    assert saved_bytes(block, torch.randn(2, 6, 5, 5, requires_grad=True)) == 6 * 4


def test_state_bytes_of_bn_is_its_four_vectors_and_the_counter():
    c = 64
    assert state_bytes(nn.BatchNorm2d(c)) == 4 * (2 * c + 2 * c) + 8


def test_state_bytes_counts_attribute_tensors_but_not_referenced_modules():
    layer = nn.BatchNorm2d(8)
    layer.cache = {"window": torch.zeros(10, 8)}  # type: ignore[assignment]
    layer.__dict__["_other"] = nn.Linear(100, 100)  # referenced, not owned
    layer.alias = layer.weight.detach()  # type: ignore[assignment]  # same allocation
    assert state_bytes(layer) == 4 * (4 * 8) + 8 + 10 * 8 * 4


def test_cbn_state_holds_its_window_of_derivatives():
    c, k = 16, 4
    block = conv_block(smallbn.CrossIterationBatchNorm2d(c, window=k), c)
    smallbn.bind_producers(block)
    for _ in range(2):
        block(torch.randn(2, c, 6, 6)).sum().backward()
    bn_state = 4 * (4 * c) + 8
    # at least one variance derivative per window slot: the size of the conv weight
    assert state_bytes(block[1]) >= bn_state + k * c * c * 9 * 4
