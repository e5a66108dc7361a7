"""Per-channel moments: the statistics core that every smallbn layer and tool shares.

A :class:`Moments` holds, for each channel, the number of values it summarizes (``count``),
their mean ``μ = E[x]`` and their *biased* variance ``σ² = E[x²] − E[x]²``.  Every method
of the library is a different way of choosing which values to summarize and how to combine
summaries:

* BN / SyncBN: one summary over the reduction set ``R = (N, *spatial)`` (:func:`channel_moments`),
  merged across processes (:func:`all_gather_moments` + :func:`merge_moments`).
* Ghost BN, simulated small normalization batches: per-sample summaries
  (:func:`sample_moments`) merged by group index (:func:`sample_groups`: consecutive groups
  of ``b`` samples of the batch, or of the concatenation of all processes' batches).
* PreciseBN and cross-iteration pooling: summaries of several batches merged by count.
* Running averages: BN's exponential moving average (:func:`update_running_stats`), and
  several consecutive updates at once (:func:`ema_sequence`, one per group of a batch).

Merging uses the parallel-variance formula of Chan, Golub & LeVeque (1979),

    n = Σᵢ nᵢ,   μ = Σᵢ (nᵢ/n) μᵢ,   σ² = Σᵢ (nᵢ/n) (σᵢ² + (μᵢ − μ)²),

which, unlike accumulating ``Σx²``, does not cancel catastrophically when ``|μ| ≫ σ``.
Statistics of float16/bfloat16 inputs are accumulated in float32, float64 stays float64.
All functions are differentiable: gradients reach every input that contributed.

Why this module is long: it is the one core every layer shares (moments and their merging,
the normalization Functions, groups of samples and running averages), kept in one place so
that no layer writes its own copy (tests/test_code_shape.py checks that none does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from smallbn import _distributed

__all__ = [
    "Moments",
    "SampleGroups",
    "SampleNormalization",
    "affine_from_moments",
    "all_gather_moments",
    "apply_affine",
    "apply_channel_affine",
    "channel_moments",
    "detached_channel_moments",
    "channel_view",
    "ema_after",
    "ema_sequence",
    "exporting",
    "first_order_only",
    "fused_batch_norm",
    "group_sizes",
    "mean_var",
    "merge_equal_moments",
    "merge_moments",
    "normalize",
    "normalize_from_sample_moments",
    "normalize_with_population",
    "sample_grad_sums",
    "sample_groups",
    "sample_moments",
    "scale_shift",
    "stats_dtype",
    "update_running_stats",
]


@dataclass(frozen=True)
class Moments:
    """Per-channel summaries of a set of values.

    Shapes: ``count`` is ``(*batch)``; ``mean`` and ``var`` are ``(*batch, C)``, where the
    optional leading ``batch`` dims index independent summaries (samples, groups, processes,
    iterations).  ``var`` is biased (divided by ``count``).
    """

    count: Tensor
    mean: Tensor
    var: Tensor

    @property
    def second_moment(self) -> Tensor:
        """``E[x²] = σ² + μ²``."""
        return self.var + self.mean.square()

    def unbiased_var(self) -> Tensor:
        """Bessel-corrected variance ``σ² · n/(n−1)``, as BN's ``running_var`` tracks it.

        Where ``n ≤ 1`` the correction is undefined and the biased value is returned.
        """
        n = self.count.unsqueeze(-1)
        correction = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        return self.var * correction

    def detach(self) -> Moments:
        return Moments(self.count.detach(), self.mean.detach(), self.var.detach())

    def __getitem__(self, index: int | slice | Tensor) -> Moments:
        """Select summaries along the leading batch dim."""
        return Moments(self.count[index], self.mean[index], self.var[index])


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor, start: int) -> list[int]:
    return [0, *range(2, x.dim())] if start == 0 else list(range(2, x.dim()))


class _MeanVar(torch.autograd.Function):
    """Mean and biased variance of ``x`` over ``dims``, exact and fast on every device.

    Forward is two-pass (the mean, then the mean of squared deviations: exact where
    ``E[x²] − E[x]²`` would cancel, and on CPU several times faster than ``torch.var_mean``'s
    Welford kernel).  Backward needs no saved temporaries beyond ``x`` and is one fused pass:

        ∂L/∂x = ∂L/∂μ / M + 2 ∂L/∂σ² (x − μ) / M = a·x + b,
        a = 2 ∂L/∂σ² / M,   b = ∂L/∂μ / M − a μ.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square_().mean(dim=dims, keepdim=True)
        ctx.save_for_backward(x, mean)
        ctx.count = x.numel() // max(mean.numel(), 1)
        return mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_mean: Tensor | None, grad_var: Tensor | None
    ) -> tuple[Tensor, None]:
        x, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        if grad_var is None:
            return (grad_mean / ctx.count).expand_as(x).clone(), None
        a = grad_var * (2.0 / ctx.count)
        b = grad_mean / ctx.count - a * mean
        return scale_shift(x, a, b), None


