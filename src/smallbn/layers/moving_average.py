"""Moving Average Batch Normalization (Yan, Wan, Zhang, Zhang, Wei & Sun, "Towards Stabilizing
Batch Statistics in Backward Propagation of Batch Normalization", ICLR 2020).

At small batch sizes BN's batch statistics are noisy in the forward pass (``μ_B``, ``σ²_B``)
*and* in the backward pass (``g_B = E[ĝ]``, ``Ψ_B = E[ĝ·x̂]``).  MABN drops mean-centring (the
convolution before it centres its weights instead, :mod:`smallbn.layers.centered_conv`) and
replaces the remaining batch statistics by simple moving averages (SMA) over the last ``B``
steps.  Per channel, with statistics over the reduction set ``R = (N, *spatial)`` of a step:

Forward (training), step ``t``::

    χ²_t = E_R[x²]
    v_t  = mean(χ²_{t−B+1}, …, χ²_t)            (χ²_t alone during warm-up)
    z    = x / sqrt(v_t + eps)
    r    = clamp(sqrt(v_t + eps) / sqrt(running_var + eps), r_min, r_max)   (r = 1 at first)
    y    = γ·r·z + β
    running_var ← (1 − momentum)·running_var + momentum·v_t   (after r is formed)

Backward (``r`` and ``v_t`` are constants)::

    ĝ  = (∂L/∂y)·γ·r
    Ψ_t = E_R[ĝ·z],   Ψ̄ = mean(Ψ_{t−B+1}, …, Ψ_t)  (Ψ_t alone during warm-up)
    ∂L/∂x = (ĝ − z·Ψ̄) / sqrt(v_t + eps),   ∂L/∂γ = Σ ∂L/∂y·r·z,   ∂L/∂β = Σ ∂L/∂y

Inference: ``y = γ·x / sqrt(running_var + eps) + β``, a per-channel affine map that
:func:`smallbn.fold` folds into the preceding convolution.  ``running_var`` holds the EMA of
the *second moment* ``v``.  ``running_mean`` is kept for BN-compatible state only: training
sets it to 0, so the eval map is BN's ``γ (x − running_mean)/sqrt(running_var + eps) + β``
evaluated with a zero mean (a BN checkpoint loaded and evaluated before any MABN training step
therefore behaves as that BN), and a trained MABN state loaded into ``nn.BatchNorm`` gives
the same eval outputs.

Simulated small normalization batches (``norm_batch_size=b``; the authors' ImageNet release
uses b = 2 with B = 16 inside batches of 32 per GPU): a batch is split
into consecutive groups of ``b`` samples (the last may be smaller) that act as consecutive SMA
steps — group ``k`` is step ``t + k``: its ``χ²`` enters the window after those of groups
``< k``, its ``v``, ``r`` and running-variance update see theirs, and in backward the groups'
``Ψ`` enter the Ψ window in the same order.  One call on a batch of ``N`` is thus exactly
``ceil(N/b)`` consecutive calls on its groups (forward then backward each).  Warm-up, the start
of the clamping of ``r`` and the cumulative average (``momentum=None``) count these steps.

Design decisions where the paper is silent (and where the authors' release differs):

* Steps are *counted in SMA steps* (``sma_steps`` buffer), not in ``forward`` calls
  (``num_batches_tracked`` still counts calls, as BN's does).  The first ``warmup`` steps use
  ``χ²_t`` and ``Ψ_t`` alone; ``r = 1`` for the first ``clamp_start`` steps.  The release
  switches to the SMA only once its window is full and holds ``r = 1`` for
  ``max(1000, warm-up)`` iterations; ``clamp_start=None`` (default) gives that value.  Before
  the window is full, the SMA is the mean of the values it holds (the release averages the
  zero-initialized slots too, which only matters for ``warmup < B``).
* ``momentum`` follows BN's convention (the weight of the *new* value, as in every smallbn
  layer and as :func:`smallbn.convert` hands it on); the release's keep factor ``m = 0.98`` is
  ``momentum = 0.02``, the default.  ``momentum=None`` is the cumulative average over steps.
* With simulated groups the release (ImageNet variant) updates ``running_var`` and forms ``r``
  once per iteration and needs ``N = 2·B`` exactly; here every group is a full step, and any
  batch size works: odd, smaller than ``b``, 1, ``b`` not dividing ``N``.
* A group with a single value per channel is normalized (``E[x²]`` needs no spread, unlike a
  variance): ``z = x/sqrt(x² + eps)``; there is no "batch too small" error.  NaN/Inf
  statistics raise ``FloatingPointError`` naming the layer (before any state changes), and
  so does a running variance that would overflow its dtype.  An empty batch (not
  synchronized) changes no state.
* Half-precision modules (``model.half()``, ``.to(torch.bfloat16)``): the χ² and Ψ windows
  stay float32 (statistics in float32 at least; float64 for a float64 layer) and all
  statistics are computed in float32; ``running_mean``/``running_var`` and the affine
  Parameters follow the module's dtype, as ``nn.BatchNorm``'s do.
* The backward is written out to first order (``v``, ``r`` and Ψ̄ are constants): a backward
  with ``create_graph=True`` (double backward, gradient penalties) raises.
* ``Ψ_t`` is only known in backward, so the backward pushes it into the Ψ window and reads the
  window *at backward time*: with gradient accumulation over several forwards before one
  backward the Ψ values enter in backward order.  A training forward without backward
  (``torch.no_grad``) advances the χ² window and the step but adds nothing to the Ψ window.
* ``sync=True``: the batch is the concatenation of all processes' batches in rank order, and
  groups of ``norm_batch_size`` are formed over it, as for every layer with
  ``norm_batch_size`` (a group may span two processes; without ``norm_batch_size`` the one
  group is the whole global batch).  So a synchronized call equals one process calling MABN
  on the concatenated batch.  Each process sums ``Σx²`` (forward) and ``Σ dL/dy·x``
  (backward, for ``Ψ``) and the counts into the global groups (zero for groups it holds no
  sample of); these are all-reduced, so every rank holds the same windows and running
  variance.  With groups, where a process's samples start is one extra all-reduce of the
  ranks' batch sizes (they may differ).  ``∂L/∂γ``, ``∂L/∂β`` stay local (DDP sums them).
  An empty batch on every process changes no state (decided on the device without groups,
  from the batch sizes with them).

Host reads and ``torch.compile``.  A step makes no host read (on CUDA each would be a
synchronization) with the finite check deferred (:func:`smallbn.set_finite_check`):

* Eager and unsynchronized, the per-step decisions (warm-up over, clamping started, how many
  window rows are valid) are Python control flow on host copies of ``sma_steps`` and of the
  windows' counts (:class:`HostCount`), kept beside the buffers and re-read from them only
  when a ``state_dict`` loads or :func:`smallbn.precise_bn` restores them.
* Compiled (``torch.compile``, ``fullgraph=True`` works) and synchronized, they are made on
  the device from the buffers themselves: the switches become ``(G,)`` masks, the window
  means masked sums over the stored rows.  The same numbers; a compiled graph then depends
  on no Python integer that changes every step, so it is not recompiled as training goes
  on.  The host copies are re-read once by the next eager step.
* The one read left is the ranks' batch sizes for a synchronized layer with
  ``norm_batch_size`` (where this process's samples start in the global batch: the groups'
  shapes depend on it).

Cost: the forward reads ``x`` twice (per-sample ``Σx²``, then ``y = a·x + β``) and the backward
three times (one fused pass for ``Σ dy·x`` and ``Σ dy`` per sample and channel, then
``∂L/∂x = A·dy + B·x``); the per-step logic (windows, EMA sequence, clamping) works on
``(groups, C)`` tensors with a fixed number of operations, whatever the number of groups.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, checked_norm_batch_size
from smallbn.layers.centered_conv import (
    CenteredConv1d,
    CenteredConv2d,
    CenteredConv3d,
    centered_conv_from,
    centering_obstacle,
)
from smallbn.layers.frozen import FrozenBatchNorm
from smallbn.stats import Moments, ema_sequence, first_order_only, sample_groups, stats_dtype

__all__ = [
    "HostCount",
    "MABNPlan",
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "SlidingWindow",
    "mabn_function",
]

#: The release holds r = 1 for max(RELEASE_CLAMP_START, warm-up) iterations.
RELEASE_CLAMP_START = 1000


@dataclass(slots=True)
class HostCount:
    """A count kept on the host beside its device copy (a window's valid rows), so that the
    per-step decisions depending on it are Python control flow instead of a device read per
    step (a synchronization on CUDA)."""

    value: int


#: Per-step switches (warm-up over, clamping started) of ``G`` consecutive SMA steps: Python
#: bools when the step is known on the host, a ``(G,)`` bool tensor when it lives on the device.
Flags = list[bool] | Tensor


class SlidingWindow:
    """The last ``size`` values of a per-channel statistic, for simple moving averages.

    ``values`` is ``(size, C)``; the newest value is the last row and the valid rows are the
    last ``count`` (``count`` a 0-dim long tensor, so that the state lives in a
    ``state_dict``).  ``host`` is the host copy of ``count`` (kept up to date by
    :meth:`push`: no device read per step), or ``None``: the valid rows are then selected on
    the device from ``count``, the same numbers with a few more operations and no host
    read (what compiled graphs and synchronized layers use).  ``frozen`` windows ignore
    :meth:`push` (for gradcheck, where backward runs several times on one forward).
    """

    def __init__(
        self, values: Tensor, count: Tensor, frozen: bool = False, host: HostCount | None = None
    ) -> None:
        self.values = values
        self.count = count
        self.frozen = frozen
        self.host = host

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    def means(self, new: Tensor) -> Tensor:
        """Row ``k`` of the result is the mean of the last ``size`` values once
        ``new[0], …, new[k]`` have been appended in order (fewer while the window fills)."""
        return _window_means(self.values, self.count, self.host, new)

    def push(self, new: Tensor, valid: Tensor | None = None) -> None:
        """Append the rows of ``new`` (oldest first), dropping the oldest values; with
        ``valid`` (a 0-dim bool tensor) only where it holds, decided on the device."""
        if not self.frozen:
            _window_push(self.values, self.count, self.host, new, valid)


# The window operations are functions of tensors (not methods): torch.compile traces a
# custom autograd Function's backward only through plain functions and tensors on its ctx.


def _window_means(values: Tensor, count: Tensor, host: HostCount | None, new: Tensor) -> Tensor:
    """:meth:`SlidingWindow.means` of the window ``(values, count)``.

    Sums are exact sums of at most ``size`` terms (a running ``cumsum`` difference would
    cancel in float32): one group adds the stored sum; several sum every window of an
    ``unfold`` view of the stored values (invalid rows replaced by zeros) and the new ones.
    All sums are taken in ``new.dtype`` (the compute dtype), never in a narrower stored
    dtype: ``size`` values that each fit in float16 need not sum to one that does.  With
    ``host`` the valid rows are sliced by the host count; without, masked by the device
    count (the invalid rows enter as exact zeros: the same sums, up to the order in which the
    reduction adds them).
    """
    size, groups = int(values.shape[0]), new.shape[0]
    if host is None:
        kept_t = count.clamp(max=size)
        rows = torch.arange(size, device=values.device)
        stored = torch.where((rows >= size - kept_t).unsqueeze(1), _as(values, new.dtype), 0.0)
        steps = torch.arange(1, groups + 1, device=values.device)
        divisor = (kept_t + steps).clamp(max=size).to(new.dtype).unsqueeze(1)
        if groups == 1:
            return (new + stored[1:].sum(0)) / divisor
        sums = torch.cat([stored, new]).unfold(0, size, 1)[1:].sum(-1)
        return sums / divisor
    kept = min(host.value, size)
    counts = [min(kept + k + 1, size) for k in range(groups)]
    if groups == 1:
        if counts[0] == 1:
            return new
        stored_rows = _as(values[size - counts[0] + 1 :], new.dtype).sum(0)
        return (new + stored_rows).div_(counts[0])
    parts = [_as(values[size - kept :], new.dtype), new]
    if kept < size:
        parts.insert(0, new.new_zeros(size - kept, new.shape[1]))
    sequence = torch.cat(parts)
    # Windows of ``size`` rows ending at row size + k, k = 0 … groups−1, are the unfold's
    # rows 1 … (window w covers rows w … w + size − 1).
    sums = sequence.unfold(0, size, 1)[1:].sum(-1)
    return sums / torch.tensor(counts, dtype=new.dtype, device=new.device).unsqueeze(1)


@torch.no_grad()
def _window_push(
    values: Tensor,
    count: Tensor,
    host: HostCount | None,
    new: Tensor,
    valid: Tensor | None = None,
) -> None:
    """:meth:`SlidingWindow.push` into ``(values, count)``: the host count advances with the
    device one (written only while the window fills: no device op in the steady state);
    without a host count the device count advances on the device, and ``valid`` (a 0-dim
    bool tensor, device mode only) keeps the window as it is where false."""
    assert valid is None or host is None, "a push decided on the device has no host count"
    size, groups = int(values.shape[0]), new.shape[0]
    if groups == 0:
        return
    if groups >= size:
        pushed = _as(new[-size:], values.dtype)
    else:
        pushed = torch.cat([values[groups:], _as(new, values.dtype)])
    values.copy_(pushed if valid is None else torch.where(valid, pushed, values))
    if host is None:
        filled = (count + groups).clamp(max=size)
        count.copy_(filled if valid is None else torch.where(valid, filled, count))
    elif host.value < size:
        host.value = min(host.value + groups, size)
        count.fill_(host.value)


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


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (this layer's per-step cost is
    dominated by such small calls)."""
    return t if t.dtype == dtype else t.to(dtype)


def _stat_view(stat: Tensor, x: Tensor) -> Tensor:
    """``(rows, C)`` → ``(rows, C, 1, …)`` broadcasting against ``x`` (rows = 1 or N)."""
    return stat.reshape(*stat.shape, *([1] * (x.dim() - 2)))


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


def _split(x: Tensor, group_size: int | None, process_group: Any) -> _Groups:
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
    groups = _split(x, plan.group_size, group)
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
        y = xs * _stat_view(_group_spread(slope, index), x)
        if bias is not None:
            y = y.add_(_stat_view(_as(bias, compute), x))
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
            grad = xs * _stat_view(_group_spread(shift, ctx.index), x)
            grad = grad.addcmul_(dys, _stat_view(_group_spread(ctx.slope, ctx.index), x))
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


# -- the layer ----------------------------------------------------------------------------------


class MovingAverageBatchNorm(BatchStatsNorm, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """Moving Average Batch Normalization for inputs of any rank ≥ 2 (see the 1d/2d/3d
    variants and the module docstring for the formulas).

    Args:
        momentum: weight of the new ``v`` in ``running_var`` (BN's convention); the default
            0.02 is the release's keep factor 0.98.  ``None``: cumulative average over steps.
        window: ``B``, the number of steps in the simple moving averages (release: 32/2 = 16).
        warmup: steps that use the current ``χ²_t``, ``Ψ_t`` alone (release: 100).
        clamp_start: first step at which ``r`` departs from 1 (then clamped to
            ``[r_min, r_max]``); ``None``: ``max(1000, warmup)``, as the release.
        r_min, r_max: clamping bounds of ``r`` (release: 1/5 and 5).
        norm_batch_size: simulate normalization batches of this many samples inside a larger
            batch (consecutive groups are consecutive SMA steps; with ``sync``, groups of the
            global batch); ``None``: the whole batch.
        center_producer: let :func:`smallbn.convert` / :func:`smallbn.bind_producers` replace
            the ``nn.Conv{1,2,3}d`` producing this layer's input by the weight-centred
            :class:`~smallbn.layers.centered_conv.CenteredConv2d` (same Parameters).
        sync: pool the statistics across processes: the batch is the concatenation of all
            processes' batches in rank order, and ``norm_batch_size`` groups are formed over
            it (a group may span two processes), as for every smallbn layer.

    State: BN's keys plus ``chi2_window``, ``psi_window`` (``(window, C)``, newest last),
    ``chi2_count``, ``psi_count`` (valid rows) and ``sma_steps``, so that resumed training
    continues identically.  The layout is versioned (:attr:`_version` 3): a BN checkpoint
    (version 2 or none, without them) loads strictly with the current values.
    """

    _family = "MovingAverageBatchNorm"
    wants_producer = True

    chi2_window: Tensor
    psi_window: Tensor
    chi2_count: Tensor
    psi_count: Tensor
    sma_steps: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        window: int = 16,
        warmup: int = 100,
        clamp_start: int | None = None,
        r_min: float = 0.2,
        r_max: float = 5.0,
        norm_batch_size: int | None = None,
        center_producer: bool = True,
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
    ) -> None:
        name = type(self).__name__
        if int(window) < 1:
            raise ValueError(f"{name}: window must be >= 1, got {window}")
        if int(warmup) < 0 or (clamp_start is not None and int(clamp_start) < 0):
            raise ValueError(
                f"{name}: warmup and clamp_start count steps and must be >= 0, got "
                f"warmup={warmup}, clamp_start={clamp_start}"
            )
        if not 0.0 < r_min <= 1.0 <= r_max:
            raise ValueError(
                f"{name}: need 0 < r_min <= 1 <= r_max, got r_min={r_min}, r_max={r_max}"
            )
        checked_norm_batch_size(name, norm_batch_size)
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
        self.window = int(window)
        self.warmup = int(warmup)
        self.clamp_start = (
            max(RELEASE_CLAMP_START, self.warmup) if clamp_start is None else int(clamp_start)
        )
        self.r_min, self.r_max = float(r_min), float(r_max)
        self.norm_batch_size = None if norm_batch_size is None else int(norm_batch_size)
        self.center_producer = center_producer
        #: What :meth:`bind_producer` did (for reports), ``None`` before it was called.
        self.producer_note: str | None = None
        # Windows in float32 at least (float64 for a float64 layer): they accumulate statistics.
        window_dtype = stats_dtype(dtype if dtype is not None else torch.get_default_dtype())
        shape = (self.window, self.num_features)
        factory: dict[str, Any] = {"device": device}
        self.register_buffer("chi2_window", torch.zeros(shape, dtype=window_dtype, **factory))
        self.register_buffer("psi_window", torch.zeros(shape, dtype=window_dtype, **factory))
        self.register_buffer("chi2_count", torch.tensor(0, dtype=torch.long, **factory))
        self.register_buffer("psi_count", torch.tensor(0, dtype=torch.long, **factory))
        self.register_buffer("sma_steps", torch.tensor(0, dtype=torch.long, **factory))
        self._init_host_state()

    def _init_host_state(self) -> None:
        # Host copies of the step count and of the windows' valid rows (the buffers hold the
        # state): every per-step decision is Python control flow on them, with no device
        # read per step.  Restored from the buffers when a state_dict loads
        # (_reload_host_state); stale after steps that keep them on the device (compiled
        # or synchronized), and then re-read once by the next eager step.
        self._steps = 0
        self._chi2_fill = HostCount(0)
        self._psi_fill = HostCount(0)
        self._host_stale = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_chi2_fill" not in self.__dict__:  # pickled before the host copies existed
            self._init_host_state()
            self._host_stale = True

    def extra_repr(self) -> str:
        text = (
            f"{super().extra_repr()}, window={self.window}, warmup={self.warmup}, "
            f"clamp_start={self.clamp_start}, r_min={self.r_min}, r_max={self.r_max}"
        )
        if self.norm_batch_size is not None:
            text += f", norm_batch_size={self.norm_batch_size}"
        return text

    # -- state ---------------------------------------------------------------------------

    _checkpoint_rules = {
        **BatchStatsNorm._checkpoint_rules,
        "chi2_window": "non-negative",  # means of squares
        "psi_window": "finite",
        "chi2_count": "count",
        "psi_count": "count",
        "sma_steps": "count",
    }

    #: A window of ``B`` values of ``E[x²]`` that each fit in float16 need not sum to one that
    #: does: the windows stay in float32 when the module is cast (see ``NormBase._apply``).
    _float32_buffers = ("chi2_window", "psi_window")

    def reset_moving_averages(self) -> None:
        """Empty both windows and restart the step count (warm-up starts over)."""
        for name in ("chi2_window", "psi_window", "chi2_count", "psi_count", "sma_steps"):
            getattr(self, name).zero_()
        self._steps = self._chi2_fill.value = self._psi_fill.value = 0
        self._host_stale = False

    def _reload_host_state(self) -> None:
        """Re-read the host copies of ``sma_steps`` and the windows' counts from the buffers
        (three reads: after a checkpoint loads, after :func:`smallbn.precise_bn` restores the
        buffers, or once after compiled or synchronized steps)."""
        self._steps = int(self.sma_steps)
        # Mutated in place: a pending backward (gradient accumulation) holds the Ψ count.
        self._chi2_fill.value = min(int(self.chi2_count), self.window)
        self._psi_fill.value = min(int(self.psi_count), self.window)
        self._host_stale = False

    #: The state_dict layout, saved as ``state_dict._metadata[prefix]["version"]`` and handed
    #: back to :meth:`_load_from_state_dict` (torch's ``_NormBase`` is at 2).  3: BN's entries,
    #: the windows in the statistics dtype (float32 at least) and their counts and the step
    #: count, all present.  2 or none (no metadata): a BN checkpoint, without windows, or a
    #: MABN one from before versions, whose windows may be float16 (see :meth:`_upgrade`).
    _version = 3

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
        version = local_metadata.get("version")
        if version is None or version < 3:
            self._upgrade(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._reload_host_state()

    def _upgrade(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A version-2 (or unversioned) state in this layer's current layout, in place.

        A BN checkpoint has no windows: the layer keeps its own (empty before any MABN step),
        so a BN checkpoint loads strictly and evaluates as that BN.  Windows saved by a
        half-precision module before they were kept in float32 load in this layer's
        statistics dtype, also with ``load_state_dict(assign=True)``.
        """
        for name in ("chi2_window", "psi_window", "chi2_count", "psi_count", "sma_steps"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        for name in self._float32_buffers:
            key = prefix + name
            if isinstance(state_dict[key], Tensor):
                state_dict[key] = _as(state_dict[key], getattr(self, name).dtype)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "sma_steps"):  # NormBase.__init__ resets before our buffers exist
            self.reset_moving_averages()

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A checkpoint made with another ``window`` (any version) keeps its most recent
        values: a layer option, not a layout, so not a matter of versions."""
        for name in ("chi2", "psi"):
            key = f"{prefix}{name}_window"
            values = state_dict.get(key)
            if isinstance(values, Tensor) and values.shape[0] != self.window:
                kept = min(values.shape[0], self.window)
                resized = values.new_zeros(self.window, *values.shape[1:])
                if kept:
                    resized[-kept:] = values[-kept:]
                state_dict[key] = resized
                count_key = f"{prefix}{name}_count"
                if count_key in state_dict:
                    state_dict[count_key] = state_dict[count_key].clamp(max=kept)

    @torch.no_grad()
    def set_population_stats(self, population: Moments) -> None:
        """PreciseBN for MABN: ``running_var`` ← the population's ``E[x²]``, mean 0."""
        running_mean, running_var = self.running_stats()
        running_mean.zero_()
        running_var.copy_(population.second_moment)

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """``scale = γ / sqrt(running_var + eps)``, ``shift = β − running_mean·scale`` with
        ``running_mean = 0`` after MABN training: ``y = γ x / sqrt(running_var + eps) + β``."""
        return super().eval_affine()

    # -- producer ------------------------------------------------------------------------

    def bind_producer(
        self, producer: nn.Module | None, note: str | None = None
    ) -> nn.Module | None:
        """Return a weight-centred replacement for a plain ``nn.Conv{1,2,3}d`` producer
        (sharing its Parameters) when ``center_producer``; otherwise keep it.

        Other producers (``Linear``, ``ConvTranspose``, conv subclasses, pruned /
        ``weight_norm`` / ``spectral_norm`` convs whose weight a forward pre-hook computes,
        one-entry kernels that centring would zero) are left as they are, with a warning that
        says why (:func:`~smallbn.layers.centered_conv.centering_obstacle`): MABN then
        normalizes inputs that are not made zero-mean by their producer.
        """
        self.producer_changed_function = False
        if not self.center_producer:
            self.producer_note = "center_producer=False: producer left as it is"
            return None
        if producer is None:
            self.producer_note = f"no producer to centre ({note or 'none found'})"
            return None
        kind = type(producer).__name__
        if isinstance(producer, (CenteredConv1d, CenteredConv2d, CenteredConv3d)):
            self.producer_note = f"{kind} producer is already weight-centred"
            return None
        reason = centering_obstacle(producer)
        if reason is not None:
            self.producer_note = f"{kind} producer is not centred: {reason}"
            warnings.warn(
                f"{self.describe()}: its input comes from a {kind}, left uncentred because "
                f"{reason}. MABN drops mean-centring and relies on a weight-centred conv "
                f"before it (pass center_producer=False to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        replacement = centered_conv_from(producer)
        assert replacement is not None  # centering_obstacle found nothing in the way
        self.producer_note = f"{type(producer).__name__} replaced by {type(replacement).__name__}"
        self.__dict__["_centered"] = replacement  # not a child: released by release_producer
        weight = producer.weight.detach()
        means = weight.flatten(1).mean(1).abs()
        # Centring subtracts each kernel's mean: a conv whose kernels are not zero-mean now
        # computes something else (a pretrained model's function changes until fine-tuned).
        self.producer_changed_function = bool(
            (means > 1e-6 * weight.abs().amax().clamp_min(1e-30)).any()
        )
        return replacement

    #: Whether :meth:`bind_producer` centred a conv whose kernels were not zero-mean (so the
    #: conv's function changed); :func:`smallbn.bind_producers` reports such layers.
    producer_changed_function = False

    def release_producer(self, replacement: nn.Module) -> nn.Module | None:
        """The centred conv this layer installed: :func:`smallbn.convert` turns it back into a
        plain conv holding the centred weight (the same function, and a state_dict that plain
        torch models load).  Kept where ``replacement`` is a MABN that centres it again, or a
        FrozenBatchNorm (:func:`smallbn.freeze_norms` in the last epochs of MABN training:
        the convs go on training weight-centred, as the method trains them)."""
        if isinstance(replacement, FrozenBatchNorm) or (
            isinstance(replacement, MovingAverageBatchNorm) and replacement.center_producer
        ):
            return None
        centered = self.__dict__.get("_centered")
        return centered if isinstance(centered, nn.Module) else None

    # -- forward -------------------------------------------------------------------------

    def _check_chi2(self, chi2: Tensor, x: Tensor | None = None) -> None:
        # One reduction in the common case (a NaN/Inf anywhere makes the sum non-finite; the
        # values are ≥ 0, so no Inf − Inf); the base's check builds the message otherwise.
        now = self._finite_check_now(chi2)
        if now is False:
            self._record_finite(torch.isfinite(chi2.sum()))
        elif now and not math.isfinite(float(chi2.sum())):
            second = Moments(chi2.new_ones(chi2.shape[0]), chi2, torch.zeros_like(chi2))
            self._check_finite(second, x)

    def _check_running_var(self, stored: Tensor) -> None:
        """Raise ``FloatingPointError`` if the running variance about to be stored is not
        finite (a finite ``χ²`` can still overflow a float16/bfloat16 ``running_var``, and an
        Inf there turns every later ``r``, hence every output, into NaN)."""
        now = self._finite_check_now(stored)
        if now is None:
            return
        # The values are ≥ 0 and summed in float64: the sum is finite iff every value is.
        if now is False:
            # the second check of this call (after χ²'s): the same call number
            self._record_finite(torch.isfinite(stored.sum(dtype=torch.float64)), new_call=False)
            return
        if math.isfinite(float(stored.sum(dtype=torch.float64))):
            return
        bad = (~torch.isfinite(stored)).nonzero().flatten().tolist()
        narrow = stored.dtype in (torch.float16, torch.bfloat16)
        fix = (
            "Keep this layer in float32 (autocast instead of model.half()), or scale the "
            "inputs down"
            if narrow
            else "Scale the inputs down"
        )
        raise FloatingPointError(
            f"{self.describe()}: the running variance (EMA of E[x²]) would not be finite in "
            f"{stored.dtype} in channel(s) {bad}: the inputs' mean square exceeds what "
            f"{stored.dtype} can hold. {fix}; the layer's state is unchanged."
        )

    def _advance_step(self) -> float | None:
        """Count a training call (``num_batches_tracked``, as BN) without reading it back: the
        running average advances per SMA step, with factors the Function computes (the
        cumulative average from ``sma_steps``), so the return value only says whether
        running statistics are tracked (the base reads the count for ``momentum=None``)."""
        if not (self.training and self.track_running_stats):
            return None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        return 1.0 if self.momentum is None else self.momentum

    def _plan(self, training: bool, tracking: bool, x: Tensor | None = None) -> MABNPlan:
        """The plan of one call.  Eager and unsynchronized, the step count and the windows'
        fill come from the host copies (Python decisions, no device read); compiled or
        synchronized, from the buffers on the device (no host read, and no Python integer
        that changes every step, on which dynamo would specialize and recompile each step;
        synchronized, an empty batch on every process is known on the device only)."""
        group = self._sync_group()
        on_device = _compiling() or group is not None
        if on_device:
            if training:
                self._host_stale = True  # these steps advance the buffers only
        elif self._host_stale:
            self._reload_host_state()
        running_var = self.running_var if tracking else None
        chi2_host = None if on_device else self._chi2_fill
        psi_host = None if on_device else self._psi_fill
        return MABNPlan(
            eps=self.eps,
            group_size=self.norm_batch_size,
            step=self.sma_steps if on_device else self._steps,
            chi2=SlidingWindow(self.chi2_window, self.chi2_count, host=chi2_host),
            psi=SlidingWindow(self.psi_window, self.psi_count, host=psi_host) if training else None,
            use_window=training,
            warmup=self.warmup,
            running_var=running_var,
            momentum=self.momentum,
            clamp_start=self.clamp_start,
            r_min=self.r_min,
            r_max=self.r_max,
            process_group=group,
            check_finite=functools.partial(self._check_chi2, x=x),
        )

    def _forward_train(self, x: Tensor, factor: float | None, *args: Any) -> Tensor:
        """Training step(s); also eval mode without running statistics, where each group is
        normalized by its own ``E[x²]`` and no state changes."""
        # A statistics pass (PreciseBN, batch_stats_eval) normalizes each group by its own
        # E[x²], as eval mode without running statistics does, and changes no state.
        training = self.training and not self.statistics_pass
        plan = self._plan(training, factor is not None, x)
        if x.shape[0] == 0 and plan.process_group is None:
            self._undo_step(factor)
            return x.clone()
        y, stats = _mabn(x, self.weight, self.bias, plan)
        if plan.check_finite is not None and not stats.empty:
            plan.check_finite(stats.chi2)  # before any state changes
        if not training:
            return y
        if stats.empty:  # no values (no spatial extent)
            self._undo_step(factor)
            return y
        stored = stats.running_after
        if factor is not None:
            stored = _as(stored, self.running_stats()[1].dtype)
            if stored.dtype.itemsize < stats.running_after.dtype.itemsize:
                # Only a narrower running_var can overflow where the (checked) χ² did not:
                # no second device read per step for float32 layers.
                self._check_running_var(stored)  # before any state changes
        groups, valid = stats.chi2.shape[0], stats.valid
        with torch.no_grad():
            # The Function only reads the χ² window; the step is recorded here.
            plan.chi2.push(stats.chi2, valid)
            if isinstance(plan.step, Tensor):
                self.sma_steps.add_(groups if valid is None else valid.long() * groups)
            else:
                self._steps += groups
                self.sma_steps.add_(groups)
            if factor is not None:
                running_mean, running_var = self.running_stats()
                if valid is None:
                    running_var.copy_(stored)
                    running_mean.zero_()
                else:
                    # Synchronized: an empty batch on every process changes no state and is
                    # not counted, decided on the device.
                    running_var.copy_(torch.where(valid, stored, running_var))
                    running_mean.copy_(torch.where(valid, 0.0, running_mean))
                    self.num_batches_tracked.sub_((~valid).long())  # type: ignore[union-attr]
        return y


class MovingAverageBatchNorm1d(MovingAverageBatchNorm):
    """MABN for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class MovingAverageBatchNorm2d(MovingAverageBatchNorm):
    """MABN for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class MovingAverageBatchNorm3d(MovingAverageBatchNorm):
    """MABN for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3
