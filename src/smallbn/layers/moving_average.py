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

This module holds the layer; the per-step statistics and the autograd Function (and their
cost) are in :mod:`smallbn.layers._moving_average_functions`, the χ² and Ψ windows in
:mod:`smallbn.layers._sliding_window`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, checked_norm_batch_size
from smallbn.layers._moving_average_functions import (
    RELEASE_CLAMP_START,
    MABNPlan,
    _compiling,
    _mabn,
    mabn_function,
)
from smallbn.layers._sliding_window import HostCount, SlidingWindow, _as
from smallbn.layers.centered_conv import (
    CenteredConv1d,
    CenteredConv2d,
    CenteredConv3d,
    centered_conv_from,
    centering_obstacle,
)
from smallbn.layers.frozen import FrozenBatchNorm
from smallbn.stats import Moments, stats_dtype

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

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        super()._migrate(state_dict, prefix, version)
        if version is None or version < 3:
            self._upgrade(state_dict, prefix)

    def _upgrade(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A version-2 (or unversioned) state in this layer's current layout, in place.

        A BN checkpoint has none of MABN's entries: the layer keeps its own (empty before any
        MABN step), so a BN checkpoint loads strictly and evaluates as that BN.  A MABN
        checkpoint held all of them from the start, so one that lacks some is incomplete:
        those stay missing keys (an error of a strict load), not the layer's own values
        beside the checkpoint's (a step count of 0 beside full windows restarted warm-up and
        the clamping of r in silence).  Windows saved by a half-precision module before they
        were kept in float32 load in this layer's statistics dtype, also with
        ``load_state_dict(assign=True)``.
        """
        names = ("chi2_window", "psi_window", "chi2_count", "psi_count", "sma_steps")
        if not any(prefix + name in state_dict for name in names):
            for name in names:
                state_dict[prefix + name] = getattr(self, name).detach().clone()
        for name in self._float32_buffers:
            key = prefix + name
            if isinstance(state_dict.get(key), Tensor):
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
