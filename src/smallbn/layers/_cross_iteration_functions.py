"""Cross-Iteration BN's normalization with pooled window statistics, as autograd Functions
(Yao et al., CVPR 2021, Eqs. 7–10; docs/methods.md, "Cross-Iteration BN"): the kernels, apart
from the layer (as torch's ``nn/modules/_functions.py`` and timm's ``layers/fast_norm.py``).

With the current iteration's moments ``(μ, σ²)`` (differentiable) and the compensated stored
entries ``(μ_τ, σ²_τ)`` (constants), each iteration weighing the same:

    μ̄ = mean_τ μ_τ,   σ̄² = mean_τ max(σ²_τ, 0) + mean_τ (μ_τ − μ̄)²   (the max rule),
    y = γ (x − μ̄) / sqrt(σ̄² + eps) + β      (or ``/(sqrt(σ̄²) + eps)``, the release's),

gradients flowing through the current ``(μ, σ²)`` only.  :class:`WindowNorm` normalizes one
iteration, :class:`GroupedWindowNorm` ``G`` groups of samples as ``G`` iterations; both write
their backward out (about BN's cost).  Synchronized layers instead use :func:`pool` and
:func:`pool_groups` under autograd (the moments come through an all-gather).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smallbn.stats import (
    affine_from_moments,
    apply_affine,
    apply_channel_affine,
    channel_view,
    first_order_only,
    sample_grad_sums,
    scale_shift,
)

__all__ = [
    "GroupedWindowNorm",
    "WindowNorm",
    "inverse_std",
    "pool",
    "pool_groups",
]


def pool(
    mean: Tensor,
    var: Tensor,
    past_mean: Tensor,
    past_var: Tensor,
    drop: bool,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(μ̄, σ̄², n)``: the window's mean and variance from the current batch's ``(mean, var)``
    (differentiable) and the compensated stored entries ``(past, C)``, each iteration weighing
    the same (paper, Eq. 9); ``n`` is the number of entries pooled per channel.

    Max rule: ``ν̄ = mean max(ν, μ²)``, i.e. ``σ̄² = mean max(σ², 0) + mean (μ − μ̄)²`` (the
    current ``σ²`` is >= 0 by construction).  Drop rule: entries with a negative compensated
    ``σ²`` are left out; the current batch always stays, so ``n >= 1``.

    ``valid`` ``(past,)`` (bool, on the device) pools only the entries where it is true: the
    compiled step gathers every slot and masks those its schedule does not pool, so that
    its graph does not depend on the window's fill (:func:`pool_groups` of one group).
    """
    if valid is not None:
        pooled, variance, count = pool_groups(
            mean.unsqueeze(0),
            var.unsqueeze(0),
            past_mean.unsqueeze(0),
            past_var.unsqueeze(0),
            valid.unsqueeze(0),
            drop,
        )
        return pooled.squeeze(0), variance.squeeze(0), count.squeeze(0)
    dtype = mean.dtype
    past_mean, past_var = past_mean.to(dtype), past_var.to(dtype)
    means = torch.cat([mean.unsqueeze(0), past_mean])
    if not drop:
        variances = torch.cat([var.unsqueeze(0), past_var.clamp_min(0)])
        pooled = means.mean(0)
        count = torch.full_like(mean.detach(), float(means.shape[0]))
        return pooled, (variances + (means - pooled).square()).mean(0), count
    keep = torch.cat([torch.ones_like(var, dtype=torch.bool).unsqueeze(0), past_var >= 0])
    count = keep.sum(0).to(dtype)
    pooled = torch.where(keep, means, 0).sum(0) / count
    variances = torch.cat([var.unsqueeze(0), past_var])
    spread = torch.where(keep, variances + (means - pooled).square(), 0)
    return pooled, spread.sum(0) / count, count


