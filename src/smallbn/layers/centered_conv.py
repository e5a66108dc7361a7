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
working.  Only a plain convolution whose ``weight`` is the Parameter it convolves with can be
wrapped: pruning, ``weight_norm`` and ``spectral_norm`` (forward pre-hooks that recompute
``weight`` from other Parameters) and parametrizations would be bypassed by the wrapper;
:func:`centering_obstacle` says why a module cannot be wrapped.

A kernel with a single entry per output channel (``C_in/groups × prod(kernel) = 1``, e.g. a
depthwise 1×1 convolution) centres to exactly zero, so such centred convolutions are refused.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "centered_conv_from",
    "centered_weight",
    "centering_obstacle",
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A one-entry kernel minus its mean is zero: the layer would output only its bias.
        reason = _degenerate_kernel(type(self).__name__, self.weight)
        if reason is not None:
            raise ValueError(
                f"{reason}. Use a plain {self._plain.__name__} here (and a norm that centres "
                f"its input, or none)."
            )

    def centered_weight(self) -> Tensor:
        """The kernel the forward convolves with: ``W_j − mean(W_j)`` for every output channel."""
        return centered_weight(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.centered_weight(), self.bias)  # type: ignore[attr-defined]

    @classmethod
    def from_conv(cls: type[_T], conv: nn.Module) -> _T:
        """A centred convolution with ``conv``'s configuration that holds ``conv``'s own
        ``weight``/``bias`` Parameters (not copies) and its training mode.  Forward hooks of
        ``conv`` do not carry over.

        Raises:
            TypeError: ``conv`` is not exactly ``cls._plain``, or its ``weight`` is not the
                Parameter it convolves with (pruning, ``weight_norm``, ``spectral_norm``:
                forward pre-hooks the wrapper would not run).
            ValueError: one kernel entry per output channel (centring would zero it).
        """
        if type(conv) is not cls._plain:
            raise TypeError(
                f"{cls.__name__}.from_conv: expected a {cls._plain.__name__}, got "
                f"{type(conv).__name__}"
            )
        source: nn.Conv1d = conv  # type: ignore[assignment]  # any of Conv1d/2d/3d
        reason = _hooked_weight(conv)
        if reason is not None:
            raise TypeError(
                f"{cls.__name__}.from_conv: cannot centre this convolution: {reason}. Remove "
                f"the reparametrization first (torch.nn.utils.prune.remove, "
                f"remove_weight_norm, remove_spectral_norm), or keep the plain convolution."
            )
        reason = _degenerate_kernel(type(conv).__name__, source.weight)
        if reason is not None:
            raise ValueError(
                f"{cls.__name__}.from_conv: cannot centre this convolution: {reason}. Keep "
                f"the plain convolution."
            )
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
    def to_plain(self, *, in_place: bool = False) -> nn.Module:
        """A plain convolution computing the same function: the centred weight baked into a new
        ``weight`` Parameter (same dtype/device), the bias Parameter shared.

        ``in_place=True`` writes the centred weight into this layer's own ``weight``
        Parameter and shares it, so that an optimizer built earlier keeps working (what
        :func:`smallbn.convert` does when the MABN this conv served is replaced).
        """
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
        if in_place:
            module.weight.copy_(self.centered_weight())
            plain.weight = module.weight
        else:
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


def _hooked_weight(conv: nn.Module) -> str | None:
    """Why ``conv.weight`` is not the Parameter the convolution uses, or ``None``."""
    name = type(conv).__name__
    if not isinstance(getattr(conv, "weight", None), nn.Parameter):
        return (
            f"{name}'s weight is not a Parameter but a tensor computed from other Parameters "
            f"by a forward pre-hook (as after torch.nn.utils.prune, weight_norm or "
            f"spectral_norm), which a weight-centred replacement would not run"
        )
    if conv._forward_pre_hooks:
        return (
            f"{name} has forward pre-hooks (such as pruning, weight_norm or spectral_norm, "
            f"which recompute its weight), which a weight-centred replacement would not run"
        )
    return None


def _degenerate_kernel(name: str, weight: Tensor) -> str | None:
    """Why centring ``weight`` would zero it (one entry per output channel), or ``None``."""
    if weight.dim() > 1 and math.prod(weight.shape[1:]) == 1:
        return (
            f"{name} has a single kernel entry per output channel (in_channels/groups × "
            f"kernel size = 1, e.g. a depthwise 1×1 convolution), which centring would make "
            f"exactly zero"
        )
    return None


def centering_obstacle(module: nn.Module) -> str | None:
    """Why ``module`` cannot be replaced by a weight-centred convolution sharing its
    Parameters (a clause whose subject is the module's type, for messages), or ``None``
    when it can: an ``nn.Conv{1,2,3}d`` of exactly that type, whose ``weight`` is a
    Parameter used as it is (no forward pre-hooks), with more than one kernel entry per
    output channel."""
    name = type(module).__name__
    if isinstance(module, _CenteredMixin):
        return f"{name} is already weight-centred"
    if type(module) not in _CENTERED:
        if not isinstance(module, tuple(_CENTERED)):
            return f"{name} has no weight-centred variant"
        if parametrize.is_parametrized(module):
            return (
                f"{name}'s weight is parametrized (torch.nn.utils.parametrize), which a "
                f"weight-centred replacement would bypass"
            )
        return (
            f"{name} is a subclass of a plain convolution and may transform its weight in "
            f"forward, which a weight-centred replacement would bypass"
        )
    weight: Tensor = module.weight  # type: ignore[assignment]  # a Parameter (checked first)
    return _hooked_weight(module) or _degenerate_kernel(name, weight)


def centered_conv_from(module: nn.Module) -> nn.Module | None:
    """The centred counterpart of a plain ``nn.Conv{1,2,3}d`` (exact type, sharing its
    Parameters), or ``None`` where :func:`centering_obstacle` gives a reason not to: any
    other module (a subclass may transform its weight in ``forward``, which wrapping would
    bypass), a pruned / ``weight_norm`` / ``spectral_norm`` convolution (its ``weight`` is
    recomputed by a forward pre-hook), or a one-entry kernel (centred, it would be zero)."""
    if centering_obstacle(module) is not None:
        return None
    return _CENTERED[type(module)].from_conv(module)  # type: ignore[return-value]
