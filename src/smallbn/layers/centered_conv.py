"""Convolutions with weight centralization, the companion of Moving Average Batch Normalization
(Yan, Wan, Zhang, Zhang, Wei & Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization", ICLR 2020).

In every forward pass each output channel's kernel is centred over its input channels and
kernel positions before the convolution:

    W'_j = W_j − mean(W_j),   mean over the (C_in/groups, *kernel) entries of output channel j,
    y = conv(x, W') + b.

MABN normalizes by ``sqrt(E[x²])`` without subtracting a mean.  With centred kernels
``E[y_j] = Σ_k W'_jk E[x_k]`` vanishes whenever the inputs share one mean across channels and
kernel positions (``Σ_k W'_jk = 0``), and stays small when their means are similar (as after a
ReLU), so that ``E[y²]`` stays close to the variance.

The centring is part of the graph: gradients flow to ``W`` through it (``∂L/∂W_j = g_j −
mean(g_j)``, the projection of the plain gradient onto zero-mean kernels).

The stored ``weight`` is the raw ``W``; ``centered_weight()`` gives ``W'`` and ``to_plain()`` a
plain ``nn.Conv{1,2,3}d`` with ``W'`` baked in (for export and for folding a following norm
into it).  ``CenteredConv2d.from_conv(conv)`` (and :func:`centered_conv_from`) wraps an
existing convolution keeping its ``Parameter`` objects, so an optimizer built earlier keeps
working.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch
import torch.fx
from torch import Tensor, nn

__all__ = [
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "centered_conv_from",
    "centered_weight",
]

_T = TypeVar("_T", bound="_CenteredMixin")


class _Center(torch.autograd.Function):
    """``P(W) = W − mean(W)`` per output channel.  ``P`` is a symmetric projection, so the
    backward is ``P`` of the gradient: one reduction and one subtraction each way (autograd
    of the two-op expression takes about four times as long on CPU for a 256×256×3×3 kernel,
    comparable to the extra cost over a plain convolution that remains)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:  # type: ignore[override]
        return _project(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _project(grad)


def _project(t: Tensor) -> Tensor:
    rows = t.reshape(t.shape[0], -1)
    return (rows - rows.mean(1, keepdim=True)).view(t.shape)


def centered_weight(weight: Tensor) -> Tensor:
    """``W − mean(W)`` per output channel (dim 0), over every other dim; differentiable
    (gradient ``g − mean(g)`` per output channel)."""
    return _Center.apply(weight)


# A leaf for torch.fx: models with centred convolutions stay traceable (graph.trace_producers,
# fold), the call recorded as one node instead of being traced into.
torch.fx.wrap("centered_weight")


class _CenteredMixin:
    """Weight centralization for ``nn.Conv{1,2,3}d`` (the plain class is ``_plain``)."""

    _plain: ClassVar[type[nn.Module]]
    weight: Tensor
    bias: Tensor | None

    def centered_weight(self) -> Tensor:
        """The kernel the forward convolves with: ``W_j − mean(W_j)`` for every output channel."""
        return centered_weight(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.centered_weight(), self.bias)  # type: ignore[attr-defined]

    @classmethod
    def from_conv(cls: type[_T], conv: nn.Module) -> _T:
        """A centred convolution with ``conv``'s configuration that holds ``conv``'s own
        ``weight``/``bias`` Parameters (not copies) and its training mode.  Forward hooks of
        ``conv`` do not carry over."""
        if type(conv) is not cls._plain:
            raise TypeError(
                f"{cls.__name__}.from_conv: expected a {cls._plain.__name__}, got "
                f"{type(conv).__name__}"
            )
        source: nn.Conv1d = conv  # type: ignore[assignment]  # any of Conv1d/2d/3d
        # Built on the meta device: the throw-away initial weight costs no memory or time.
        new = cls(  # type: ignore[call-arg]
            source.in_channels,
            source.out_channels,
            source.kernel_size,
            stride=source.stride,
            padding=source.padding,
            dilation=source.dilation,
            groups=source.groups,
            bias=source.bias is not None,
            padding_mode=source.padding_mode,
            device="meta",
        )
        module: nn.Module = new  # type: ignore[assignment]
        # setattr registers the given Parameter objects (None for a conv without bias).
        setattr(module, "weight", source.weight)  # noqa: B010
        setattr(module, "bias", source.bias)  # noqa: B010
        module.train(source.training)
        return new

    @torch.no_grad()
    def to_plain(self) -> nn.Module:
        """A plain convolution computing the same function: the centred weight baked into a new
        ``weight`` Parameter (same dtype/device), the bias Parameter shared."""
        module: nn.Conv1d = self  # type: ignore[assignment]
        plain: nn.Conv1d = self._plain(  # type: ignore[assignment]
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
        )
        plain.weight = nn.Parameter(
            self.centered_weight().detach().clone(), requires_grad=module.weight.requires_grad
        )
        plain.bias = module.bias
        plain.train(module.training)
        return plain


class CenteredConv1d(_CenteredMixin, nn.Conv1d):
    """``nn.Conv1d`` whose kernel is centred per output channel in every forward (MABN's
    weight centralization); same constructor arguments."""

    _plain = nn.Conv1d


class CenteredConv2d(_CenteredMixin, nn.Conv2d):
    """``nn.Conv2d`` whose kernel is centred per output channel in every forward (MABN's
    weight centralization); same constructor arguments."""

    _plain = nn.Conv2d


class CenteredConv3d(_CenteredMixin, nn.Conv3d):
    """``nn.Conv3d`` whose kernel is centred per output channel in every forward (MABN's
    weight centralization); same constructor arguments."""

    _plain = nn.Conv3d


_CENTERED: dict[type[nn.Module], type[_CenteredMixin]] = {
    nn.Conv1d: CenteredConv1d,
    nn.Conv2d: CenteredConv2d,
    nn.Conv3d: CenteredConv3d,
}


def centered_conv_from(module: nn.Module) -> nn.Module | None:
    """The centred counterpart of a plain ``nn.Conv{1,2,3}d`` (exact type, sharing its
    Parameters), or ``None`` for any other module (a subclass may transform its weight in
    ``forward``, which wrapping would bypass)."""
    target = _CENTERED.get(type(module))
    if target is None:
        return None
    return target.from_conv(module)  # type: ignore[return-value]