def mean_var(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(mean, biased var)`` of ``x`` over ``dims`` (dims dropped), differentiable."""
    mean, var = _MeanVar.apply(x, tuple(dims))
    keep = [d for d in range(x.dim()) if d not in set(dims)]
    shape = [x.shape[d] for d in keep]
    return mean.reshape(shape), var.reshape(shape)


def channel_moments(x: Tensor) -> Moments:
    """Moments per channel over ``(N, *spatial)`` of ``x`` with shape ``(N, C, *spatial)``.

    Any memory format (channels_last included) is accepted.  An empty batch gives
    ``count = 0`` and zero mean/var that still carry a graph to ``x`` (so a rank with no
    samples takes part in a synchronized backward pass).
    """
    xs = x.to(stats_dtype(x.dtype))
    dims = _reduce_dims(x, 0)
    count = x.numel() // max(x.shape[1], 1)
    if count == 0:
        zeros = xs.sum(dim=dims)
        return Moments(xs.new_zeros(()), zeros, zeros)
    mean, var = mean_var(xs, dims)
    return Moments(xs.new_full((), float(count)), mean, var)


def detached_channel_moments(x: Tensor) -> Moments:
    """:func:`channel_moments` without gradient, from torch's BN statistics kernel.

    For float32/float64 inputs with at least one value per channel, one fused call (torch
    BN's own statistics, any memory format) replaces the four tensor operations and the
    autograd node of :func:`channel_moments`; other inputs go through
    :func:`channel_moments` on the detached input.  Contiguous inputs are as exact as
    :func:`channel_moments`; channels-last ones as exact as torch BN's channels-last kernel,
    whose mean is a few float32 ulps less exact at large offsets (|μ|/σ ≈ 10⁴: about 1e-7
    relative, against 7e-8; tests/test_stats.py checks 1e-6).
    """
    count = x.numel() // max(x.shape[1], 1) if x.dim() > 1 else 0
    if count == 0 or x.dtype not in (torch.float32, torch.float64):
        return channel_moments(x.detach())
    mean, var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
    return Moments(mean.new_full((), float(count)), mean, var)


def sample_moments(x: Tensor) -> Moments:
    """Moments per sample and channel over ``*spatial``: ``mean``/``var`` of shape ``(N, C)``.

    These are instance-norm statistics; merged by group they give Ghost-BN statistics,
    merged over the batch they give BN statistics.  For inputs without spatial dims each
    sample's mean is the value itself and its variance zero.
    """
    xs = x.to(stats_dtype(x.dtype))
    n = x.shape[0]
    if x.dim() == 2:
        return Moments(xs.new_ones(n), xs, torch.zeros_like(xs))
    per_sample = x[0, 0].numel() if n > 0 and x.shape[1] > 0 else 0
    if per_sample == 0:
        zeros = xs.sum(dim=_reduce_dims(x, 2))
        return Moments(xs.new_zeros(n), zeros, zeros)
    mean, var = mean_var(xs, _reduce_dims(x, 2))
    return Moments(xs.new_full((n,), float(per_sample)), mean, var)


def merge_moments(
    moments: Moments, index: Tensor | None = None, num_groups: int | None = None
) -> Moments:
    """Merge summaries along the leading dim, weighted by count (Chan et al.'s formula).

    Without ``index`` all summaries along dim 0 are merged into one (the leading dim is
    dropped).  With ``index`` (shape ``(S,)``, values in ``[0, num_groups)``) summaries are
    merged per group and the result has leading dim ``num_groups``.  A group whose total
    count is 0 gets zero mean and variance.
    """
    squeeze = index is None
    if index is None:
        index = torch.zeros(moments.count.shape[0], dtype=torch.long, device=moments.count.device)
        num_groups = 1
    elif num_groups is None:
        raise ValueError("merge_moments: num_groups is required together with index")
    count, mean, var = moments.count, moments.mean, moments.var
    total = count.new_zeros((num_groups, *count.shape[1:])).index_add(0, index, count)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    weight = (count / safe_total[index]).unsqueeze(-1)
    merged_mean = mean.new_zeros((num_groups, *mean.shape[1:])).index_add(0, index, weight * mean)
    deviation = mean - merged_mean[index]
    merged_var = var.new_zeros((num_groups, *var.shape[1:])).index_add(
        0, index, weight * (var + deviation.square())
    )
    if squeeze:
        return Moments(total[0], merged_mean[0], merged_var[0])
    return Moments(total, merged_mean, merged_var)


def merge_equal_moments(mean: Tensor, var: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """:func:`merge_moments` of summaries that all count the same number of values, along
    ``dim`` (kept, size 1): ``μ = mean_i μᵢ``, ``σ² = mean_i σᵢ² + mean_i (μᵢ − μ)²``.

    Five small ops instead of the general merge's index arithmetic: Switchable Norm's layer
    and batch branches run it in every forward."""
    pooled = mean.mean(dim, keepdim=True)
    spread = (mean - pooled).square().mean(dim, keepdim=True)
    return pooled, var.mean(dim, keepdim=True) + spread


def all_gather_moments(moments: Moments, group: _distributed.ProcessGroup | None) -> Moments:
    """Stack every process's ``moments`` along a new leading dim (rank order), with autograd.

    All ranks must pass summaries of the same shape; a rank without samples passes
    ``count = 0``.  The backward pass sums each rank's gradient into the rank that produced
    the summary, so gradients reach every rank's input.  Works on every backend (gloo, NCCL).
    """
    packed = torch.cat([moments.count.unsqueeze(-1), moments.mean, moments.var], dim=-1)
    gathered = _distributed.all_gather_with_grad(packed, group)
    channels = moments.mean.shape[-1]
    # Counts are constants: detached, so reading them (``float(count)``) does not warn.
    count = gathered[..., 0].detach()
    mean, var = gathered[..., 1 : 1 + channels], gathered[..., 1 + channels :]
    return Moments(count, mean, var)


def channel_view(stat: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(C,)`` or ``(N, C)`` statistic to broadcast against ``(N, C, *spatial)``."""
    lead = (1, stat.shape[0]) if stat.dim() == 1 else tuple(stat.shape)
    return stat.reshape(*lead, *([1] * (x.dim() - 2)))


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x·scale + shift`` with statistics broadcast against x, as a product and an in-place
    sum: torch's out-of-place ``addcmul`` with a broadcast addend runs about 3× slower on
    CPU than these two passes (torch 2.13; the in-place ``addcmul_`` is fast)."""
    return torch.mul(x, scale).add_(shift)


def affine_from_moments(
    mean: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``γ (x − μ)·s + β = a·x + b``: ``a = γ s``, ``b = β − μ a``, where
    ``s = inv_std`` (``1/sqrt(σ² + eps)``, or any other scale, e.g. CBN's eps-outside one);
    γ and β are cast to the statistics' dtype."""
    scale = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def apply_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale·x + shift`` with per-channel ``(C,)`` or per-sample ``(N, C)`` coefficients, in
    one product and one in-place sum; half-precision inputs are computed in float32 and
    rounded once at the end."""
    compute = x if x.dtype in (torch.float32, torch.float64) else x.to(stats_dtype(x.dtype))
    y = scale_shift(
        compute, channel_view(scale, x).to(compute.dtype), channel_view(shift, x).to(compute.dtype)
    )
    return y.to(x.dtype)


def apply_channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """:func:`apply_affine` with per-channel ``(C,)`` coefficients, in one pass for
    float32/float64 inputs: torch's inference BN kernel with mean 0, variance 1 and eps 0
    computes ``x·scale + shift`` (its ``1/sqrt(1 + 0)`` is 1), where the product and the
    in-place sum of :func:`scale_shift` take two passes."""
    if x.dtype not in (torch.float32, torch.float64) or scale.dim() != 1 or x.dim() < 2:
        return apply_affine(x, scale, shift)
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    zeros = torch.zeros_like(scale)
    return torch.batch_norm(x, scale, shift, zeros, torch.ones_like(scale), False, 0.0, 0.0, False)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``y = (x − μ) / sqrt(σ² + eps) · γ + β`` with per-channel or per-sample statistics.

    ``mean``/``var`` are ``(C,)`` (shared by the batch) or ``(N, C)`` (one set per sample).
    Computed as one pass ``y = a·x + b`` with ``a = γ/sqrt(σ² + eps)``, ``b = β − μ·a``, as
    torch's BN kernels do.  Half-precision inputs are normalized in float32 and rounded once
    at the end: rounding μ to bfloat16 first would cost ``2⁻⁹·|μ|/σ`` of accuracy.
    """
    # The statistics in float32 at least: half-precision running statistics combined in
    # their own dtype lose the output (bfloat16: μ = 1.2344, σ² = 0 gave 0.0625 for 0.5).
    dtype = stats_dtype(torch.promote_types(mean.dtype, var.dtype))
    scale, shift = affine_from_moments(
        mean.to(dtype), torch.rsqrt(var.to(dtype) + eps), weight, bias
    )
    return apply_affine(x, scale, shift)


def exporting() -> bool:
    """Whether this forward is being captured into a program for deployment: by
    ``torch.export`` (strict or not, also inside ``torch.onnx.export(dynamo=True)``) or by the
    TorchScript tracer of the legacy ``torch.onnx.export``.

    Such a program keeps no host state and cannot read a value back mid-forward, so finite
    checks of statistics that leave no state behind (GN/LN/IN in any mode, SN in eval) are left
    out of it: a data-dependent branch fails the export (or is baked into a trace), and a
    device-side flag would be a buffer mutation nobody reads.  Plain ``torch.compile`` is not
    exporting.
    """
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


_Backward = TypeVar("_Backward", bound=Callable[..., Any])


def first_order_only(what: str) -> Callable[[_Backward], _Backward]:
    """Decorate a custom autograd Function's ``backward`` whose formulas are first-order only:
    a backward with ``create_graph=True`` (a second derivative, e.g. a gradient penalty)
    raises a clear error instead of returning gradients that silently lack the second-order
    terms (``once_differentiable`` only errs when the incoming gradient itself has a graph)."""

    def decorate(backward: _Backward) -> _Backward:
        @functools.wraps(backward)
        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():  # autograd runs backward in grad mode = create_graph
                raise RuntimeError(
                    f"{what} is differentiable once: its backward is written out to first "
                    f"order, so a backward with create_graph=True (double backward, gradient "
                    f"penalties) is not supported. Use torch.nn.BatchNorm or GroupNorm "
                    f"for second derivatives."
                )
            with torch.no_grad():
                return backward(ctx, *grads)

        return checked  # type: ignore[return-value]

    return decorate


#: ``(mean, var, weight, bias)`` to normalize each sample with: mean/var ``(N, C)``,
#: weight/bias ``(C,)``, ``(N, C)`` or ``None``.
SampleNormalization = tuple[Tensor, Tensor, Tensor | None, Tensor | None]
#: ``statistics(instance) -> SampleNormalization`` from x's instance moments (``(N, C)``).
SampleStatistics = Callable[["Moments"], SampleNormalization]


def sample_grad_sums(grad: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ g (x − μ), Σ g)`` per sample and channel over ``*spatial``, for ``mean`` ``(N, C)``:
    what the backward of a normalization with per-sample statistics needs.

    Contiguous inputs take one pass of BN's eval-mode backward kernel with the N·C (sample,
    channel) pairs as its channels and "running" statistics (μ, 1); others (channels-last,
    where that reshape would copy x and g) ``Σ g x − μ Σ g``.
    """
    n, c = x.shape[:2]
    if x.dim() == 2:  # one value per sample and channel (sum over no dims: sum(dim=[]) is all)
        return grad * (x - mean), grad
    if x.is_contiguous() and grad.is_contiguous():
        rows = (1, n * c, -1)
        _, centred, total = torch.ops.aten.native_batch_norm_backward.default(
            grad.reshape(rows),
            x.reshape(rows),
            None,
            # contiguous: the mixed statistics of Switchable Norm arrive expanded (stride 0),
            # and the kernel reads its "running mean" as dense memory (an expanded one gave
            # values from past the tensor's storage).
            mean.reshape(-1).contiguous(),
            x.new_ones(n * c),
            None,
            None,
            False,
            0.0,
            [False, True, True],
        )
        return centred.view(n, c), total.view(n, c)
    dims = list(range(2, x.dim()))
    total = grad.sum(dim=dims)
    return (grad * x).sum(dim=dims) - mean * total, total


class _NormalizeWithStatistics(torch.autograd.Function):
    """``y = γ (x − μ)·s + β`` with ``s = 1/sqrt(σ² + eps)`` for statistics ``μ, σ²`` and affine
    ``γ, β`` given as inputs: ``(N, C)`` (one set per sample), ``(C,)`` or, for γ/β, absent.

    The normalization step of :func:`normalize_from_sample_moments`.  Its backward treats the
    statistics as the independent inputs they are here; how they depend on x (through x's
    instance moments and whatever the caller computed from them) reaches x through their own
    autograd graph.  Per sample and channel, with ``S = Σ g`` and ``D = Σ g (x − μ)`` over
    the M spatial values (one reduction pass over x and g, :func:`sample_grad_sums`),

        ∂L/∂x|direct = γ s g,   ∂L/∂μ = −γ s S,   ∂L/∂σ² = −½ γ s³ D,
        ∂L/∂γ = s D,            ∂L/∂β = S.

    Why not autograd of :func:`normalize`: that differentiates ``y = a·x + b`` and forms
    ``∂L/∂a = Σ g x``, from which ``∂L/∂σ²`` needs ``Σ g x − μ Σ g``, a difference that cancels
    catastrophically once ``|μ| ≫ σ``; ``D`` here is summed centred (for contiguous inputs,
    as :func:`sample_grad_sums` says).  The backward calls no ``torch.autograd.grad`` (the
    formulas are closed), so dynamo and AOTAutograd trace it: the reason this replaced a
    Function that differentiated the statistics' graph inside its own backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        compute: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        # In the compute dtype: statistics may arrive in the running buffers' dtype (SN in
        # eval: float16 buffers, or float32 ones for a float64 input).
        mean_c, var_c = mean.to(compute.dtype), var.to(compute.dtype)
        inv_std = torch.rsqrt(var_c + eps)
        gamma = inv_std.new_ones(()) if weight is None else weight.to(inv_std.dtype)
        scale, shift = affine_from_moments(mean_c, inv_std, gamma, bias)
        ctx.save_for_backward(compute, mean_c, inv_std, gamma, scale)
        # Shapes to return each gradient in (a (C,) statistic or affine gets the sum over N).
        ctx.shapes = (mean.shape, var.shape, _shape_or_none(weight), _shape_or_none(bias))
        ctx.dtypes = (mean.dtype, var.dtype, _dtype_or_none(weight), _dtype_or_none(bias))
        return apply_affine(compute, scale, shift)

    @staticmethod
    @first_order_only("Per-sample-statistics normalization (Ghost BN, grouped BRN, SN, DomainBN)")
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        compute, mean, inv_std, gamma, scale = ctx.saved_tensors
        mean_shape, var_shape, weight_shape, bias_shape = ctx.shapes
        mean_dtype, var_dtype, weight_dtype, bias_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        grad = grad_y.to(compute.dtype)
        n, c = compute.shape[:2]
        centred, total = sample_grad_sums(grad, compute, mean.expand(n, c))
        grad_x = grad_mean = grad_var = grad_weight = grad_bias = None
        if needs[0]:
            grad_x = grad * channel_view(scale.expand(n, c), compute)
        if needs[1]:
            grad_mean = _sum_to(-scale * total, mean_shape).to(mean_dtype)
        if needs[2]:
            # -½ γ s³ D, multiplied in an order that keeps every factor in range: s³ alone
            # underflows float32 once σ exceeds ~1e13 (a silently zero variance gradient).
            grad_var = (centred * inv_std) * inv_std * (inv_std * (-0.5 * gamma))
            grad_var = _sum_to(grad_var, var_shape).to(var_dtype)
        if needs[3]:
            grad_weight = _sum_to(inv_std * centred, weight_shape).to(weight_dtype)
        if needs[4]:
            grad_bias = _sum_to(total, bias_shape).to(bias_dtype)
        return grad_x, grad_mean, grad_var, grad_weight, grad_bias, None


def _shape_or_none(t: Tensor | None) -> torch.Size | None:
    return None if t is None else t.shape


def _dtype_or_none(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """``grad`` (``(N, C)``) summed to the shape of the input it belongs to (a ``(C,)`` or
    ``(1, C)`` statistic broadcast over the samples gets the sum over them)."""
    return grad if grad.shape == shape else grad.sum_to_size(shape)


def normalize_from_sample_moments(
    x: Tensor, statistics: SampleStatistics, eps: float, params: Sequence[Tensor | None] = ()
) -> Tensor:
    """``y = γ (x − μ)/sqrt(σ² + eps) + β`` with ``(μ, σ², γ, β) = statistics(instance)``,
    ``instance`` the moments of x per sample and channel (:func:`sample_moments`).

    ``statistics`` must build its result from ``instance`` and the tensors in ``params``
    (the parameters it reads, e.g. γ, β, mixture logits) with differentiable torch ops; it
    is called once, in the forward (side effects such as running-statistic updates happen
    once).  With gradients, the normalization is one custom autograd function
    (:class:`_NormalizeWithStatistics`) whose backward makes one reduction pass over x and
    sums the statistics' gradient terms centred; the statistics' dependence on x flows back
    through ``statistics``' own small graph and the instance moments' backward
    (:func:`mean_var`), so that in all, per sample and channel over its M spatial values,

        ∂L/∂x = γ s g + ∂L/∂μ_in / M + 2 ∂L/∂σ²_in (x − μ_in) / M.

    Every step is traceable by ``torch.compile`` (fullgraph) and ``torch.export``.  Without
    gradients, :func:`normalize` with the same statistics: the same numbers.  First order
    only: a backward with ``create_graph=True`` raises (see :func:`first_order_only`).
    """
    tensors = [p for p in params if p is not None]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in tensors)
    )
    if not (needs_grad and x.numel() > 0):
        mean, var, weight, bias = statistics(sample_moments(x))
        return normalize(x, mean, var, eps, weight, bias)
    compute = x.to(stats_dtype(x.dtype))
    mean, var, weight, bias = statistics(sample_moments(compute))
    y = _NormalizeWithStatistics.apply(compute, mean, var, weight, bias, eps)
    return y.to(x.dtype)


def normalize_with_population(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """:func:`normalize` with fixed per-channel statistics (inference, FrozenBN): torch's fused
    eval-mode batch-norm kernel where the dtypes allow it (the same affine map, one kernel
    instead of five small ops), :func:`normalize` otherwise (half inputs, float32 stats, and
    inputs that need a gradient: the fused kernel keeps x for backward, :func:`normalize` with
    fixed statistics and affine keeps nothing of x's size, which FrozenBN in training needs)."""
    same = mean.dim() == 1 and mean.dtype == var.dtype == x.dtype
    same = same and all(p is None or p.dtype == x.dtype for p in (weight, bias))
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, mean, var, weight, bias)
    )
    if same and not grads:
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
    return normalize(x, mean, var, eps, weight, bias)


def fused_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Moments]:
    """BN of ``x`` with its own batch statistics through torch's fused kernel (forward and
    backward), returning the output and the batch moments (detached).

    The same numbers as ``channel_moments`` + ``normalize``, at torch BN's speed; usable
    wherever the statistics are those of ``x`` alone (no pooling across processes or
    iterations).  The variance is recovered from the kernel's ``1/sqrt(σ² + eps)``.
    """
    if x.dtype in (torch.float32, torch.float64):  # the kernel mixes dtypes for half inputs only
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    else:  # float32 γ and β select the mixed kernel, whose statistics are float32
        channels = x.shape[1]
        weight = x.new_ones(channels, dtype=torch.float32) if weight is None else weight.float()
        bias = x.new_zeros(channels, dtype=torch.float32) if bias is None else bias.float()
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    dtype = stats_dtype(x.dtype)
    invstd = invstd.detach().to(torch.float64)
    var = (invstd.pow(-2) - eps).clamp_min(0).to(dtype)
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=dtype, device=x.device)
    return y, Moments(count, mean.detach().to(dtype), var)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    unbiased_var: Tensor,
    factor: float,
) -> None:
    """BN's exponential moving average: ``r ← (1 − factor)·r + factor·batch`` in place."""
    running_mean.lerp_(mean.detach().to(running_mean.dtype), factor)
    running_var.lerp_(unbiased_var.detach().to(running_var.dtype), factor)


