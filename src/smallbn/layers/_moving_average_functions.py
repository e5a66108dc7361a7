"""Moving Average BN's per-step statistics and autograd Function (the kernels of
:mod:`smallbn.layers.moving_average`, whose docstring and docs/methods.md's MABN section
give the math; kept apart from the module as torch keeps ``nn/modules/_functions.py``).

One call (:func:`mabn_function`) is ``G`` consecutive SMA steps, one per group of
``norm_batch_size`` samples (``G = 1`` without groups).  :func:`_statistics` computes, per
group and channel and without autograd, ``χ² = E_R[x²]``, ``v`` (``χ²`` during warm-up, the
SMA of the χ² window after), ``r = clamp(sqrt((v + eps)/(running_var + eps)), r_min, r_max)``
against the running variance before each step (:func:`smallbn.stats.ema_sequence`) and the
running variance after the last; :class:`_MABNFunction` applies ``y = γ·r·x/sqrt(v + eps) + β``
and writes out the moving-average backward ``∂L/∂x = (ĝ − z·Ψ̄)/sqrt(v + eps)``,
``ĝ = ∂L/∂y·γ·r``, pushing ``Ψ = E_R[ĝ·z]`` into the Ψ window.  Synchronized, the per-group
sums and counts of all processes are all-reduced, groups being formed over the
concatenation of all processes' batches (:func:`smallbn.stats.sample_groups`).

Cost: the forward reads ``x`` twice (per-sample ``Σx²``, then ``y = a·x + β``) and the backward
three times (one fused pass for ``Σ dy·x`` and ``Σ dy`` per sample and channel, then
``∂L/∂x = A·dy + B·x``); the per-step logic (windows, EMA sequence, clamping) works on
``(groups, C)`` tensors with a fixed number of operations, whatever the number of groups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from smallbn import _distributed
from smallbn.layers._sliding_window import (
    HostCount,
    SlidingWindow,
    _as,
    _window_means,
    _window_push,
)
from smallbn.stats import (
    channel_view,
    ema_sequence,
    first_order_only,
    sample_groups,
    stats_dtype,
)

__all__ = ["RELEASE_CLAMP_START", "MABNPlan", "mabn_function"]

#: The release holds r = 1 for max(RELEASE_CLAMP_START, warm-up) iterations.
RELEASE_CLAMP_START = 1000

#: Per-step switches (warm-up over, clamping started) of ``G`` consecutive SMA steps: Python
#: bools when the step is known on the host, a ``(G,)`` bool tensor when it lives on the device.
Flags = list[bool] | Tensor


def _compiling() -> bool:
    """Whether this code runs under ``torch.compile`` (one indirection, so that tests run
    the compiled path's device-side bookkeeping eagerly against the float64 reference)."""
    return torch.compiler.is_compiling()


def _snapshot(t: Tensor) -> Tensor:
    """``t`` as it is now.  Under ``torch.compile``, through a ``cat`` with a fresh element:
    AOTAutograd's min-cut partitioner may recompute cheap pointwise values in the backward
    from the buffers they were computed from instead of saving them, and this step updates
    those buffers in place (the running variance, the χ² window, the step count), so the
    backward silently saw the updated buffers (another ``r``, ``v`` or switch to the SMA;
    pytorch/pytorch#197039, as for Batch Renorm).  ``cat`` is not in the partitioner's list
    of recomputable ops, so what is computed from the snapshot is computed from the values
    this step read.  Eager: ``t`` itself."""
    if not _compiling():
        return t
    return torch.cat([t.reshape(-1), t.new_zeros(1)])[:-1].view(t.shape)


def _step_flags(step: int | Tensor, groups: int, start: int, enabled: bool = True) -> Flags:
    """Whether each of the steps ``step, …, step + groups − 1`` is at least ``start``: Python
    bools for a host step, a ``(groups,)`` bool tensor for a device step, and constant lists
    wherever the answer does not depend on the step (``start = 0``, not ``enabled``), which
    then costs no masking."""
    if not enabled:
        return [False] * groups
    if start <= 0:
        return [True] * groups
    if isinstance(step, Tensor):
        return step + torch.arange(groups, device=step.device) >= start
    return [step + k >= start for k in range(groups)]


@dataclass(slots=True)
class MABNPlan:
    """Everything of one MABN call besides ``x``, ``γ``, ``β`` (constants for autograd).

    Attributes:
        eps: added to ``v`` inside the square roots.
        group_size: samples per simulated normalization batch (``None``: the whole batch).
        step: the number of SMA steps taken before this call: a host integer (every
            per-step decision is then Python control flow on it), or a 0-dim long tensor
            (the decisions are made on the device: no host read, and no value that
            ``torch.compile`` would specialize a graph on).
        chi2: the χ² window (read, not written: the caller pushes the returned χ²).
        psi: the Ψ window, read and pushed in backward; ``None``: Ψ̄ = Ψ_t, nothing stored.
        use_window: whether steps past ``warmup`` use the SMAs (``False``: each group's own
            statistics only, as in eval mode without running statistics).
        warmup: steps using ``χ²_t``, ``Ψ_t`` alone.
        running_var: EMA of ``v`` before the call (``None``: not tracked, ``r = 1``).
        momentum: weight of the new value in the EMA (``None``: cumulative average).
        clamp_start: first step with ``r ≠ 1``.
        r_min, r_max: bounds of ``r``.
        process_group: group to pool statistics over, or ``None``.
        check_finite: raises on (or records) non-finite ``χ²`` (``(groups, C)``), or
            ``None``; called by :func:`mabn_function` before it returns.
    """

    eps: float
    group_size: int | None
    step: int | Tensor
    chi2: SlidingWindow
    psi: SlidingWindow | None
    use_window: bool = True
    warmup: int = 100
    running_var: Tensor | None = None
    momentum: float | None = 0.02
    clamp_start: int = RELEASE_CLAMP_START
    r_min: float = 0.2
    r_max: float = 5.0
    process_group: _distributed.ProcessGroup | None = None
    check_finite: Callable[[Tensor], None] | None = None


# -- helpers on (N, C, *spatial) tensors -------------------------------------------------------


def _per_sample_square_sums(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_spatial x²`` per sample and channel, ``(N, C)`` in ``dtype``.

    ``vector_norm`` over the spatial dims is one vectorized pass (several times faster on CPU
    than ``x.square().sum()``, which writes a temporary, or ``var_mean``); squaring the norm
    costs a rounding of ~1 ulp.
    """
    if x.dim() == 2:
        return x.to(dtype).square()
    return torch.linalg.vector_norm(x, dim=tuple(range(2, x.dim())), dtype=dtype).square()


#: torch's BN backward kernel (the overload itself: no per-call overload resolution).
_BN_BACKWARD_REDUCE = torch.ops.aten.native_batch_norm_backward.default


def _sum_groups(per_group: Tensor) -> Tensor:
    """``(G, C)`` → ``(C,)`` sum over groups (a free view for one group)."""
    return per_group.view(-1) if per_group.shape[0] == 1 else per_group.sum(0)


@functools.lru_cache(maxsize=64)
def _zeros_ones(size: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Constant ``(zeros(size), ones(size))`` (never written), the "mean" and "inverse std"
    that turn torch's BN backward reduction into plain sums; cached to save two allocations
    per step."""
    return torch.zeros(size, dtype=dtype, device=device), torch.ones(
        size, dtype=dtype, device=device
    )


def _dots(dy: Tensor, x: Tensor, per_sample: bool) -> tuple[Tensor, Tensor]:
    """``(Σ dy·x, Σ dy)`` per channel over ``(N, *spatial)`` (``(1, C)`` each), or with
    ``per_sample`` per sample and channel over ``*spatial`` (``(N, C)`` each).

    On CPU, for contiguous float32/float64 tensors, both come from one fused pass of torch's
    BN backward reduction (with mean 0 and inverse std 1 its "grad_weight" is ``Σ dy·x`` and
    its "grad_bias" ``Σ dy``), per sample over the free view ``(1, N·C, spatial)``.  Compiled
    graphs take the plain reductions, which the compiler fuses itself.
    """
    n, c = x.shape[:2]
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and dy.dtype == x.dtype
        and x.is_contiguous()
        and dy.is_contiguous()
        and n * c > 0
        and not _compiling()
    ):
        channels = n * c if per_sample else c
        zeros, ones = _zeros_ones(channels, x.dtype, x.device)
        shape = (1, n * c, -1) if per_sample else (n, c, -1)
        _, dot, total = _BN_BACKWARD_REDUCE(
            dy.view(shape),
            x.view(shape),
            ones,
            None,
            None,
            zeros,
            ones,
            True,
            0.0,
            [False, True, True],
        )
        rows = (n, c) if per_sample else (1, c)
        return dot.view(rows), total.view(rows)
    dims = tuple(range(2, x.dim())) if per_sample else (0, *range(2, x.dim()))
    if not dims:  # (N, C) per sample: the values themselves
        return dy * x, dy
    return (dy * x).sum(dim=dims).view(-1, c), dy.sum(dim=dims).view(-1, c)


@dataclass(slots=True)
class _Groups:
    """How a batch splits into simulated normalization batches (consecutive SMA steps):
    ``count`` groups of ``size`` consecutive samples (:func:`smallbn.stats.sample_groups`;
    synchronized, of the concatenation of all processes' batches in rank order, this
    process's samples starting at ``offset``), or ``size=None``: one group, the whole batch
    (all processes' batches, synchronized).  ``index``: each local sample's group, ``(N,)``
    (``None`` for one group); ``sizes``: this process's values per channel in each group."""

    count: int  # number of groups (of the global batch, synchronized)
    size: int | None
    sizes: list[int]
    offset: int = 0
    index: Tensor | None = None


def _group_total(per_sample: Tensor, count: int, size: int | None, offset: int = 0) -> Tensor:
    """Sum ``(N, C)`` per-sample values into ``(count, C)`` group values (groups of ``size``
    consecutive samples, this process's first sample at position ``offset`` of the global
    batch; groups without local samples sum to 0).  A reshape of the rows padded to whole
    groups, not an ``index_add`` (inductor's CPU code for an index_add with a constant index
    fails, torch 2.13)."""
    if size is None:
        return per_sample.sum(0, keepdim=True)
    n, c = per_sample.shape
    if n == 0:
        return per_sample.new_zeros(count, c)
    first = offset // size  # the first group holding a local sample
    before = offset - first * size  # its samples on earlier processes
    held = -(-(before + n) // size)  # the groups holding local samples
    parts = [per_sample]
    if before:
        parts.insert(0, per_sample.new_zeros(before, c))
    if held * size != before + n:
        parts.append(per_sample.new_zeros(held * size - before - n, c))
    padded = parts[0] if len(parts) == 1 else torch.cat(parts)
    totals = padded.reshape(held, size, c).sum(1)
    if held == count:
        return totals
    # synchronized: zeros for the groups that other processes hold alone
    return torch.cat(
        [totals.new_zeros(first, c), totals, totals.new_zeros(count - first - held, c)]
    )


def _group_spread(per_group: Tensor, index: Tensor | None) -> Tensor:
    """``(count, C)`` → per sample ``(N, C)`` by each sample's group ``index`` (or
    ``(1, C)`` for a single group, ``index=None``)."""
    return per_group if index is None else per_group.index_select(0, index)


def _group_dots(
    dy: Tensor, x: Tensor, count: int, size: int | None, offset: int
) -> tuple[Tensor, Tensor]:
    """``(Σ dy·x, Σ dy)`` per group and channel, ``(count, C)`` each."""
    if size is None:
        return _dots(dy, x, per_sample=False)
    dots, sums = _dots(dy, x, per_sample=True)
    return _group_total(dots, count, size, offset), _group_total(sums, count, size, offset)


def _normalization_groups(
    x: Tensor, group_size: int | None, process_group: _distributed.ProcessGroup | None
) -> _Groups:
    """The groups of a call (:class:`_Groups`).  Synchronized with ``group_size``, groups are
    formed over the concatenation of all processes' batches in rank order (as for every
    layer with ``norm_batch_size``), so a group may span two processes; where this process's
    samples start is one host read (the ranks' batch sizes), and an empty global batch gives
    no group (``count = 0``)."""
    n = x.shape[0]
    per_sample = math.prod(x.shape[2:])
    if group_size is None or (group_size >= n and process_group is None):
        return _Groups(1, None, [n * per_sample])
    offset, total = 0, n
    if process_group is not None:
        offset, total = _distributed.rank_offset(n, process_group, x.device)
        if total == 0:
            return _Groups(0, group_size, [])
        if total <= group_size:
            return _Groups(1, None, [n * per_sample])
    groups = sample_groups(n, group_size, x.device, offset, total)
    end = offset + n
    # this process's samples in group k: the overlap of [k·b, (k+1)·b) with [offset, end)
    local = [
        max(min((k + 1) * group_size, end) - max(k * group_size, offset), 0)
        for k in range(groups.count)
    ]
    return _Groups(groups.count, group_size, [k * per_sample for k in local], offset, groups.index)


def _select(flags: Flags, when: Callable[[], Tensor], otherwise: Callable[[], Tensor]) -> Tensor:
    """Row ``k`` of ``when()`` where ``flags[k]``, else of ``otherwise()``; with host flags
    each is evaluated only if needed (the common all-or-nothing cases cost no masking)."""
    if isinstance(flags, Tensor):
        return torch.where(flags.unsqueeze(1), when(), otherwise())
    if not any(flags):
        return otherwise()
    chosen = when()
    if all(flags):
        return chosen
    mask = torch.tensor(flags, device=chosen.device).unsqueeze(1)
    return torch.where(mask, chosen, otherwise())


# -- the forward statistics and the autograd Function -----------------------------------------


@dataclass(slots=True)
class _Statistics:
    """What the forward computes besides ``y`` (constants for autograd), per group ``(G, C)``:
    ``χ²``, ``v``, ``r``, ``1/sqrt(v + eps)``; the running variance after the call (``(C,)``,
    empty if not tracked); the counts (a host float for one unsynchronized group); the
    switches to the SMA; and ``valid`` (synchronized layers: a 0-dim bool, false where every
    process had an empty batch, which then changes no state; ``None``: decided on the host)."""

    groups: _Groups
    chi2: Tensor
    var: Tensor
    r: Tensor | None
    inv_std: Tensor
    running_after: Tensor
    counts: Tensor | float
    use_sma: Flags
    valid: Tensor | None
    empty: bool


@torch.no_grad()
def _statistics(x: Tensor, plan: MABNPlan) -> _Statistics:
    """The forward's per-group statistics (module docstring), without gradient: the
    backward is written out (:class:`_MABNFunction`).  No state is modified."""
    compute = stats_dtype(x.dtype)
    group = plan.process_group
    groups = _normalization_groups(x, plan.group_size, group)
    sums = _group_total(
        _per_sample_square_sums(x, compute), groups.count, groups.size, groups.offset
    )
    counts: Tensor | float
    valid = None
    if group is None or groups.count == 0:
        # Only an empty batch or no spatial extent has no values (synchronized with groups:
        # an empty batch on every process, known from the ranks' batch sizes).
        empty = groups.count == 0 or groups.sizes[0] == 0
        # host counts: a Python divisor for one group, a small tensor for several
        counts = (
            float(groups.sizes[0])
            if groups.count == 1
            else sums.new_tensor(groups.sizes).unsqueeze(1)
        )
    else:
        packed = torch.cat([sums, sums.new_tensor(groups.sizes).unsqueeze(1)], dim=1)
        dist.all_reduce(packed, group=group)
        sums, pooled = packed[:, :-1], packed[:, -1:]
        # An empty batch on every process: decided on the device (the caller keeps the
        # state as it is where ``valid`` is false); counts of 1 make its χ² 0, not NaN.
        empty, valid = False, pooled[0, 0] > 0
        counts = pooled.clamp_min(1)
    if empty:  # nothing to normalize or record
        nothing = x.new_empty(0, dtype=compute)
        return _Statistics(groups, nothing, nothing, None, nothing, nothing, 1.0, [], None, True)
    chi2 = sums / counts
    # The buffers this step updates afterwards, read once (see _snapshot).
    step = _snapshot(plan.step) if isinstance(plan.step, Tensor) else plan.step
    use_sma = _step_flags(step, groups.count, plan.warmup, plan.use_window)
    window = plan.chi2
    var = _select(
        use_sma,
        lambda: _window_means(_snapshot(window.values), _snapshot(window.count), window.host, chi2),
        lambda: chi2,
    )
    var_eps = var + plan.eps
    inv_std = torch.rsqrt(var_eps)
    r = None
    running_after = var.new_empty(0)
    if plan.running_var is not None:
        before, running_after = ema_sequence(
            _as(_snapshot(plan.running_var), var.dtype), var, step, plan.momentum
        )

        def clamped() -> Tensor:
            ratio = torch.div(var_eps, before + plan.eps).sqrt_()
            return ratio.clamp_(plan.r_min, plan.r_max)

        clamp = _step_flags(step, groups.count, plan.clamp_start)
        if isinstance(clamp, Tensor) or any(clamp):
            r = _select(clamp, clamped, lambda: torch.ones_like(var))
    return _Statistics(groups, chi2, var, r, inv_std, running_after, counts, use_sma, valid, False)


class _MABNFunction(torch.autograd.Function):
    """``y = γ·r·x/sqrt(v + eps) + β`` per group, and MABN's moving-average backward (module
    docstring, formulas), for statistics computed beforehand (:func:`_statistics`).

    Inputs ``x, weight, bias`` (differentiable), the per-group ``inv_std = 1/sqrt(v + eps)``
    and ``r`` (``None``: 1), the counts, each sample's group (``None``: one group), the SMA
    switches, the Ψ window (``None``: Ψ̄ = Ψ_t) and the constants of :class:`_Backward`.  The
    backward pushes ``Ψ`` into the Ψ window.

    The ctx holds only tensors, Python constants and plain functions' inputs, so that
    ``torch.compile`` traces forward and backward (dynamo cannot trace method calls on
    objects stored on a ctx); the window push in backward is a mutation of a forward input,
    which AOTAutograd keeps in the compiled backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        inv_std: Tensor,
        r: Tensor | None,
        counts: Tensor | float,
        index: Tensor | None,
        use_sma: Tensor | None,
        psi_values: Tensor | None,
        psi_count: Tensor | None,
        valid: Tensor | None,
        static: _Backward,
    ) -> Tensor:
        compute = stats_dtype(x.dtype)
        scale = inv_std if r is None else r * inv_std  # ∂y/∂x / γ with v and r constant
        slope = scale if weight is None else scale * _as(weight, compute)
        xs = _as(x, compute)
        y = xs * channel_view(_group_spread(slope, index), x)
        if bias is not None:
            y = y.add_(channel_view(_as(bias, compute), x))
        ctx.save_for_backward(x)
        ctx.index = index
        ctx.scale, ctx.slope, ctx.inv_std, ctx.counts = scale, slope, inv_std, counts
        ctx.use_sma, ctx.valid, ctx.static = use_sma, valid, static
        ctx.psi_values, ctx.psi_count = psi_values, psi_count
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return _as(y, x.dtype)

    @staticmethod
    @first_order_only("Moving Average BN (MABN)")
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        static: _Backward = ctx.static
        compute = stats_dtype(x.dtype)
        # An unused output still takes part: a synchronized backward must run the collective
        # on every rank, and Ψ = 0 is what a zero gradient gives.
        dy = torch.zeros_like(x) if grad_y is None else grad_y
        dys, xs = _as(dy, compute), _as(x, compute)
        # Σ dy·x and Σ dy per group, this process
        local, sums = _group_dots(
            dys, xs, static.group_count, static.group_size, static.group_offset
        )
        pooled = local
        if static.process_group is not None:
            pooled = local.clone()
            dist.all_reduce(pooled, group=static.process_group)

        psi = ctx.slope * pooled / ctx.counts  # E_R[ĝ z] = γ r inv · E_R[dy x]
        psi_bar = psi
        if ctx.psi_values is not None:
            values, count, host = ctx.psi_values, ctx.psi_count, static.psi_host
            flags: Flags = ctx.use_sma if ctx.use_sma is not None else list(static.use_sma)
            # Read at backward time: with gradient accumulation, other backwards may have
            # pushed since this forward.
            psi_bar = _select(flags, lambda: _window_means(values, count, host, psi), lambda: psi)
            if not static.psi_frozen:
                _window_push(values, count, host, psi, ctx.valid)

        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # (ĝ − z Ψ̄)/sqrt(v + eps) = dy·(γ r inv) − x·(Ψ̄ inv²): one pass after the product
            shift = psi_bar * ctx.inv_std.square().neg_()
            grad = xs * channel_view(_group_spread(shift, ctx.index), x)
            grad = grad.addcmul_(dys, channel_view(_group_spread(ctx.slope, ctx.index), x))
            grad_x = _as(grad, x.dtype)
        if ctx.weight_dtype is not None and ctx.needs_input_grad[1]:
            grad_weight = _as(_sum_groups(ctx.scale * local), ctx.weight_dtype)  # Σ dy·r·z
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = _as(_sum_groups(sums), ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, *([None] * 9)


@dataclass(frozen=True, slots=True)
class _Backward:
    """The Python constants of one :class:`_MABNFunction` call: the grouping (number and
    size of the groups, where this process's samples start in the global batch), the host
    switches to the SMA (when the step is on the host), the Ψ window's host count (eager
    only) and whether it is frozen, and the process group."""

    group_count: int
    group_size: int | None
    group_offset: int
    use_sma: tuple[bool, ...]
    psi_host: HostCount | None
    psi_frozen: bool
    process_group: _distributed.ProcessGroup | None


def _mabn(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, plan: MABNPlan
) -> tuple[Tensor, _Statistics]:
    """MABN of ``x`` (training semantics): the output and the forward's statistics; no state
    is modified (the backward pushes Ψ into ``plan.psi``)."""
    stats = _statistics(x, plan)
    if stats.empty:
        return x.clone(), stats
    psi = plan.psi
    host_flags = not isinstance(stats.use_sma, Tensor)
    static = _Backward(
        stats.groups.count,
        stats.groups.size,
        stats.groups.offset,
        tuple(stats.use_sma) if host_flags else (),  # type: ignore[arg-type]
        None if psi is None else psi.host,
        psi is None or psi.frozen,
        plan.process_group,
    )
    y = _MABNFunction.apply(
        x,
        weight,
        bias,
        stats.inv_std,
        stats.r,
        stats.counts,
        stats.groups.index,
        None if host_flags else stats.use_sma,
        None if psi is None else psi.values,
        None if psi is None else psi.count,
        stats.valid,
        static,
    )
    return y, stats


def mabn_function(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, plan: MABNPlan
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """MABN of ``x`` (training semantics) with its moving-average backward; no state is
    modified.

    Returns ``y`` and ``(χ², v, r, running_var_after)``: the per-group ``(G, C)`` statistics
    (constants) and the running variance after the call (empty when ``plan.running_var`` is
    ``None``).  The backward uses ``plan.psi`` for Ψ̄ and pushes ``Ψ`` into it unless frozen.
    ``plan.check_finite`` (if any) sees ``χ²`` before this returns.
    """
    y, stats = _mabn(x, weight, bias, plan)
    if plan.check_finite is not None and not stats.empty:
        plan.check_finite(stats.chi2)
    r = torch.ones_like(stats.var) if stats.r is None else stats.r
    return y, (stats.chi2, stats.var, r, stats.running_after)
