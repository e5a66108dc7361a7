"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang & Lin, "Cross-Iteration Batch
Normalization", CVPR 2021; arXiv 2002.05712).

At small batch, pool the statistics of the current and the ``k − 1`` previous training
iterations, each moved to the current weights by a first-order Taylor term.  With x the
output of the layer right before the norm (the *producer*: a conv or linear with weights
θ = (W, b)), per channel j and iteration t over the reduction set R = (N, *spatial), |R| = M:

    μ_t = E_R[x],   ν_t = E_R[x²],
    μ_{t−τ}(θ_t) ≈ μ_{t−τ} + ⟨∂μ_{t−τ}/∂θ, θ_t − θ_{t−τ}⟩,   same for ν,
    μ̄ = mean_τ μ_{t−τ}(θ_t),   ν̄ = mean_τ max(ν_{t−τ}(θ_t), μ_{t−τ}(θ_t)²),   σ̄² = ν̄ − μ̄²,
    y = γ (x − μ̄) / sqrt(σ̄² + eps) + β,

with τ = 0 … k−1, the derivatives those recorded at iteration t − τ, and gradients flowing
through the current μ_t, ν_t only (paper, Eqs. 7–10).

**Derivatives, analytically** (paper §3.3; no extra autograd pass).  For a conv
``x_j = ⟨W_j, u⟩ + b_j`` over input patches u (a linear layer: u is the input row):

    ∂μ_j/∂W_j = E_R[u]                 the mean patch, the same for every j of a group,
    ∂ν_j/∂W_j = (2/M) Σ_R x_j u         the conv weight gradient for output gradient 2x/M,
    ∂μ_j/∂b_j = 1,   ∂ν_j/∂b_j = 2μ_j,  and ∂σ² = ∂ν − 2μ ∂μ (so ∂σ²_j/∂b_j = 0).

The variance derivative costs one weight-gradient convolution per step (output gradient x
itself: no extra pass over x; ``− 2μ ∂μ`` is applied to the small result).  The mean patch
is a box sum of the batch-summed input, separable per spatial dim (one 0/1 matrix per dim:
exact for any stride, padding, dilation and groups), about the cost of one pass over u.

**Storage.**  Per window slot: μ and the biased σ² (C each; ν = σ² + μ²), the two derivative
tensors (``C_in·K`` and ``C_out·C_in/groups·K``: the conv weight's size) and the scalars
⟨∂μ, θ⟩, ⟨∂σ², θ⟩ evaluated at the weights of record time (C each).  Then

    ⟨∂μ_{t−τ}, θ_t − θ_{t−τ}⟩ = ⟨∂μ_{t−τ}, θ_t⟩ − (recorded scalar)

needs only the current weights: no weight snapshots, ``k·(|W| + C_in·K) + O(k·C)`` numbers
per layer.  Storing σ² and ∂σ² rather than ν and ∂ν is the same first-order term
(``ν(θ_t) − μ(θ_t)² = σ² + ⟨∂σ², Δθ⟩ − ⟨∂μ, Δθ⟩²``, exact algebra) without the cancellation
of ``E[x²] − E[x]²`` in float32, and the recorded scalars stay of the size of σ² (by
homogeneity ⟨∂σ²_j, W_j⟩ = 2σ²_j).  The window is aggregated in the centred form
``σ̄² = mean_τ max(σ²_τ, 0) + mean_τ (μ_τ − μ̄)²`` (the max rule: ``max(ν, μ²) − μ² =
max(σ², 0)``).  The scalars of a slot and the inner products that later use them come from
the same batched product of the whole window with the weights, so the compensation is
exactly zero while the weights are unchanged (micro-batches of gradient accumulation,
frozen producers).

Options: the authors' release drops window entries whose compensated variance is negative
(``aggregation="drop"``; the current batch always stays, so at least one entry remains) and
puts eps outside the square root (``eps_placement="outside"``: ``/(sqrt(σ̄²) + eps)``);
burn-in is plain BN for the first ``burnin`` iterations (``burnin_mode="two_stage"``, the
paper's) or a linear ramp of the window (``"linear"``, the release's).  ``window=None``
picks the paper's recommendation ``k = min(ceil(16 / batch), 8)`` from the first training
batch (summed over processes when syncing).

Running statistics for inference are BN's (EMA of the current batch's μ and unbiased σ²);
inference is BN's and folds into the conv (:meth:`NormBase.eval_affine`).

**Simulated small normalization batches** (``norm_batch_size=b``; Yan et al., ICLR 2020,
normalize groups of b samples inside an SGD batch to study the normalization batch alone).
A training batch of N > b samples is split into ``G = ceil(N/b)`` groups of b consecutive
samples (the last may be smaller), which are iterations ``t, t + 1, …, t + G − 1``: one call
gives the same outputs, gradients, running statistics and window state as calling the layer
on each group in turn (``GroupedNorm(layer, b)``), vectorized.  Group g (iteration
``s = t + g``, moments ``μ_s, σ²_s`` over its own ``M_g`` values) pools its window

    entries s − τ, τ = 1 … p_g,   p_g = min(k_s − 1, filled_s)   (k_s the burn-in window),

where an entry of an earlier call is compensated with the current weights as above and an
entry of this call is taken as is: the weights are the same, so its compensation
``⟨∂, θ_t⟩ − ⟨∂, θ_t⟩`` is exactly zero.  Gradients flow through each group's own μ_s, σ²_s
only (the backward of the one-iteration path, per group).  Only the last k groups can be
read by a later call (a step reads at most k − 1 stored entries), so only they are stored,
and their derivatives come from one weight-gradient convolution with the groups as conv
groups.  The running statistics take one EMA step per group, in closed form
``r ← (1 − m)^G r + Σ_g m (1 − m)^(G−1−g) s_g`` (``momentum=None``: the cumulative average
over groups); ``iteration`` and ``num_batches_tracked`` count groups, so burn-in and
``window=None`` (k from the group size b) mean what they mean for ``GroupedNorm``.  A batch of
N ≤ b samples is one iteration.  A group of a single value per channel is an error before any
state changes (``GroupedNorm`` would fail at that group, after updating the earlier ones).
With ``sync=True`` the groups are formed over the concatenation of every process's batch in
rank order (as Ghost BN, BRN and SN form them; a group may span two processes), the groups'
moments and derivatives pooled across processes: two processes equal one process on the
concatenated batch.  (``GroupedNorm`` around a synchronized layer instead pools group g of
every process into one iteration of ``world·b`` samples, a different experiment.)