# -- groups of samples and running averages over several updates ----------------------------


@dataclass(frozen=True)
class SampleGroups:
    """Consecutive groups of ``group_size`` samples of a batch of ``total`` samples (the last
    group may be smaller), seen from a process that holds samples ``offset … offset + local − 1``
    of it (the whole batch, ``offset = 0``, without synchronization; with it, the concatenation
    of all processes' batches in rank order, so that a group may span two processes and
    "normalization batch of b" means the same for every layer).

    ``index``: each local sample's group, ``(local,)``; ``count``: the number of groups
    (``⌈total / group_size⌉``, at least 1); ``sizes``: the samples of each group (host ints).
    """

    index: Tensor
    count: int
    sizes: tuple[int, ...]
    offset: int
    total: int
    group_size: int

    @property
    def equal(self) -> bool:
        """Every group holds ``group_size`` samples and this process holds all of them: the
        batch reshapes to ``(count, group_size, ...)`` without merging."""
        return (
            self.offset == 0 and self.total == self.index.shape[0] == self.count * self.group_size
        )


def sample_groups(
    local: int, group_size: int, device: torch.device, offset: int = 0, total: int | None = None
) -> SampleGroups:
    """The groups of ``group_size`` consecutive samples (:class:`SampleGroups`) of a batch of
    ``total`` samples (default ``local``) of which this process holds ``local`` from
    ``offset`` on (:func:`smallbn._distributed.rank_offset` gives both under synchronization).
    No host read: every number is a host int, the index is built on ``device``."""
    if group_size < 1:
        raise ValueError(f"sample_groups: group_size must be >= 1, got {group_size}")
    total = local if total is None else total
    sizes = group_sizes(total, group_size)
    index = torch.div(
        torch.arange(offset, offset + local, device=device), group_size, rounding_mode="floor"
    )
    return SampleGroups(index, len(sizes), sizes, offset, total, group_size)


