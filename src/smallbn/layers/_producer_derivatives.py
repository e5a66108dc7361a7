"""The derivatives of a producer's output statistics with respect to its weights, for
Cross-Iteration BN's Taylor compensation (Yao et al., CVPR 2021, §3.3; docs/methods.md,
"Cross-Iteration BN"): the math, apart from the layer (as torch keeps its kernels in
``nn/modules/_functions.py``).

For a conv ``x_j = ⟨W_j, u⟩ + b_j`` over input patches u (a linear layer: u is the input row),
per output channel j over the reduction set R = (N, *spatial), |R| = M:

    ∂μ_j/∂W_j = E_R[u]                 the mean patch, the same for every j of a group,
    ∂ν_j/∂W_j = (2/M) Σ_R x_j u         the conv weight gradient for output gradient 2x/M,
    ∂μ_j/∂b_j = 1,   ∂ν_j/∂b_j = 2μ_j,  and ∂σ² = ∂ν − 2μ ∂μ (so ∂σ²_j/∂b_j = 0).

The variance derivative costs one weight-gradient convolution per step (output gradient x
itself: no extra pass over x; ``− 2μ ∂μ`` is applied to the small result).  The mean patch
is a box sum of the batch-summed input, separable per spatial dim (one 0/1 matrix per dim:
exact for any stride, padding, dilation and groups), about the cost of one pass over u.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "CONVS",
    "PRODUCERS",
    "Producer",
    "as_groups",
    "group_derivatives",
    "plain_class",
    "plain_forward",
    "producer_derivatives",
]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The producer types whose statistics' derivatives this module writes out.
PRODUCERS = (*CONVS, nn.Linear)


def plain_class(producer: nn.Module) -> type[nn.Module]:
    """The torch class among :data:`PRODUCERS` that ``producer`` is an instance of."""
    return next(cls for cls in PRODUCERS if isinstance(producer, cls))


def plain_forward(producer: nn.Module) -> Any:
    """The forward a producer must have for the derivatives to hold: its torch class's
    (subclasses that only add state, like smallbn's CenteredConv, override it and are
    refused too: their weight is transformed before the conv)."""
    return plain_class(producer).forward


Producer = _ConvNd | nn.Linear


@functools.lru_cache(maxsize=256)
def patch_selection(
    size: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``S[k, i] = 1`` when input index i is read by kernel tap k at some output position of a
    1-D convolution (``i = o·stride + k·dilation − padding``, inside the input); ``(K, size)``.

    The patch sum over all output positions is the product of these matrices over the spatial
    dims applied to the batch-summed input: the conv's read pattern is separable.
    """
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    taps = torch.arange(kernel).unsqueeze(1) * dilation
    pos = taps + torch.arange(max(out, 0)).unsqueeze(0) * stride - padding  # (K, out)
    pos = torch.where((pos >= 0) & (pos < size), pos, size)  # out of range → a dropped column
    selection = torch.zeros(kernel, size + 1, dtype=dtype)
    selection.scatter_(1, pos, 1.0)  # distinct positions per tap: stride >= 1
    return selection[:, :size].to(device)


def conv_geometry(conv: _ConvNd, u: Tensor) -> tuple[Tensor, list[int]]:
    """The conv's input with any padding that ``F.conv*`` does not do itself applied
    (padding modes other than zeros, string padding), and the remaining symmetric padding."""
    dims = u.dim() - 2
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        u = nn.functional.pad(u, conv._reversed_padding_repeated_twice, mode=mode)
        return u, [0] * dims
    return u, list(padding)  # type: ignore[arg-type]


def patch_sums(summed: Tensor, conv: _ConvNd, padding: list[int], dtype: torch.dtype) -> Tensor:
    """The sum over every output position of the conv's input patches, from the batch-summed
    (and explicitly padded) input ``(..., C_in, *spatial)``: ``(..., C_in, *kernel)``."""
    dims = len(padding)
    lead = summed.dim() - dims
    patch = summed
    for d in range(dims):
        axis = lead + d
        # Compiled, the matrices are built in the graph (dynamo cannot use the host cache).
        build = patch_selection.__wrapped__ if torch.compiler.is_compiling() else patch_selection
        selection = build(
            patch.shape[axis],
            conv.kernel_size[d],
            conv.stride[d],
            padding[d],
            conv.dilation[d],
            patch.device,
            dtype,
        )
        patch = (patch.movedim(axis, -1) @ selection.t()).movedim(-1, axis)
    return patch


def conv_weight_grad(
    producer: _ConvNd, grad_out: Tensor, u: Tensor, weight: Tensor, padding: list[int], groups: int
) -> Tensor:
    """``Σ grad_out ⊗ patches(u)``: the weight gradient of ``producer``'s convolution geometry
    (stride, dilation, the given padding and groups) for output gradient ``grad_out``."""
    return torch.ops.aten.convolution_backward.default(
        grad_out,
        u,
        weight,
        None,
        list(producer.stride),
        padding,
        list(producer.dilation),
        False,
        [0] * (u.dim() - 2),
        groups,
        [False, True, False],
    )[1]