**The producer** is found by :func:`smallbn.bind_producers` (which :func:`smallbn.convert`
calls) or set with :meth:`CrossIterationBatchNorm.bind_producer`.  It is held outside the
module tree (``state_dict``/``parameters`` do not repeat it).  In training mode a forward hook
on it keeps a reference to its input until this layer's next training forward consumes it;
an eval-mode model has no hook (so :func:`smallbn.fold` folds it).  Supported producers are
``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups, bias) and
``nn.Linear`` before a ``(N, C)`` input.  Without a producer (none found, a transposed conv,
or a step whose input is not the producer's output) the layer pools uncompensated
statistics ("naive CBN"), with a one-time warning.

**No host reads; torch.compile.**  Eager, the schedule (slot ``t mod k``, entries pooled,
burn-in) comes from host copies of the counters, so a step reads nothing back from the device
(with the deferred finite check, :func:`smallbn.set_finite_check`).  Under ``torch.compile``
(``fullgraph=True`` holds) a host int read by the compiled code is a guard on its value, a
recompilation per step; so there the schedule is computed on the device from the
``iteration`` and ``window_fill`` buffers, which the step advances: every stored slot is
gathered and the entries the eager step would not pool are masked (they weigh exactly
zero), and the slot is written where the eager step would write it.  One graph serves every
training step; the host copies are re-read (one host read) by the next eager use, and
warnings of compiled steps are given by the next eager call (``train()``/``eval()``): dynamo
cannot trace ``warnings.warn``.  Simulated normalization batches (``norm_batch_size``) still
schedule on the host: compiled, they recompile at each step, up to dynamo's limit.

Limitations: every training forward is an iteration, so activation checkpointing (which runs
the forward twice) and ``nn.DataParallel`` replicas (which share the hook) are not supported;
with DDP, keep ``broadcast_buffers=False`` or ``sync=True`` (rank 0's window would otherwise
overwrite the others').  Double backward is not supported.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm
from smallbn.stats import (
    Moments,
    affine_from_moments,
    apply_affine,
    apply_channel_affine,
    channel_view,
    first_order_only,
    mean_var,
    sample_grad_sums,
    scale_shift,
    stats_dtype,
)

__all__ = [
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "recommended_window",
]

Aggregation = Literal["max", "drop"]
EpsPlacement = Literal["inside", "outside"]
BurninMode = Literal["two_stage", "linear"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PRODUCERS = (*_CONVS, nn.Linear)


def _plain_class(producer: nn.Module) -> type[nn.Module]:
    """The torch class among :data:`_PRODUCERS` that ``producer`` is an instance of."""
    return next(cls for cls in _PRODUCERS if isinstance(producer, cls))


def _plain_forward(producer: nn.Module) -> Any:
    """The forward a producer must have for the derivatives to hold: its torch class's
    (subclasses that only add state, like smallbn's CenteredConv, override it and are
    refused too: their weight is transformed before the conv)."""
    return _plain_class(producer).forward


Producer = _ConvNd | nn.Linear
_Layer = TypeVar("_Layer", bound="CrossIterationBatchNorm")

#: Per-slot statistics, shape (k, C): μ, biased σ², and ⟨∂μ, θ⟩, ⟨∂σ², θ⟩ at record time.
_STAT_BUFFERS = ("window_mean", "window_var", "window_mean_dot", "window_var_dot")
#: Per-slot derivatives: ∂μ/∂W (groups, k, C_in/groups·K) and ∂σ²/∂W (C_out, k, C_in/groups·K).
_GRAD_BUFFERS = ("window_mean_grad", "window_var_grad")


def recommended_window(batch_size: int) -> int:
    """The paper's window for a per-process batch of ``batch_size``: ``min(ceil(16/b), 8)``
    (§4.1: "pooling statistics over an effective batch of at least 16")."""
    if batch_size < 1:
        raise ValueError(f"recommended_window: batch_size must be >= 1, got {batch_size}")
    return min(math.ceil(16 / batch_size), 8)


@functools.lru_cache(maxsize=256)
def _patch_selection(
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


def _conv_geometry(conv: _ConvNd, u: Tensor) -> tuple[Tensor, list[int]]:
    """The conv's input with any padding that ``F.conv*`` does not do itself applied
    (padding modes other than zeros, string padding), and the remaining symmetric padding."""
    dims = u.dim() - 2
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        u = nn.functional.pad(u, conv._reversed_padding_repeated_twice, mode=mode)
        return u, [0] * dims
    return u, list(padding)  # type: ignore[arg-type]


def _patch_sums(summed: Tensor, conv: _ConvNd, padding: list[int], dtype: torch.dtype) -> Tensor:
    """The sum over every output position of the conv's input patches, from the batch-summed
    (and explicitly padded) input ``(..., C_in, *spatial)``: ``(..., C_in, *kernel)``."""
    dims = len(padding)
    lead = summed.dim() - dims
    patch = summed
    for d in range(dims):
        axis = lead + d
        # Compiled, the matrices are built in the graph (dynamo cannot use the host cache).
        build = _patch_selection.__wrapped__ if torch.compiler.is_compiling() else _patch_selection
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


def _conv_weight_grad(
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


def _producer_derivatives(
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
        assert isinstance(producer, _CONVS)
        u, padding = _conv_geometry(producer, u)
        # M/2 · ∂ν/∂W = Σ_R x u: the conv weight gradient for output gradient x.
        second_grad = _conv_weight_grad(
            producer, xs, u, weight.detach().to(dtype), padding, producer.groups
        )
        # (C_in, *spatial): ∂μ/∂W sums the same patches for every sample
        patch = _patch_sums(u.sum(0), producer, padding, dtype)
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


def _group_derivatives(
    producer: Producer, u: Tensor, x: Tensor, mean: Tensor, count: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """:func:`_producer_derivatives` of ``G`` groups at once: this process's share of each
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
        assert isinstance(producer, _CONVS)
        flat, padding = _conv_geometry(producer, u.flatten(0, 1))
        inputs = flat.view(num, size, *flat.shape[1:])  # (G, b, C_in, *padded spatial)
        second_grad = _conv_weight_grad(
            producer,
            xs.transpose(0, 1).flatten(1, 2),  # (b, G·C_out, *spatial'): the groups as channels
            inputs.transpose(0, 1).flatten(1, 2),
            weight.detach().to(dtype).repeat(num, *([1] * (weight.dim() - 1))),
            padding,
            num * producer.groups,
        )
        patch = _patch_sums(inputs.sum(1), producer, padding, dtype)  # (G, C_in, *kernel)
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


def _as_groups(rows: Tensor, start: int, lead: int, num: int, size: int) -> Tensor:
    """``rows[start:]`` laid out as ``(num, size, ...)`` after ``lead`` zero rows, zero rows
    filling the end (the groups' samples this process holds, at their places)."""
    part, shape = rows[start:], rows.shape[1:]
    tail = num * size - lead - part.shape[0]
    if lead or tail:
        part = torch.cat([part.new_zeros(lead, *shape), part, part.new_zeros(tail, *shape)])
    return part.reshape(num, size, *shape)


def _pool(
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
    its graph does not depend on the window's fill (:func:`_pool_groups` of one group).
    """
    if valid is not None:
        pooled, variance, count = _pool_groups(
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


def _pool_groups(
    mean: Tensor, var: Tensor, past_mean: Tensor, past_var: Tensor, valid: Tensor, drop: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_pool` of ``G`` windows at once: group g's current ``(mean, var)[g]`` (``(G, C)``,
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


def _inverse_std(var: Tensor, eps: float, inside: bool) -> Tensor:
    """``1/sqrt(σ̄² + eps)`` (BN's) or ``1/(sqrt(σ̄²) + eps)`` (the authors' release)."""
    if inside:
        return torch.rsqrt(var + eps)
    # sqrt has an infinite slope at 0: a constant channel would turn 0 gradients into NaN.
    return 1.0 / (var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() + eps)


def _moment_coefficients(
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
    moment (the formulas of :class:`_WindowNorm`); every argument per channel, or per group
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


class _WindowNorm(torch.autograd.Function):
    """``y = γ (x − μ̄)·s(σ̄²) + β`` with ``(μ̄, σ̄², n) = _pool(μ, σ², past, valid)``, where
    ``(μ, σ²)`` are x's own batch moments (given, computed without gradient) and ``past``
    constants (entries where ``valid`` is false, if given, are not pooled).

    The backward is written out so that it costs about BN's instead of autograd's separate
    passes for the normalization and the moments.  With ``D = Σ g (x − μ̄)`` and ``S = Σ g``
    per channel:

        ∂L/∂β = S,   ∂L/∂γ = s D,   ∂L/∂μ̄ = −γ s S,   ∂L/∂σ̄² = γ s′(σ̄²) D,
        ∂L/∂μ = (∂L/∂μ̄ + 2 (μ − μ̄) ∂L/∂σ̄²) / n,   ∂L/∂σ² = ∂L/∂σ̄² / n
            (∂μ̄/∂μ = 1/n, ∂σ̄²/∂σ² = 1/n, ∂σ̄²/∂μ = 2(μ − μ̄)/n from ``_pool``),
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
        pooled_mean, pooled_var, count = _pool(mean, var, past_mean, past_var, drop, valid)
        inv_std = _inverse_std(pooled_var, eps, inside)
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


class _GroupedWindowNorm(torch.autograd.Function):
    """:class:`_WindowNorm` of ``G`` groups of samples at once: sample n belongs to group
    ``index[n]``, which is normalized by :func:`_pool_groups` of its own moments ``(mean,
    var)[g]`` (``(G, C)``, given without gradient, of ``count[g]`` values each) and its
    constant stored entries ``past_*[g]`` where ``valid[g]``.

    Same backward as :class:`_WindowNorm` per group, with ``D_g = Σ g (x − μ̄_g)`` and
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
        pooled_mean, pooled_var, pooled = _pool_groups(mean, var, past_mean, past_var, valid, drop)
        inv_std = _inverse_std(pooled_var, eps, inside)
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
        a, b = _moment_coefficients(
            mean, weight, pooled_mean, pooled_var, pooled, inv_std, scale, centred, total,
            count.to(dtype).unsqueeze(1), ctx.inside,
        )  # fmt: skip
        grad_x = scale_shift(xs, channel_view(a[index], x), channel_view(b[index], x))
        grad_x.addcmul_(grad, channel_view(scale[index], x))
        grad_weight = None if weight is None else (inv_std * centred).sum(0).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else total.sum(0).to(ctx.bias_dtype)
        return grad_x.to(x.dtype), *([None] * 4), grad_weight, grad_bias, *([None] * 6)


class _Schedule(NamedTuple):
    """One training step's use of the window (:meth:`CrossIterationBatchNorm._forward_train`).

    Eager, from the host counters: ``past`` stored entries pooled, in slots ``index``,
    ``record`` whether this step is stored in ``slot``, ``fill`` the window fill after it
    (an int).  Compiled, from the device counters: ``past = k − 1`` slots gathered with the
    mask ``valid``, ``record`` true with ``keep`` (a 0-dim bool, ``None``: always) saying
    whether the slot is really written, ``fill`` a 0-dim tensor.
    """

    past: int
    record: bool
    slot: Tensor
    index: Tensor
    valid: Tensor | None
    keep: Tensor | None
    fill: int | Tensor


def _put_slot(buffer: Tensor, dim: int, slot: Tensor, rows: Tensor, keep: Tensor | None) -> None:
    """``buffer``'s entry ``slot`` (a one-element index along ``dim``) ← ``rows`` (size 1
    along ``dim``), left as it was where ``keep`` is false.  An index tensor, not an int:
    the compiled step computes the slot on the device (``t mod k``)."""
    rows = rows.to(buffer.dtype)
    if keep is not None:
        rows = torch.where(keep, rows, buffer.index_select(dim, slot))
    buffer.index_copy_(dim, slot, rows)


class _ProducerHook:
    """The forward hook a layer puts on its producer: hands the producer's input and output
    to the layer.  It holds the layer weakly, so that a layer dropped from its model (e.g.
    replaced by :func:`smallbn.convert`) is freed, and a finalizer then removes the hook;
    copies of a model (``copy.deepcopy``, pickling) hook the copied layer."""

    def __init__(self, layer: CrossIterationBatchNorm | None) -> None:
        self.layer = None if layer is None else weakref.ref(layer)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        layer = None if self.layer is None else self.layer()
        if layer is not None:
            layer._capture(args, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ProducerHook:
        layer = None if self.layer is None else self.layer()
        return _ProducerHook(None if layer is None else copy.deepcopy(layer, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ProducerHook, (None if self.layer is None else self.layer(),))


#: One finalizer per hooked layer: removes the layer's hook from its producer when the layer
#: is garbage collected.
_UNHOOK: weakref.WeakKeyDictionary[nn.Module, weakref.finalize[Any, Any]] = (
    weakref.WeakKeyDictionary()
)


class CrossIterationBatchNorm(BatchStatsNorm, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """Cross-Iteration BN for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    Args:
        window: k, the iterations pooled (current included); ``None`` (default) picks
            :func:`recommended_window` of the first training batch; 1 is plain BN.
        burnin: iterations of plain BN before the full window (paper: a quarter of training,
            e.g. 25 of 100 ImageNet epochs; default 0: pool from the start).
        burnin_mode: ``"two_stage"`` (paper: k = 1 for ``burnin`` iterations, then k) or
            ``"linear"`` (release: k grows linearly to its value at iteration ``burnin``).
        compensate: apply the Taylor compensation (``False``: naive cross-iteration pooling).
        aggregation: ``"max"`` (paper: ν̄ = mean max(ν, μ²)) or ``"drop"`` (release: entries
            whose compensated variance is negative are left out).
        eps_placement: ``"inside"`` (``/sqrt(σ̄² + eps)``, BN's) or ``"outside"``
            (``/(sqrt(σ̄²) + eps)``, the release's default).
        norm_batch_size: b: in training, normalize consecutive groups of b samples of each
            batch as consecutive iterations (a simulated small normalization batch, the same
            as ``GroupedNorm(layer, b)``, vectorized; module docstring); ``None`` (default):
            the batch is one iteration.
        sync: pool the current statistics and their derivatives across processes (with
            ``norm_batch_size``, groups are formed over the concatenated global batch).

    State: BN's keys plus ``iteration`` (training iterations seen), ``window_fill`` (recent
    iterations stored), the per-slot ``window_mean``/``window_var``/``window_mean_dot``/
    ``window_var_dot`` ``(k, C)`` and, with a producer, ``window_mean_grad``
    ``(groups, k, C_in/groups·K)`` and ``window_var_grad`` ``(C_out, k, C_in/groups·K)``;
    slot ``t mod k`` holds iteration t.  The window buffers appear once their shapes are
    known (construction with an explicit ``window``; binding; the first training step) and a
    checkpoint creates them when it has them, so loading works before or after binding; a
    BN checkpoint loads (strict) as an empty window at iteration 0.  Each training forward
    is an iteration (micro-batches of gradient accumulation included); with
    ``norm_batch_size``, each group of a training batch is.
    """

    _family = "CrossIterationBatchNorm"
    wants_producer = True
    #: GroupedNorm may call this layer on consecutive groups of its producer's output; it
    #: then sets ``sample_slice`` so the matching rows of the producer's input are used.
    accepts_sample_slice = True

    #: b of the simulated normalization batches, or ``None`` (a class default too, so that
    #: layers pickled before the option existed still train).
    norm_batch_size: int | None = None
    #: Whether compiled steps advanced the counters on the device since the host copies
    #: ``_iteration``/``_fill`` were last read (class default: layers pickled before it).
    _host_stale: bool = False
    #: Warnings of compiled steps, given by the next eager call (class default: as above).
    _pending_warnings: tuple[str, ...] = ()
    iteration: Tensor
    window_fill: Tensor
    window_mean: Tensor | None
    window_var: Tensor | None
    window_mean_dot: Tensor | None
    window_var_dot: Tensor | None
    window_mean_grad: Tensor | None
    window_var_grad: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        window: int | None = None,
        burnin: int = 0,
        burnin_mode: BurninMode = "two_stage",
        compensate: bool = True,
        aggregation: Aggregation = "max",
        eps_placement: EpsPlacement = "inside",
        norm_batch_size: int | None = None,
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
    ) -> None:
        name = type(self).__name__
        if norm_batch_size is not None and (
            isinstance(norm_batch_size, bool) or int(norm_batch_size) < 1
        ):
            raise ValueError(
                f"{name}: norm_batch_size is the number of samples of each simulated "
                f"normalization batch (consecutive groups of the batch, each one iteration) "
                f"and must be >= 1, or None to make the whole batch one iteration; got "
                f"{norm_batch_size}"
            )
        if window is not None and (isinstance(window, bool) or int(window) < 1):
            raise ValueError(
                f"{name}: window is the number of iterations pooled (current included) and "
                f"must be >= 1, or None to choose min(ceil(16 / batch), 8) from the first "
                f"batch; got {window}"
            )
        if int(burnin) < 0:
            raise ValueError(f"{name}: burnin is a number of iterations >= 0, got {burnin}")
        for option, value, allowed in (
            ("burnin_mode", burnin_mode, ("two_stage", "linear")),
            ("aggregation", aggregation, ("max", "drop")),
            ("eps_placement", eps_placement, ("inside", "outside")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: {option} must be one of {allowed}, got {value!r}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            sync=sync,
            process_group=process_group,
        )
        self.window = None if window is None else int(window)
        self.burnin = int(burnin)
        self.burnin_mode: BurninMode = burnin_mode
        self.compensate = bool(compensate)
        self.aggregation: Aggregation = aggregation
        self.eps_placement: EpsPlacement = eps_placement
        self.norm_batch_size = None if norm_batch_size is None else int(norm_batch_size)
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("window_fill", torch.tensor(0, dtype=torch.long, device=device))
        for buffer in (*_STAT_BUFFERS, *_GRAD_BUFFERS):
            self.register_buffer(buffer, None)
        # Host-side copies of the two counters: reading the buffers every step would
        # synchronize with the device.  Refreshed from the buffers on load.
        self._iteration = 0
        self._fill = 0
        self._auto_window: int | None = None
        self._warned: set[str] = set()
        self._pending_warnings: tuple[str, ...] = ()
        self._slots: dict[tuple[int, int, int, torch.device], Tensor] = {}
        # Index tensors of the grouped path, by schedule (no host→device copy per step).
        self._group_index: dict[tuple[Any, ...], Tensor] = {}
        # The producer and its hook live outside the module tree (no duplicate parameters).
        self.__dict__["_producer"] = None
        self.__dict__["_hook"] = None
        self.__dict__["_captured"] = None
        self.sample_slice: slice | None = None
        if self.window is not None and self.window > 1:
            self._allocate_stats(self.window)

    # -- configuration -------------------------------------------------------------------

    def extra_repr(self) -> str:
        text = super().extra_repr()
        text += f", window={self.window_size if self.window_size is not None else 'auto'}"
        if self.burnin:
            text += f", burnin={self.burnin}, burnin_mode={self.burnin_mode!r}"
        if not self.compensate:
            text += ", compensate=False"
        if self.aggregation != "max":
            text += f", aggregation={self.aggregation!r}"
        if self.eps_placement != "inside":
            text += f", eps_placement={self.eps_placement!r}"
        if self.norm_batch_size is not None:
            text += f", norm_batch_size={self.norm_batch_size}"
        return text

    @property
    def window_size(self) -> int | None:
        """k in force: the window buffers' length, the constructor's ``window``, or the one
        chosen from the first batch; ``None`` while still to be chosen."""
        if self.window_mean is not None:
            return int(self.window_mean.shape[0])
        return self.window if self.window is not None else self._auto_window

    def effective_window(self, iteration: int | None = None) -> int:
        """Iterations pooled at training ``iteration`` (0-based; default: the next one),
        burn-in applied; before k is chosen (``window=None``, no batch seen) k counts as 1."""
        step = self._host_counters()[0] if iteration is None else int(iteration)
        return self._window_at(step, self.window_size or 1)

    def _window_at(self, step: int, k: int) -> int:
        if step >= self.burnin:
            return k
        if self.burnin_mode == "linear":
            return 1 + (k - 1) * step // self.burnin
        return 1

    def _needs_record(self, step: int, k: int) -> bool:
        """Whether a later iteration of the next k − 1 pools this one's statistics."""
        return any(self._window_at(step + d, k) - 1 >= d for d in range(1, k))

    # -- the producer ----------------------------------------------------------------------

    @property
    def producer(self) -> Producer | None:
        """The conv/linear layer whose output this layer normalizes, or ``None``."""
        producer: Producer | None = self.__dict__["_producer"]
        return producer

    def bind_producer(
        self, producer: nn.Module | None, note: str | None = None
    ) -> nn.Module | None:
        """Use ``producer`` (an ``nn.Conv1d/2d/3d`` or ``nn.Linear`` whose output is this
        layer's input) for the Taylor compensation; ``None`` (``note`` says why) or an
        unsupported module means naive pooling, with a one-time warning.

        Called by :func:`smallbn.bind_producers`; call it directly for models that tracing
        cannot pair.  Rebinding to another module empties the window.  Returns ``None``
        (the producer is used as is).
        """
        if (
            producer is not None
            and isinstance(producer, _PRODUCERS)
            and type(producer).forward is not _plain_forward(producer)
        ):
            # e.g. timm's Conv2dSame (pads in its forward), weight-standardized convs: the
            # derivatives below are those of the plain conv of the stored weight on the
            # module's input, which such a forward does not compute (a oneDNN shape error
            # at the first step, or silently wrong compensation).
            raise ValueError(
                f"{self.describe()}: bind_producer got a {type(producer).__name__}, whose "
                f"forward is not {_plain_class(producer).__name__}'s (it pads or transforms "
                f"its weight itself), so its statistics' derivatives are not those of a plain "
                f"conv. Leave the layer unbound (naive cross-iteration pooling) or replace "
                f"the producer by a plain {_plain_class(producer).__name__} that computes the "
                f"same (e.g. an explicit nn.ZeroPad2d before it)."
            )
        bound: Producer | None = producer if isinstance(producer, _PRODUCERS) else None
        if producer is not None and any(
            nn.parameter.is_lazy(p) for p in producer.parameters(recurse=False)
        ):
            raise ValueError(
                f"{self.describe()}: bind_producer got a {type(producer).__name__} whose "
                f"weights are not materialized yet (a lazy module): run one forward pass "
                f"first, then call smallbn.bind_producers(model) or layer.bind_producer(conv)."
            )
        if bound is not None and bound.weight.shape[0] != self.num_features:
            raise ValueError(
                f"{self.describe()}: bind_producer got a {type(bound).__name__} with "
                f"{bound.weight.shape[0]} output channels, but this layer normalizes "
                f"{self.num_features}: bind the layer whose output is this layer's input."
            )
        if producer is not None and bound is None:
            note = (
                f"{type(producer).__name__} is not supported (supported: "
                f"{', '.join(t.__name__ for t in _PRODUCERS)})"
            )
        previous = self.producer
        self.__dict__["_producer"] = bound
        self._sync_hook(force=True)
        if previous is not None and bound is not previous:
            # Stored derivatives belong to the other layer's weights.
            self.window_mean_grad = self.window_var_grad = None
            self._set_fill(0)
        if bound is None:
            if self.compensate:
                self._warn_once(
                    "no_producer",
                    f"no producing conv/linear layer ({note or 'none given'}): statistics are "
                    f"pooled across iterations without Taylor compensation (naive "
                    f"cross-iteration BN). If the input does come from a conv or linear "
                    f"layer, bind it with layer.bind_producer(conv).",
                )
            self.window_mean_grad = self.window_var_grad = None
            return None
        if self.window_size is not None and self.window_size > 1:
            self._prepare_grads(self.window_size)
        return None

    def train(self: _Layer, mode: bool = True) -> _Layer:
        """Switch training mode; the hook on the producer exists in training mode only (an
        eval-mode model has no hooks, so :func:`smallbn.fold` can fold its norms)."""
        super().train(mode)
        self._sync_hook()
        self._flush_warnings()
        return self

    def _sync_hook(self, force: bool = False) -> None:
        """Hook the producer while training, unhook it otherwise (``force``: rehook)."""
        handle = self.__dict__["_hook"]
        wanted = self.training and self.producer is not None
        if handle is not None and (force or not wanted):
            handle.remove()
            handle = None
            finalizer = _UNHOOK.pop(self, None)
            if finalizer is not None:
                finalizer.detach()
        if handle is None and wanted:
            assert self.producer is not None
            handle = self.producer.register_forward_hook(_ProducerHook(self))
            _UNHOOK[self] = weakref.finalize(self, handle.remove)
        self.__dict__["_hook"] = handle
        if handle is None:
            self.__dict__["_captured"] = None

    def _capture(self, args: tuple[Any, ...], output: Any) -> None:
        """From the hook on the producer: keep its input for this layer's next training step
        (a reference, dropped when the step uses it)."""
        if self.training and self.compensate:
            self.__dict__["_captured"] = (args[0] if args else None, output)

    def _producer_input(self, x: Tensor, captured: tuple[Any, Any] | None) -> Tensor | None:
        """The producer's input for this step's ``x``, or ``None`` (with a one-time warning)
        when ``x`` is not what the producer last returned."""
        producer = self.producer
        part = self.sample_slice  # set by GroupedNorm: x is these samples of the output
        produced = captured is not None and (
            captured[1] is x
            or (
                part is not None
                and isinstance(captured[1], Tensor)
                and captured[1][part].shape == x.shape
                and captured[1][part].data_ptr() == x.data_ptr()
            )
        )
        if captured is None or not produced or not isinstance(captured[0], Tensor):
            self._warn_once(
                "not_produced",
                f"the training input is not the output of the bound "
                f"{type(producer).__name__} (not called right before, called with keyword "
                f"arguments, or its output was replaced); such steps are stored without "
                f"Taylor compensation.",
            )
            return None
        u = captured[0] if part is None else captured[0][part]
        if isinstance(producer, nn.Linear) and (x.dim() != 2 or u.dim() != 2):
            self._warn_once(
                "linear_shape",
                f"a Linear producer is supported for (N, C) inputs only, got "
                f"{tuple(x.shape)}; such steps are stored without Taylor compensation.",
            )
            return None
        return u

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            text = f"{self.describe()}: {message}"
            if torch.compiler.is_compiling():
                # Dynamo cannot trace warnings.warn (a C builtin: a graph break, an error
                # under fullgraph=True): the next eager call (train()/eval(), an eager
                # training step) gives the message.
                self._pending_warnings = (*self._pending_warnings, text)
                return
            warnings.warn(text, RuntimeWarning, stacklevel=4)

    def _flush_warnings(self) -> None:
        """Give the warnings that compiled steps deferred (:meth:`_warn_once`)."""
        pending, self._pending_warnings = self._pending_warnings, ()
        for text in pending:
            warnings.warn(text, RuntimeWarning, stacklevel=3)

    # -- window state --------------------------------------------------------------------

    _checkpoint_rules = {
        **BatchStatsNorm._checkpoint_rules,
        "iteration": "count",
        "window_fill": "count",
        "window_mean": "finite",
        "window_var": "non-negative",
        "window_mean_dot": "finite",
        "window_var_dot": "finite",
        "window_mean_grad": "finite",
        "window_var_grad": "finite",
    }

    # The compensation is a difference of stored values, which bfloat16 would round to a few
    # percent: the window stays in float32 when the model is cast.
    _float32_buffers = (*_STAT_BUFFERS, *_GRAD_BUFFERS)

    def _state_dtype(self) -> torch.dtype:
        if self.window_mean is not None:
            return torch.promote_types(torch.float32, self.window_mean.dtype)
        reference = self.running_mean if self.running_mean is not None else self.weight
        base = reference.dtype if reference is not None else torch.float32
        return torch.promote_types(torch.float32, base)

    def _allocate_stats(self, k: int) -> None:
        factory: dict[str, Any] = {"device": self.iteration.device, "dtype": self._state_dtype()}
        for name in _STAT_BUFFERS:
            setattr(self, name, torch.zeros(k, self.num_features, **factory))

    def _grad_shapes(self, k: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        producer = self.producer
        if producer is None or not self.compensate:
            return None
        weight = producer.weight
        groups = producer.groups if isinstance(producer, _ConvNd) else 1
        per_channel = int(weight[0].numel())
        return (groups, k, per_channel), (int(weight.shape[0]), k, per_channel)

    def _prepare_grads(self, k: int) -> None:
        """Allocate the derivative buffers for the bound producer (or keep loaded ones of the
        right shape); fresh ones cannot compensate stored entries, so the window restarts."""
        shapes = self._grad_shapes(k)
        if shapes is None:
            return
        current = (self.window_mean_grad, self.window_var_grad)
        if all(t is not None and tuple(t.shape) == s for t, s in zip(current, shapes, strict=True)):
            return
        if any(t is not None for t in current):
            stored = [tuple(t.shape) for t in current if t is not None]
            self._warn_once(
                "grad_shape",
                f"the stored derivatives (shapes {stored}) do not fit the bound producer "
                f"({list(shapes)}): the window restarts.",
            )
        factory: dict[str, Any] = {"device": self.iteration.device, "dtype": self._state_dtype()}
        self.window_mean_grad = torch.zeros(shapes[0], **factory)
        self.window_var_grad = torch.zeros(shapes[1], **factory)
        self._set_fill(0)

    def _set_fill(self, fill: int) -> None:
        self._fill = fill
        self.window_fill.fill_(fill)

    def reset_window(self) -> None:
        """Forget the stored iterations (the iteration count, hence burn-in, is kept)."""
        self._set_fill(0)

    def _resolve_window(self, x: Tensor, batch: int | None = None) -> int:
        """k, chosen from ``batch`` (default: the batch of ``x``, summed over processes when
        syncing) if still to be chosen; allocates the window buffers."""
        k = self.window_size
        if k is None:
            if batch is None:
                batch = x.shape[0]
                group = self._sync_group()
                if group is not None:  # every process must choose the same k
                    batch = sum(_distributed.all_gather_sizes(batch, group, x.device))
            k = self._auto_window = recommended_window(max(batch, 1))
        if k > 1:
            if self.window_mean is None:
                self._allocate_stats(k)
            self._prepare_grads(k)
        return k

    def _slot_index(self, step: int, k: int, past: int, device: torch.device) -> Tensor:
        """Slots of iterations ``step − 1 … step − past`` (cached: no host→device copy)."""
        key = (step % k, past, k, device)  # k too: a loaded checkpoint may change it
        index = self._slots.get(key)
        if index is None:
            index = torch.tensor([(step - tau) % k for tau in range(1, past + 1)], device=device)
            self._slots[key] = index
        return index

    # -- training ------------------------------------------------------------------------

    def _forward_train(self, x: Tensor, factor: float | None) -> Tensor:
        if self._pending_warnings and not torch.compiler.is_compiling():
            self._flush_warnings()
        captured = self.__dict__["_captured"]
        # The producer's input is not kept past this step (past the last group of it when a
        # GroupedNorm calls this layer on consecutive groups of the producer's output).
        if self.sample_slice is None or (
            captured is not None and self.sample_slice.stop >= captured[1].shape[0]
        ):
            self.__dict__["_captured"] = None
        if not self.training:  # eval without running statistics: BN's batch statistics
            return self._batch_norm(x)[0]
        if self.statistics_pass:  # PreciseBN / batch_stats_eval: this batch alone, no state
            return self._normalize_current_batch(x, factor, self.norm_batch_size)
        size = self.norm_batch_size
        if size is not None and (x.shape[0] > size or self._sync_group() is not None):
            offset, total = 0, x.shape[0]
            group = self._sync_group()
            if group is not None:
                offset, total = _distributed.rank_offset(x.shape[0], group, x.device)
            if total > size:
                return self._forward_groups(x, factor, captured, offset, total)
        k = self._resolve_window(x)
        compiled = torch.compiler.is_compiling()
        plan = self._device_schedule(k) if compiled else self._host_schedule(k, x.device)
        local = self._sync_group() is None
        inside, drop = self.eps_placement == "inside", self.aggregation == "drop"
        fused = plan.past == 0 and inside  # plain BN: torch's fused kernel where unsynchronized
        if fused:
            y, moments = self._batch_norm(x)
        elif local:  # the gradient through them is _WindowNorm's
            moments = self._batch_moments(x, differentiable=False)
        else:
            moments = self._batch_moments(x)  # pooled across processes, with gradient
        if plan.record:
            self._record(x, moments.detach(), captured, plan.slot, plan.keep)
        dots = None
        if self._compensating() and (plan.record or plan.past > 0):
            dots = self._inner_products()
            if plan.record:  # the scalars ⟨∂, θ⟩ at record time, from the same batched product
                assert self.window_mean_dot is not None and self.window_var_dot is not None
                mean_dot, var_dot = (dot.index_select(0, plan.slot) for dot in dots)
                _put_slot(self.window_mean_dot, 0, plan.slot, mean_dot, plan.keep)
                _put_slot(self.window_var_dot, 0, plan.slot, var_dot, plan.keep)
        if not fused:
            if plan.past > 0:
                past_mean, past_var = self._past(plan.index, dots)
            else:  # eps outside the square root: not BN even without stored iterations
                past_mean = past_var = moments.mean.detach().new_zeros((0, self.num_features))
            if local:
                y = _WindowNorm.apply(
                    x, moments.mean, moments.var, self.weight, self.bias,
                    past_mean, past_var, plan.valid, self.eps, inside, drop,
                )  # fmt: skip
            else:  # moments pooled across processes: autograd through the all-gather
                mean, var, _ = _pool(
                    moments.mean, moments.var, past_mean, past_var, drop, plan.valid
                )
                inv_std = _inverse_std(var, self.eps, inside)
                scale, shift = affine_from_moments(mean, inv_std, self.weight, self.bias)
                y = apply_affine(x, scale, shift)
        self._update_running(moments.mean, moments.unbiased_var(), factor)
        if compiled:
            # The counters advance on the device only: a host int read by the compiled
            # step would be a guard on its value, so a recompilation at every step.  The
            # host copies are re-read once, by the next eager step that needs them.
            self.iteration.add_(1)
            assert isinstance(plan.fill, Tensor)
            self.window_fill.copy_(plan.fill)
            self._host_stale = True
        else:
            assert isinstance(plan.fill, int)
            self._iteration += 1
            self.iteration.fill_(self._iteration)
            self._set_fill(plan.fill)
        return y

    def _host_schedule(self, k: int, device: torch.device) -> _Schedule:
        """This step's schedule from the host-side counters (eager: no device work, the index
        tensors are cached per position in the window)."""
        step, fill = self._host_counters()
        past = min(self._window_at(step, k) - 1, fill)
        record = k > 1 and self._needs_record(step, k)
        slot = self._cached_index(("slot", step % k, device), lambda: [step % k], device)
        index = self._slot_index(step, k, past, device) if past > 0 else slot[:0]
        fill = min(fill + 1, k) if record else 0
        return _Schedule(past, record, slot, index, None, None, fill)

    def _device_schedule(self, k: int) -> _Schedule:
        """This step's schedule computed on the device from the ``iteration`` and
        ``window_fill`` buffers, for a compiled step: one graph for every step.

        Every stored slot is gathered (``past = k − 1``) and ``valid`` masks the entries
        the eager schedule would not pool, ``τ <= min(k_t − 1, fill)`` with ``k_t`` the
        burn-in window at iteration t; the slot ``t mod k`` is written where some iteration
        of the next ``k − 1`` pools it (``keep``; always after burn-in), and left as it was
        elsewhere, as the eager step leaves it.
        """
        step, fill = self.iteration, self.window_fill
        if k == 1:  # plain BN: no window, nothing stored
            empty = torch.zeros(0, dtype=torch.long, device=step.device)
            return _Schedule(0, False, empty, empty, None, None, torch.zeros_like(fill))
        taus = torch.arange(1, k, device=step.device)  # τ = 1 … k − 1
        slot = step.remainder(k).view(1)
        index = (step - taus).remainder(k)
        keep: Tensor | None = None
        if self.burnin == 0:  # the full window from the start (host-known)
            limit = fill.clamp_max(k - 1)
        else:
            limit = torch.minimum(self._window_on_device(step, k) - 1, fill)
            keep = (self._window_on_device(step + taus, k) - 1 >= taus).any()
        grown = (fill + 1).clamp_max(k)
        after = grown if keep is None else torch.where(keep, grown, 0)
        return _Schedule(k - 1, True, slot, index, taus <= limit, keep, after)

    def _window_on_device(self, step: Tensor, k: int) -> Tensor:
        """:meth:`_window_at` of iteration tensors (``burnin > 0``)."""
        if self.burnin_mode == "linear":
            during = 1 + (k - 1) * step // self.burnin
        else:
            during = torch.ones_like(step)
        return torch.where(step >= self.burnin, k, during)

    def _host_counters(self) -> tuple[int, int]:
        """``(iteration, fill)`` on the host; re-read from the buffers (one host read) after
        compiled steps, which advance the buffers only."""
        if self._host_stale:
            self._reload_host_state()
        return self._iteration, self._fill

    # -- simulated normalization batches ----------------------------------------------------

    def _forward_groups(
        self,
        x: Tensor,
        factor: float | None,
        captured: tuple[Any, Any] | None,
        offset: int,
        total: int,
    ) -> Tensor:
        """One training call on ``G = ceil(total/b)`` groups of ``b`` consecutive samples of
        the (global) batch, iterations ``t … t + G − 1``, all at once (module docstring).
        ``offset``: where this process's samples start in the global batch of ``total``."""
        size = self.norm_batch_size
        assert size is not None
        device, samples = x.device, x.shape[0]
        num = -(-total // size)
        smallest = (total - (num - 1) * size) * math.prod(x.shape[2:])
        if smallest <= 1:
            what = f"its smallest group of samples (norm_batch_size={size}, batch {total})"
            self._raise_too_small(x, smallest, what)
        index = self._cached_index(
            ("samples", offset, samples, size, device),
            lambda: [(offset + n) // size for n in range(samples)],
            device,
        )
        local = self._sync_group() is None
        if local and samples == num * size:  # equal groups: two passes over x, no merging
            with torch.no_grad():  # the gradient through them is _GroupedWindowNorm's
                xs = x.to(stats_dtype(x.dtype)).reshape(num, size, *x.shape[1:])
                mean, var = mean_var(xs, [1, *range(3, xs.dim())])
                values = float(size * math.prod(x.shape[2:]))
                groups = Moments(mean.new_full((num,), values), mean, var)
                self._check_finite(groups, x)
        elif local:
            with torch.no_grad():
                groups = self._grouped_moments(x, index, num)
        else:
            groups = self._grouped_moments(x, index, num)  # pooled across processes
        current = groups.detach()
        k = self._resolve_window(x, batch=size)
        step, fill = self._host_counters()
        pasts, records, fill = self._group_schedule(step, fill, num, k)
        # The timeline: the groups' own moments at positions 0 … G − 1, then the stored
        # iterations t − 1, t − 2, … (compensated) at G, G + 1, …
        stored = max(max(past - g for g, past in enumerate(pasts)), 0)
        timeline_mean, timeline_var = current.mean, current.var
        if stored:
            dots = self._inner_products() if self._compensating() else None
            old_mean, old_var = self._past(self._slot_index(step, k, stored, device), dots)
            timeline_mean = torch.cat([timeline_mean, old_mean.to(timeline_mean.dtype)])
            timeline_var = torch.cat([timeline_var, old_var.to(timeline_var.dtype)])
        # Entry τ = 1 … k − 1 of group g: iteration t + g − τ, pooled if τ <= pasts[g].
        key = (num, stored, tuple(pasts), k, device)
        gather = self._cached_index(
            ("gather", *key),
            lambda: [
                [(g - tau if tau <= g else num + tau - g - 1) if tau <= past else 0
                 for tau in range(1, k)]
                for g, past in enumerate(pasts)
            ],
            device,
        )  # fmt: skip
        valid = self._cached_index(
            ("valid", *key),
            lambda: [[tau <= past for tau in range(1, k)] for past in pasts],
            device,
            torch.bool,
        )
        past_mean, past_var = timeline_mean[gather], timeline_var[gather]  # (G, k − 1, C)
        # Records that a later call can read: the last k groups' (records are monotone in t).
        recorded = [g for g in range(max(num - k, 0), num) if records[g]]
        if recorded:
            slots = self._record_groups(x, current, captured, step, k, recorded[0], offset)
            if self._compensating():
                # ⟨∂, θ⟩ at record time, from the batched product that later calls repeat.
                assert self.window_mean_dot is not None and self.window_var_dot is not None
                dots = self._inner_products()
                self.window_mean_dot.index_copy_(0, slots, dots[0].index_select(0, slots))
                self.window_var_dot.index_copy_(0, slots, dots[1].index_select(0, slots))
        inside, drop = self.eps_placement == "inside", self.aggregation == "drop"
        if local:
            y = _GroupedWindowNorm.apply(
                x, groups.mean, groups.var, groups.count, index, self.weight, self.bias,
                past_mean, past_var, valid, self.eps, inside, drop,
            )  # fmt: skip
        else:  # moments pooled across processes: autograd through the all-gather
            mean, var, _ = _pool_groups(groups.mean, groups.var, past_mean, past_var, valid, drop)
            inv_std = _inverse_std(var, self.eps, inside)
            scale, shift = affine_from_moments(mean, inv_std, self.weight, self.bias)
            y = apply_affine(x, scale[index], shift[index])
        if factor is not None:
            self._update_running_groups(current)
        self._iteration += num
        self.iteration.fill_(self._iteration)
        self._set_fill(fill)
        return y

    def _group_schedule(
        self, step: int, fill: int, num: int, k: int
    ) -> tuple[list[int], list[bool], int]:
        """For iterations ``step … step + num − 1``: the stored iterations each pools, whether
        each is recorded, and the window fill after the last — :meth:`_forward_train`'s
        bookkeeping, iteration by iteration."""
        pasts, records = [], []
        for t in range(step, step + num):
            pasts.append(min(self._window_at(t, k) - 1, fill))
            record = k > 1 and (t >= self.burnin or self._needs_record(t, k))
            records.append(record)
            fill = min(fill + 1, k) if record else 0
        return pasts, records, fill

    def _cached_index(
        self,
        key: tuple[Any, ...],
        build: Callable[[], list[Any]],
        device: torch.device,
        dtype: torch.dtype = torch.long,
    ) -> Tensor:
        """``torch.tensor(build())`` on ``device``, built once per ``key``."""
        cache: dict[tuple[Any, ...], Tensor] = self.__dict__.setdefault("_group_index", {})
        index = cache.get(key)
        if index is None:
            if len(cache) >= 256:  # burn-in ramps make new schedules: keep it small
                cache.clear()
            index = torch.tensor(build(), dtype=dtype, device=device)
            cache[key] = index
        return index

    @torch.no_grad()
    def _record_groups(
        self,
        x: Tensor,
        groups: Moments,
        captured: tuple[Any, Any] | None,
        step: int,
        k: int,
        first: int,
        offset: int,
    ) -> Tensor:
        """Store groups ``first … G − 1`` (iterations ``step + first …``) in their slots, as
        :meth:`_record` stores one iteration; the derivatives of all of them come from one
        batched computation (:func:`_group_derivatives`).  Returns the slots."""
        size = self.norm_batch_size
        assert size is not None
        assert self.window_mean is not None and self.window_var is not None
        chosen = groups.mean.shape[0] - first
        slots = self._cached_index(
            ("slots", (step + first) % k, chosen, k, x.device),
            lambda: [(step + first + g) % k for g in range(chosen)],
            x.device,
        )
        self.window_mean.index_copy_(0, slots, groups.mean[first:].to(self.window_mean.dtype))
        self.window_var.index_copy_(0, slots, groups.var[first:].to(self.window_var.dtype))
        producer = self.producer
        if producer is None:
            self.window_mean_grad = self.window_var_grad = None  # as in _record
            if self.compensate:
                self._warn_once(
                    "no_producer",
                    "no producing layer is bound (call smallbn.bind_producers(model) after "
                    "building the model, or layer.bind_producer(conv)): statistics are pooled "
                    "across iterations without Taylor compensation (naive cross-iteration BN).",
                )
            return slots
        if self.window_var_grad is None or self.window_mean_grad is None:
            return slots  # compensate=False
        dtype = self.window_var_grad.dtype
        u = self._producer_input(x, captured)
        if u is not None:
            # This process's samples of the recorded groups, laid out (chosen, b, ...).
            begin = first * size
            start = max(begin - offset, 0)
            lead = max(offset - begin, 0) if start < x.shape[0] else 0
            with torch.autocast(x.device.type, enabled=False):
                grads = _group_derivatives(
                    producer,
                    _as_groups(u, start, lead, chosen, size),
                    _as_groups(x, start, lead, chosen, size),
                    groups.mean[first:],
                    groups.count[first:],
                    dtype,
                )
        else:
            grads = (
                self.window_mean_grad.new_zeros(chosen, *self.window_mean_grad[:, 0].shape),
                self.window_var_grad.new_zeros(chosen, *self.window_var_grad[:, 0].shape),
            )
        group = self._sync_group()
        if group is not None:  # each process's share is divided by the pooled count
            mean_grad, var_grad = grads
            flat = torch.cat([mean_grad.flatten(), var_grad.flatten()])
            dist.all_reduce(flat, group=group)
            grads = (
                flat[: mean_grad.numel()].view_as(mean_grad),
                flat[mean_grad.numel() :].view_as(var_grad),
            )
        self.window_mean_grad.index_copy_(1, slots, grads[0].transpose(0, 1).to(dtype))
        self.window_var_grad.index_copy_(1, slots, grads[1].transpose(0, 1).to(dtype))
        return slots

    @torch.no_grad()
    def _update_running_groups(self, groups: Moments) -> None:
        """BN's running average updated once per group, in order, as ``G`` calls would: in
        closed form, ``r ← (1 − m)^G r + Σ_g m (1 − m)^(G−1−g) s_g`` (``momentum=None``:
        the cumulative average, counting groups); ``num_batches_tracked`` counts the groups."""
        running_mean, running_var = self.running_stats()
        assert self.num_batches_tracked is not None
        num, channels = groups.mean.shape
        dtype = torch.promote_types(running_mean.dtype, groups.mean.dtype)
        start = torch.cat([running_mean.to(dtype), running_var.to(dtype)])
        values = torch.cat([groups.mean, groups.unbiased_var()], dim=1).to(dtype)
        momentum = self.momentum
        if momentum is None:
            # The forward template counted one step already: ``seen`` came before (factor
            # 1/(seen + g + 1) for group g), so r ← (seen·r + Σ_g s_g) / (seen + G).  A
            # device tensor (an exact integer, promoted as a host int would be): no host read.
            seen = self.num_batches_tracked - 1
            after = (start * seen + values.sum(0)) / (seen + num)
        else:
            keep = 1.0 - momentum
            weights = self._cached_index(
                ("ema", num, momentum, dtype, values.device),
                lambda: [momentum * keep ** (num - 1 - g) for g in range(num)],
                values.device,
                dtype,
            )
            after = torch.addmv(start, values.t(), weights, beta=keep**num)
        running_mean.copy_(after[:channels])
        running_var.copy_(after[channels:])
        self.num_batches_tracked.add_(num - 1)

    @torch.no_grad()
    def _record(
        self,
        x: Tensor,
        moments: Moments,
        captured: tuple[Any, Any] | None,
        slot: Tensor,
        keep: Tensor | None = None,
    ) -> None:
        """Store this iteration's statistics and derivatives in ``slot`` (a one-element
        index), where ``keep`` (a 0-dim bool on the device, if given) is true."""
        assert self.window_mean is not None and self.window_var is not None
        _put_slot(self.window_mean, 0, slot, moments.mean.unsqueeze(0), keep)
        _put_slot(self.window_var, 0, slot, moments.var.unsqueeze(0), keep)
        producer = self.producer
        if producer is None:
            # Entries stored from now on have no derivatives: drop stale ones (e.g. loaded
            # before a producer was bound), so that a later binding restarts the window.
            self.window_mean_grad = self.window_var_grad = None
            if self.compensate:
                self._warn_once(
                    "no_producer",
                    "no producing layer is bound (call smallbn.bind_producers(model) after "
                    "building the model, or layer.bind_producer(conv)): statistics are pooled "
                    "across iterations without Taylor compensation (naive cross-iteration BN).",
                )
            return
        if self.window_var_grad is None or self.window_mean_grad is None:
            return  # compensate=False
        dtype = self.window_var_grad.dtype
        u = self._producer_input(x, captured)
        group = self._sync_group()
        with torch.autocast(x.device.type, enabled=False):
            if u is not None:
                # Unsynchronized, the count is this batch's, known on the host from the shape.
                count = moments.count if group is not None else float(x.numel() // x.shape[1])
                grads = _producer_derivatives(producer, u, x, moments.mean, count, dtype)
            else:
                grads = (
                    self.window_mean_grad.new_zeros(self.window_mean_grad[:, 0].shape),
                    self.window_var_grad.new_zeros(self.window_var_grad[:, 0].shape),
                )
        if group is not None:
            # Each process's share is already divided by the pooled count: sum them.
            mean_grad, var_grad = grads
            flat = torch.cat([mean_grad.flatten(), var_grad.flatten()])
            dist.all_reduce(flat, group=group)
            grads = (
                flat[: mean_grad.numel()].view_as(mean_grad),
                flat[mean_grad.numel() :].view_as(var_grad),
            )
        _put_slot(self.window_mean_grad, 1, slot, grads[0].unsqueeze(1), keep)
        _put_slot(self.window_var_grad, 1, slot, grads[1].unsqueeze(1), keep)

    def _compensating(self) -> bool:
        return (
            self.compensate
            and self.producer is not None
            and self.window_var_grad is not None
            and self.window_mean_grad is not None
        )

    @torch.no_grad()
    def _inner_products(self) -> tuple[Tensor, Tensor]:
        """``(⟨∂μ, θ_t⟩, ⟨∂σ², θ_t⟩)`` of every slot with the current weights, ``(k, C)`` each.

        One batched product over the whole window: a slot's value does not depend on which
        slots are in use, so it is bit-for-bit the one recorded while θ is unchanged.
        """
        producer = self.producer
        assert producer is not None
        assert self.window_mean_grad is not None and self.window_var_grad is not None
        mean_grad, var_grad = self.window_mean_grad, self.window_var_grad
        groups, k, per_channel = mean_grad.shape
        channels = var_grad.shape[0]
        weight = producer.weight.detach().to(var_grad.dtype).reshape(channels, per_channel)
        with torch.autocast(weight.device.type, enabled=False):  # bmm would run in half
            # (C, 1, P) @ (C, P, k): a transposed operand, no copy; twice as fast on CPU
            # as (C, k, P) @ (C, P, 1).
            var_dot = torch.bmm(weight.unsqueeze(1), var_grad.transpose(1, 2)).reshape(channels, k)
            var_dot = var_dot.t()
            mean_dot = torch.bmm(
                weight.reshape(groups, channels // groups, per_channel), mean_grad.transpose(1, 2)
            ).reshape(channels, k)
        bias = producer.bias
        if bias is not None:  # ∂μ/∂b = 1, ∂σ²/∂b = 0
            mean_dot = mean_dot + bias.detach().to(mean_dot.dtype).unsqueeze(1)
        return mean_dot.t(), var_dot

    @torch.no_grad()
    def _past(self, index: Tensor, dots: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``(μ, σ²)`` of the stored iterations in slots ``index``, ``(past, C)``, moved to the
        current weights with ``dots`` (the current inner products) if given."""
        assert self.window_mean is not None and self.window_var is not None
        assert self.window_mean_dot is not None and self.window_var_dot is not None
        past_mean = self.window_mean.index_select(0, index)
        past_var = self.window_var.index_select(0, index)
        if dots is not None:
            shift = dots[0].index_select(0, index) - self.window_mean_dot.index_select(0, index)
            spread = dots[1].index_select(0, index) - self.window_var_dot.index_select(0, index)
            # ν(θ_t) − μ(θ_t)² to first order: σ² + ⟨∂σ², Δθ⟩ − ⟨∂μ, Δθ⟩².
            past_var = past_var + spread - shift.square()
            past_mean = past_mean + shift
        return past_mean, past_var

    # -- checkpoints -----------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        stored = state_dict.get(prefix + "window_mean")
        if stored is not None and self.window is not None and stored.shape[0] != self.window:
            error_msgs.append(
                f"{self.describe()}: the checkpoint holds a window of {stored.shape[0]} "
                f"iterations, this layer was built with window={self.window}. Build it with "
                f"window={stored.shape[0]} (or window=None to take the checkpoint's)."
            )
            for name in (*_STAT_BUFFERS, *_GRAD_BUFFERS):
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._reload_host_state()

    def _reload_host_state(self) -> None:
        self._iteration = int(self.iteration)
        self._fill = min(int(self.window_fill), self.window_size or 1)
        self._host_stale = False

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Make the window buffers fit the checkpoint: create those it has (their shapes
        depend on the producer and the window, so this layer may not have them yet), and
        give those it lacks an empty window (a BN checkpoint starts CBN afresh)."""
        fresh = False
        for name in (*_STAT_BUFFERS, *_GRAD_BUFFERS):
            key = prefix + name
            mine = getattr(self, name)
            if key in state_dict:
                stored = state_dict[key]
                if mine is None or mine.shape != stored.shape:
                    dtype = mine.dtype if mine is not None else self._state_dtype()
                    setattr(
                        self,
                        name,
                        torch.zeros(stored.shape, dtype=dtype, device=self.iteration.device),
                    )
            elif mine is not None:
                # Without these the stored entries cannot be used (or compensated).
                state_dict[key] = torch.zeros_like(mine)
                fresh = True
        if prefix + "iteration" not in state_dict:
            state_dict[prefix + "iteration"] = torch.zeros_like(self.iteration)
            fresh = True
        if fresh or prefix + "window_fill" not in state_dict:
            state_dict[prefix + "window_fill"] = torch.zeros_like(self.window_fill)


class CrossIterationBatchNorm1d(CrossIterationBatchNorm):
    """Cross-Iteration BN for ``(N, C)`` or ``(N, C, L)`` inputs (after a Linear or Conv1d)."""

    _input_dim = 1


class CrossIterationBatchNorm2d(CrossIterationBatchNorm):
    """Cross-Iteration BN for ``(N, C, H, W)`` inputs (after a Conv2d)."""

    _input_dim = 2


class CrossIterationBatchNorm3d(CrossIterationBatchNorm):
    """Cross-Iteration BN for ``(N, C, D, H, W)`` inputs (after a Conv3d)."""

    _input_dim = 3