def group_sizes(total: int, group_size: int) -> tuple[int, ...]:
    """The samples of each of the ``⌈total / group_size⌉`` consecutive groups of a batch of
    ``total`` (the last may be smaller; ``(0,)``, one empty group, for an empty batch)."""
    if group_size < 1:
        raise ValueError(f"group_sizes: group_size must be >= 1, got {group_size}")
    if total <= 0:
        return (0,)
    full, rest = divmod(total, group_size)
    return (group_size,) * full + ((rest,) if rest else ())


def ema_sequence(
    start: Tensor, values: Tensor, step: int | Tensor, momentum: float | None
) -> tuple[Tensor, Tensor]:
    """``G`` consecutive running-average updates at once: the average before each update
    (``(G, C)``; ``start`` itself for ``G = 1``) and after the last (``(C,)``).

    Update ``k`` is ``a ← (1 − f_k)·a + f_k·values[k]`` with ``f_k = momentum`` (BN's
    exponential moving average), or ``f_k = 1/(step + k + 1)`` for ``momentum=None`` (BN's
    cumulative average, ``step`` updates seen before, a host int or a 0-dim device tensor).
    This is what ``G`` calls of a layer on ``G`` groups of a batch would leave (Ghost BN,
    simulated normalization batches, MABN's and CBN's per-group iterations).

    Closed forms instead of a loop over groups: ``a_k = q^k·a_0 + Σ_{j<k} f·q^{k−1−j}·v_j``
    (``q = 1 − f``) as one small matrix product, and for the cumulative average
    ``a_k = (t₀·a_0 + Σ_{j<k} v_j)/(t₀ + k)``.
    """
    groups = values.shape[0]
    if groups == 1:
        if momentum is not None:
            return start, torch.lerp(start, values[0], momentum)
        if isinstance(step, Tensor):
            return start, torch.lerp(start, values[0], 1.0 / (step + 1).to(values.dtype))
        return start, torch.lerp(start, values[0], 1.0 / (step + 1))
    k = torch.arange(groups + 1, device=values.device, dtype=values.dtype)
    if momentum is None:
        prefix = torch.cat([values.new_zeros(1, values.shape[1]), values.cumsum(0)])
        seen = (step + k).unsqueeze(1)
        sequence = (step * start + prefix) / seen.clamp_min(1)
        # nothing seen before the first update (step 0): the start value
        if isinstance(step, Tensor):
            sequence = torch.where(seen == 0, start, sequence)
        elif step == 0:
            sequence = torch.cat([start.unsqueeze(0), sequence[1:]])
    else:
        keep = 1.0 - momentum
        exponent = k.unsqueeze(1) - 1 - k[:-1].unsqueeze(0)  # (G + 1, G): k − 1 − j
        weights = torch.where(
            exponent >= 0, momentum * keep ** exponent.clamp_min(0), torch.zeros_like(exponent)
        )
        sequence = (keep**k).unsqueeze(1) * start + weights @ values
    return sequence[:-1], sequence[-1]


def ema_after(start: Tensor, values: Tensor, step: int | Tensor, momentum: float | None) -> Tensor:
    """The running average after ``G`` consecutive updates: ``ema_sequence(...)[1]`` without
    the averages before each update, for callers that need only the last (CBN's running
    statistics, once per grouped step): ``q^G·a_0 + Σ_j f·q^{G−1−j}·v_j`` as one ``addmv``
    (weights from host floats, no ``(G + 1) × G`` matrix), or ``(t₀·a_0 + Σ_j v_j)/(t₀ + G)``
    for the cumulative average."""
    groups = values.shape[0]
    if momentum is None:
        return (step * start + values.sum(0)) / (step + groups)
    keep = 1.0 - momentum
    weights = values.new_tensor([momentum * keep ** (groups - 1 - j) for j in range(groups)])
    return torch.addmv(start, values.t(), weights, beta=keep**groups)