def producer_derivatives(
    producer: Producer,
    u: Tensor,
    x: Tensor,
    mean: Tensor,
    count: Tensor | float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """This process's share of ``(∂μ/∂W, ∂σ²/∂W)`` of the statistics of ``x = producer(u)``
    over a reduction set of ``count`` values (pooled over processes: the shares sum up).

    Shapes ``(groups, C_in/groups·K)`` and ``(C_out, C_in/groups·K)``, dtype ``dtype``.
    ``mean`` is the (pooled) batch mean of x.  ``count`` is a host number where the caller
    knows it (this process's own batch: from the shape), a tensor where it was pooled across
    processes: reading a tensor's value here would be a host read in every step.
    """
    weight = producer.weight
    channels = weight.shape[0]
    if x.shape[0] == 0:  # an empty rank contributes nothing (and conv kernels reject N = 0)
        groups = producer.groups if isinstance(producer, _ConvNd) else 1
        per_channel = weight[0].numel()
        return x.new_zeros((groups, per_channel), dtype=dtype), x.new_zeros(
            (channels, per_channel), dtype=dtype
        )
    u, xs = u.detach().to(dtype), x.detach().to(dtype)
    total: Tensor | float = count.to(dtype) if isinstance(count, Tensor) else float(count)
    if isinstance(producer, nn.Linear):
        mean_grad = u.sum(0, keepdim=True) / total
        second_grad = xs.t() @ u  # M/2 · ∂ν/∂W
    else:
        assert isinstance(producer, CONVS)
        u, padding = conv_geometry(producer, u)
        # M/2 · ∂ν/∂W = Σ_R x u: the conv weight gradient for output gradient x.
        second_grad = conv_weight_grad(
            producer, xs, u, weight.detach().to(dtype), padding, producer.groups
        )
        # (C_in, *spatial): ∂μ/∂W sums the same patches for every sample
        patch = patch_sums(u.sum(0), producer, padding, dtype)
        mean_grad = patch.reshape(producer.groups, -1) / total
    # ∂σ²/∂W = ∂ν/∂W − 2μ ∂μ/∂W, formed in place on the (C_out, C_in/groups·K) result rather
    # than with output gradient 2(x − μ)/M, which would cost one more pass over x.
    groups, per_channel = mean_grad.shape
    var_grad = second_grad.reshape(channels, per_channel)
    if isinstance(total, Tensor):
        var_grad.mul_(2.0 / total)
    factor = 2.0 / total if isinstance(total, float) else 1.0
    var_grad.view(groups, channels // groups, per_channel).baddbmm_(
        mean.to(dtype).view(groups, channels // groups, 1),
        mean_grad.unsqueeze(1),
        beta=factor,
        alpha=-2.0,
    )
    return mean_grad, var_grad


def group_derivatives(
    producer: Producer, u: Tensor, x: Tensor, mean: Tensor, count: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """:func:`producer_derivatives` of ``G`` groups at once: this process's share of each
    group's ``(∂μ/∂W, ∂σ²/∂W)``, shapes ``(G, groups, C_in/groups·K)`` and
    ``(G, C_out, C_in/groups·K)``.

    ``u`` ``(G, b, C_in, *spatial)`` and ``x = producer(u)`` ``(G, b, C_out, *spatial')`` hold
    the groups' samples, zero rows filling groups of fewer than ``b`` (they add nothing to
    the sums); ``mean`` ``(G, C_out)`` and ``count`` ``(G,)`` are the groups' (pooled) means
    and value counts.  A conv's ``Σ_R x u`` of every group is one weight-gradient convolution:
    sample ``i`` of every group in batch row ``i``, the groups side by side as conv groups
    (``G·groups`` of them), so the batch sum runs within each group only.
    """
    weight = producer.weight
    num, size = u.shape[:2]
    channels = weight.shape[0]
    u, xs = u.detach().to(dtype), x.detach().to(dtype)
    total = count.to(dtype).view(num, 1, 1)
    if isinstance(producer, nn.Linear):
        mean_grad = u.sum(1, keepdim=True) / total  # (G, 1, C_in)
        second_grad = xs.transpose(1, 2) @ u  # (G, C_out, C_in): M/2 · ∂ν/∂W
    else:
        assert isinstance(producer, CONVS)
        flat, padding = conv_geometry(producer, u.flatten(0, 1))
        inputs = flat.view(num, size, *flat.shape[1:])  # (G, b, C_in, *padded spatial)
        second_grad = conv_weight_grad(
            producer,
            xs.transpose(0, 1).flatten(1, 2),  # (b, G·C_out, *spatial'): the groups as channels
            inputs.transpose(0, 1).flatten(1, 2),
            weight.detach().to(dtype).repeat(num, *([1] * (weight.dim() - 1))),
            padding,
            num * producer.groups,
        )
        patch = patch_sums(inputs.sum(1), producer, padding, dtype)  # (G, C_in, *kernel)
        mean_grad = patch.reshape(num, producer.groups, -1) / total
    groups, per_channel = mean_grad.shape[1:]
    # ∂σ²/∂W = (2/M) Σ_R x u − 2μ ∂μ/∂W, per conv group of output channels.
    blocks = (num * groups, channels // groups)
    scale = (2.0 / total).repeat_interleave(groups, 0)  # (G·groups, 1, 1)
    var_grad = second_grad.reshape(*blocks, per_channel) * scale
    var_grad.baddbmm_(
        mean.to(dtype).reshape(*blocks, 1),
        mean_grad.reshape(num * groups, 1, per_channel),
        alpha=-2.0,
    )
    return mean_grad, var_grad.reshape(num, channels, per_channel)


def as_groups(rows: Tensor, start: int, lead: int, num: int, size: int) -> Tensor:
    """``rows[start:]`` laid out as ``(num, size, ...)`` after ``lead`` zero rows, zero rows
    filling the end (the groups' samples this process holds, at their places)."""
    part, shape = rows[start:], rows.shape[1:]
    tail = num * size - lead - part.shape[0]
    if lead or tail:
        part = torch.cat([part.new_zeros(lead, *shape), part, part.new_zeros(tail, *shape)])
    return part.reshape(num, size, *shape)