def pool_groups(
    mean: Tensor, var: Tensor, past_mean: Tensor, past_var: Tensor, valid: Tensor, drop: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pool` of ``G`` windows at once: group g's current ``(mean, var)[g]`` (``(G, C)``,
    differentiable) with its stored entries ``past_*[g]`` (``(G, P, C)``) where ``valid[g]``
    (``(G, P)``).  Returns ``(μ̄, σ̄², n)``, each ``(G, C)``."""
    dtype = mean.dtype
    past_mean, past_var = past_mean.to(dtype), past_var.to(dtype)
    keep = valid.unsqueeze(-1)  # (G, P, 1)
    if drop:
        keep = keep & (past_var >= 0)
    else:
        past_var = past_var.clamp_min(0)
    count = (keep.sum(1) + 1).to(dtype).expand_as(mean)
    pooled = (mean + torch.where(keep, past_mean, 0).sum(1)) / count
    spread = torch.where(keep, past_var + (past_mean - pooled.unsqueeze(1)).square(), 0).sum(1)
    return pooled, (var + (mean - pooled).square() + spread) / count, count


def inverse_std(var: Tensor, eps: float, inside: bool) -> Tensor:
    """``1/sqrt(σ̄² + eps)`` (BN's) or ``1/(sqrt(σ̄²) + eps)`` (the authors' release)."""
    if inside:
        return torch.rsqrt(var + eps)
    # sqrt has an infinite slope at 0: a constant channel would turn 0 gradients into NaN.
    return 1.0 / (var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() + eps)


def moment_coefficients(
    mean: Tensor,
    weight: Tensor | None,
    pooled_mean: Tensor,
    pooled_var: Tensor,
    count: Tensor,
    inv_std: Tensor,
    scale: Tensor,
    centred: Tensor,
    total: Tensor,
    values: int | Tensor,
    inside: bool,
) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of the gradient through the batch moments, ``∂L/∂x = a·x + b + s γ g``, from
    ``D = centred = Σ g (x − μ̄)``, ``S = total = Σ g`` over the ``values`` (M) values of each
    moment (the formulas of :class:`WindowNorm`); every argument per channel, or per group
    and channel."""
    dtype = mean.dtype
    if inside:
        slope = -0.5 * inv_std.pow(3)
    else:
        root = pooled_var.clamp_min(torch.finfo(dtype).tiny).sqrt()
        slope = -0.5 * inv_std.square() / root
    gamma = scale / inv_std if weight is None else weight.to(dtype)
    grad_pooled_var = gamma * slope * centred
    grad_pooled_mean = -scale * total
    grad_mean = (grad_pooled_mean + 2.0 * (mean - pooled_mean) * grad_pooled_var) / count
    grad_var = grad_pooled_var / count
    a = grad_var * (2.0 / values)
    b = grad_mean / values - a * mean
    return a, b


class WindowNorm(torch.autograd.Function):
    """``y = γ (x − μ̄)·s(σ̄²) + β`` with ``(μ̄, σ̄², n) = pool(μ, σ², past, valid)``, where
    ``(μ, σ²)`` are x's own batch moments (given, computed without gradient) and ``past``
    constants (entries where ``valid`` is false, if given, are not pooled).

    The backward is written out so that it costs about BN's instead of autograd's separate
    passes for the normalization and the moments.  With ``D = Σ g (x − μ̄)`` and ``S = Σ g``
    per channel:

        ∂L/∂β = S,   ∂L/∂γ = s D,   ∂L/∂μ̄ = −γ s S,   ∂L/∂σ̄² = γ s′(σ̄²) D,
        ∂L/∂μ = (∂L/∂μ̄ + 2 (μ − μ̄) ∂L/∂σ̄²) / n,   ∂L/∂σ² = ∂L/∂σ̄² / n
            (∂μ̄/∂μ = 1/n, ∂σ̄²/∂σ² = 1/n, ∂σ̄²/∂μ = 2(μ − μ̄)/n from ``pool``),
        ∂L/∂x = γ s g + ∂L/∂μ / M + 2 ∂L/∂σ² (x − μ) / M
              = γ s g (1 − 1/n) + (1/n) γ s [g − S/M + 2 s′(σ̄²)/s · (x − μ̄) D/M],

    (μ cancels), and the bracket is BN's training backward with mean μ̄ and inverse standard
    deviation r where ``r² = −2 s′/s`` (``s = 1/sqrt(σ̄² + eps)``: r = s; eps outside the
    root: ``r² = s/sqrt(σ̄²)``), weight ``γ s/(n r)``.  So the backward is torch's fused BN
    backward kernel (one reduction and one elementwise pass, giving ``r D`` and S too) and one
    ``addcmul_`` for the ``(1 − 1/n)`` share.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        past_mean: Tensor,
        past_var: Tensor,
        valid: Tensor | None,
        eps: float,
        inside: bool,
        drop: bool,
    ) -> Tensor:
        pooled_mean, pooled_var, count = pool(mean, var, past_mean, past_var, drop, valid)
        inv_std = inverse_std(pooled_var, eps, inside)
        scale, shift = affine_from_moments(pooled_mean, inv_std, weight, bias)
        ctx.save_for_backward(x, weight, pooled_mean, pooled_var, count, inv_std, scale)
        ctx.inside = inside
        ctx.pools = past_mean.shape[0] > 0
        ctx.bias_dtype = None if bias is None else bias.dtype
        return apply_channel_affine(x, scale, shift)

    @staticmethod
    @first_order_only("Cross-Iteration BN")
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, pooled_mean, pooled_var, count, inv_std, scale = ctx.saved_tensors
        dtype = pooled_mean.dtype
        xs, grad = x.to(dtype), grad_y.to(dtype)
        if ctx.inside:
            kernel_inv_std = inv_std
        else:
            root = pooled_var.clamp_min(torch.finfo(dtype).tiny).sqrt()
            kernel_inv_std = (inv_std / root).sqrt()
        grad_x, kernel_centred, total = torch.ops.aten.native_batch_norm_backward.default(
            grad,
            xs,
            scale / (count * kernel_inv_std),
            None,
            None,
            pooled_mean,
            kernel_inv_std,
            True,
            0.0,
            [True, weight is not None, True],
        )
        if ctx.pools:  # n > 1 may hold somewhere (host-side: no device sync; 0 where n = 1)
            grad_x.addcmul_(grad, channel_view(scale * (1.0 - 1.0 / count), x))
        grad_weight = None
        if weight is not None:  # ∂L/∂γ = s D, from the kernel's r D
            grad_weight = (kernel_centred * (inv_std / kernel_inv_std)).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else total.to(ctx.bias_dtype)
        return grad_x.to(x.dtype), None, None, grad_weight, grad_bias, *([None] * 6)


class GroupedWindowNorm(torch.autograd.Function):
    """:class:`WindowNorm` of ``G`` groups of samples at once: sample n belongs to group
    ``index[n]``, which is normalized by :func:`pool_groups` of its own moments ``(mean,
    var)[g]`` (``(G, C)``, given without gradient, of ``count[g]`` values each) and its
    constant stored entries ``past_*[g]`` where ``valid[g]``.

    Same backward as :class:`WindowNorm` per group, with ``D_g = Σ g (x − μ̄_g)`` and
    ``S_g = Σ g`` over the group's values: :func:`~smallbn.stats.sample_grad_sums` gives them
    per sample in one pass, summed into groups on ``(N, C)`` tensors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        count: Tensor,
        index: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        past_mean: Tensor,
        past_var: Tensor,
        valid: Tensor,
        eps: float,
        inside: bool,
        drop: bool,
    ) -> Tensor:
        pooled_mean, pooled_var, pooled = pool_groups(mean, var, past_mean, past_var, valid, drop)
        inv_std = inverse_std(pooled_var, eps, inside)
        scale, shift = affine_from_moments(pooled_mean, inv_std, weight, bias)
        ctx.save_for_backward(
            x, mean, count, index, weight, pooled_mean, pooled_var, pooled, inv_std, scale
        )
        ctx.inside = inside
        ctx.bias_dtype = None if bias is None else bias.dtype
        return apply_affine(x, scale[index], shift[index])

    @staticmethod
    @first_order_only("Cross-Iteration BN")
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, count, index, weight, pooled_mean, pooled_var, pooled, inv_std, scale = (
            ctx.saved_tensors
        )
        dtype = mean.dtype
        xs, grad = x.to(dtype), grad_y.to(dtype)
        centred, total = sample_grad_sums(grad, xs, pooled_mean[index])
        centred = mean.new_zeros(mean.shape).index_add_(0, index, centred)
        total = mean.new_zeros(mean.shape).index_add_(0, index, total)
        a, b = moment_coefficients(
            mean, weight, pooled_mean, pooled_var, pooled, inv_std, scale, centred, total,
            count.to(dtype).unsqueeze(1), ctx.inside,
        )  # fmt: skip
        grad_x = scale_shift(xs, channel_view(a[index], x), channel_view(b[index], x))
        grad_x.addcmul_(grad, channel_view(scale[index], x))
        grad_weight = None if weight is None else (inv_std * centred).sum(0).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else total.sum(0).to(ctx.bias_dtype)
        return grad_x.to(x.dtype), *([None] * 4), grad_weight, grad_bias, *([None] * 6)
