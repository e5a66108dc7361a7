"""State, input checks and the batch-statistics pipeline shared by every smallbn layer.

Two bases:

* :class:`NormBase` owns BN's state (``weight``, ``bias``, ``running_mean``, ``running_var``,
  ``num_batches_tracked``, same names and shapes as ``torch.nn.BatchNorm2d``), the input
  checks, the checkpoint checks (:mod:`smallbn.layers._checkpoint_checks`) and the NaN/Inf
  check of batch statistics (:mod:`smallbn.layers._finite_check`).  Every layer derives
  from it, so a pretrained BN checkpoint loads into any of them and back.
* :class:`BatchStatsNorm` adds the training path of layers that normalize with batch
  statistics: local moments from :mod:`smallbn.stats`, optional synchronization across
  processes, the "batch too small" and "non-finite statistics" checks, and BN's running
  average.  Layers override :meth:`BatchStatsNorm._forward_train` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from smallbn import _distributed
from smallbn.layers._checkpoint_checks import CheckpointChecksMixin
from smallbn.layers._finite_check import (
    FiniteCheck,
    FiniteCheckMixin,
    check_finite,
    set_finite_check,
)
from smallbn.stats import (
    Moments,
    SampleNormalization,
    affine_from_moments,
    all_gather_moments,
    channel_moments,
    detached_channel_moments,
    fused_batch_norm,
    merge_moments,
    normalize,
    normalize_from_sample_moments,
    normalize_with_population,
    sample_groups,
    sample_moments,
    update_running_stats,
)

__all__ = ["BatchStatsNorm", "FiniteCheck", "NormBase", "check_finite", "set_finite_check"]

AffineFn = Callable[[Moments], tuple[Tensor | None, Tensor | None]]

_SYNC_FIX = (
    "Fix: build this layer identically on every rank (the same class, num_features and "
    "group_size / norm_batch_size / num_domains / window) and feed it inputs of one dtype; "
    "batch and spatial sizes may differ."
)
#: Synchronized training calls of a layer between two checks that the ranks agree on its
#: configuration (every rank counts the same calls, so every rank checks at the same call).
_SIGNATURE_INTERVAL = 100

_SHAPES = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_RANKS = {1: (2, 3), 2: (4,), 3: (5,)}


def checked_norm_batch_size(owner: str, value: int | None) -> int | None:
    """``norm_batch_size`` as an int (``None`` kept), or ``ValueError`` naming ``owner`` (the
    layer's class) for a value that is not a sample count >= 1 (``True`` included)."""
    if value is None:
        return None
    if isinstance(value, bool) or int(value) < 1:
        raise ValueError(f"{owner}: norm_batch_size must be >= 1 or None, got {value}")
    return int(value)


def _affine_from_stats(
    mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    return affine_from_moments(mean, torch.rsqrt(var + eps), weight, bias)


class NormBase(FiniteCheckMixin, CheckpointChecksMixin):
    """BN-compatible state and checks.

    Subclasses set ``_input_dim`` (1, 2, 3, or ``None`` for any rank ≥ 2) and ``_family``
    (the class name without the ``1d/2d/3d`` suffix, used in error messages).
    """

    _version = 2
    _input_dim: ClassVar[int | None] = None
    _family: ClassVar[str] = ""
    #: Whether several calls in one forward of a statistics pass (:func:`smallbn.precise_bn`)
    #: each add to the layer's populations: true where every call names which population
    #: its samples belong to (domain BN, one domain per FPN level); otherwise several inputs
    #: would be mixed into one population, and the tool refuses them.
    repeated_calls_define_population: ClassVar[bool] = False
    _affine_as_buffers: ClassVar[bool] = False
    #: Whether BN's running statistics are saved in the ``state_dict``.  Batch-independent
    #: norms (GN/LN/IN) keep BN's buffers in memory only, so that converting back to BN
    #: restores them, and their checkpoints do not carry statistics they never computed
    #: (loaded into a BN, such placeholders gave a BN that evaluates with 0/1 statistics,
    #: with no error).  A BN checkpoint still loads into them (its statistics are kept).
    _running_stats_in_state_dict: ClassVar[bool] = True
    #: Buffers of accumulated statistics that stay in float32 at least whatever dtype the
    #: module is cast to (:meth:`_apply`); BN's running statistics follow the cast, as in torch.
    _float32_buffers: ClassVar[tuple[str, ...]] = ()

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

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
    ) -> None:
        # nn.Module's, not the next class's: the BN-family layers also derive from torch's
        # _BatchNorm (for code that finds norms by type), whose __init__ this one replaces.
        nn.Module.__init__(self)
        if int(num_features) <= 0:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive channel count, "
                f"got {num_features}"
            )
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: momentum is the weight of the new batch in the running "
                f"average and must lie in [0, 1] (or be None for a cumulative average), "
                f"got {momentum}"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        # ``bias=False`` (torch >= 2.6's keyword): γ without β, as nn.BatchNorm2d(C, bias=False).
        affine_shape = self._affine_shape()
        affine_tensors = {
            "weight": torch.empty(affine_shape, **factory) if affine else None,
            "bias": torch.empty(affine_shape, **factory) if affine and bias else None,
        }
        for name, tensor in affine_tensors.items():
            if self._affine_as_buffers:
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, None if tensor is None else nn.Parameter(tensor))
        if track_running_stats:
            persistent = self._running_stats_in_state_dict
            self.register_buffer(
                "running_mean", torch.zeros(self._stats_shape(), **factory), persistent
            )
            self.register_buffer(
                "running_var", torch.ones(self._stats_shape(), **factory), persistent
            )
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
                persistent,
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._init_finite_check(device)  # the deferred finite check's device-side flag
        self._synchronized_calls = 0  # host-side: for the ranks' agreement check
        self.reset_parameters()

    # -- state ---------------------------------------------------------------------------

    def _stats_shape(self) -> tuple[int, ...]:
        return (self.num_features,)

    def _affine_shape(self) -> tuple[int, ...]:
        """Shape of ``weight`` and ``bias``: BN's ``(C,)``; a layer with one affine per set of
        statistics (domain BN's ``per_domain_affine``) gives them a leading dim."""
        return (self.num_features,)

    def running_stats(self) -> tuple[Tensor, Tensor]:
        """``(running_mean, running_var)``; an error for layers built without them."""
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError(
                f"{self.describe()}: has no running statistics (built with "
                f"track_running_stats=False)"
            )
        return self.running_mean, self.running_var

    #: Set by the population tools (:func:`smallbn.precise_bn`, :func:`smallbn.batch_stats_eval`)
    #: around their passes: a training-mode forward then normalizes with the statistics of
    #: the current batch alone (groups of ``norm_batch_size`` where the layer has them) and
    #: leaves the layer's own state (windows, step counters, a window size still to be
    #: chosen) as it was.  Only layers whose training forward uses more than the current
    #: batch (Cross-Iteration BN, MABN) need to read it.
    statistics_pass: bool = False

    #: Layers that need the module producing their input (Cross-Iteration BN differentiates
    #: its statistics with respect to that conv's weight; MABN swaps it for a weight-centred
    #: conv) set this; :func:`smallbn.bind_producers` then calls :meth:`bind_producer`.
    wants_producer: ClassVar[bool] = False

    def bind_producer(
        self, producer: nn.Module | None, note: str | None = None
    ) -> nn.Module | None:
        """Receive the module whose output is this layer's input (``None`` where there is
        none; ``note`` then says why).  May return a replacement for the producer, which the
        caller installs in its place.  The default ignores it."""
        return None

    def release_producer(self, replacement: nn.Module) -> nn.Module | None:
        """Called by :func:`smallbn.convert` when ``replacement`` takes this layer's place:
        the module this layer installed in the model in place of its producer (MABN's
        weight-centred conv), to be turned back into a plain module computing the same
        function, or ``None``.  The default installed nothing."""
        return None

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """Per-channel ``(scale, shift)`` with ``y = scale·x + shift`` in eval mode, or ``None``
        where the eval output is not a per-channel affine map (batch-independent norms).

        For BN-style layers ``scale = γ / sqrt(running_var + eps)`` and
        ``shift = β − running_mean · scale``; this is what :func:`smallbn.fold` folds into
        the preceding convolution.
        """
        if not self.track_running_stats:
            return None
        running_mean, running_var = self.running_stats()
        return _affine_from_stats(running_mean, running_var, self.eps, self.weight, self.bias)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            running_mean, running_var = self.running_stats()
            running_mean.zero_()
            running_var.fill_(1)
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        return text + (", bias=False" if self.affine and self.bias is None else "")

    #: The layer's path in its model (``"layer1.0.bn1"``), which errors and warnings name;
    #: :func:`smallbn.convert` sets it on the layers it installs (any code may).
    model_path: str | None = None
    #: For a layer that accepts any input rank (``_input_dim = None``): the rank of the
    #: layer it replaced, set by :func:`smallbn.convert`, so that converting back gives
    #: ``BatchNorm1d/2d/3d`` as before.
    replaced_input_dim: int | None = None

    def input_dim(self) -> int | None:
        """The input rank this layer is for: 1 (``(N, C[, L])``), 2 or 3, or ``None`` (any)."""
        return self._input_dim or self.replaced_input_dim

    def describe(self) -> str:
        """How error messages name this layer: its path in the model when known."""
        short = f"{type(self).__name__}({self.num_features})"
        return f"{short} at '{self.model_path}'" if self.model_path else short

    def holds_population_statistics(self) -> bool:
        """Whether the running statistics describe data this layer saw (BN-style layers), not
        placeholders kept for a round trip back to BN (batch-independent norms)."""
        return self._running_stats_in_state_dict and self.running_mean is not None

    def normalization_batch(self) -> int | None:
        """The samples whose statistics normalize each sample in a training-mode forward
        where the layer splits its batch into consecutive groups (``norm_batch_size``, Ghost
        BN's ``group_size``); ``None`` where it normalizes the whole batch (or, for
        batch-independent norms, each sample alone)."""
        return getattr(self, "norm_batch_size", None)

    def lost_on_replacement(self, replacement: nn.Module) -> str:
        """What this layer's eval function loses when ``replacement`` takes its place and
        keeps its state (:func:`smallbn.convert` warns with it), ``""`` for nothing beyond
        the method itself (e.g. Switchable Norm's learned mixture)."""
        return ""

    # -- checks --------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(
                f"{self.describe()}: expected a floating-point input, got {x.dtype}. Convert "
                f"it first, e.g. x.float()."
            )
        expected = _RANKS.get(self._input_dim) if self._input_dim else None
        if (expected is not None and x.dim() not in expected) or x.dim() < 2:
            want = _SHAPES[self._input_dim] if self._input_dim else "(N, C, *spatial)"
            if self._input_dim:
                family = self._family or type(self).__name__.rstrip("123d")
                variants = ", ".join(f"{family}{d}d for {s}" for d, s in _SHAPES.items())
                hint = f"Use {variants}, or reshape the input."
            else:  # any rank >= 2 is accepted: only the batch or channel dim can be missing
                hint = (
                    "Add the missing batch dim (x.unsqueeze(0) for one sample), or reshape "
                    "the input."
                )
            raise ValueError(
                f"{self.describe()}: expected a {want} input, got a {x.dim()}D tensor of shape "
                f"{tuple(x.shape)}. {hint}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.describe()}: expected {self.num_features} channels in dim 1, got "
                f"{x.shape[1]} (input shape {tuple(x.shape)}). Build the layer with "
                f"num_features={x.shape[1]}, or check the output channels of the layer before it."
            )

    def host_step(self) -> int | None:
        """A step counter the layer keeps on the host, outside the ``state_dict`` (which
        stays BN's), that a resumed run needs to continue exactly — Shuffle BN's, which picks
        its next permutation; ``None`` for a layer without one."""
        return None

    def set_host_step(self, step: int) -> None:
        """Restore :meth:`host_step` (from a checkpoint of a job that saved it)."""
        raise NotImplementedError(f"{self.describe()} keeps no host step counter")

    def buffers_restored(self) -> None:
        """Tell the layer that its buffers were written directly (restored by a tool such as
        :func:`smallbn.precise_bn`), so it re-reads the host-side copies it keeps of them."""
        self._reload_host_state()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        """``Module._apply`` (``.half()``, ``.to(dtype)``, ``.cuda()``, …) keeping the
        :attr:`_float32_buffers` in float32 at least (float64 stays float64): sums and
        differences of stored statistics would lose their accuracy, or overflow, in a
        half-precision dtype (docs/methods.md: statistics in float32 at least)."""
        originals = {name: self._buffers.get(name) for name in self._float32_buffers}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers.get(name)
            if original is None or moved is None:
                continue
            dtype = torch.promote_types(torch.float32, moved.dtype)
            if moved.dtype != dtype:  # from the values before the cast, not rounded ones
                self._buffers[name] = original.to(device=moved.device, dtype=dtype)
        return self


class BatchStatsNorm(NormBase):
    """Base of the layers that normalize with statistics of the current batch in training.

    ``sync=True`` (or an explicit ``process_group``) pools the statistics of all processes
    of the group, weighted by each process's count, with gradients reaching every process's
    input; it is a no-op when torch.distributed is not initialized or the group has one
    member.
    """

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
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.sync = sync
        self.process_group = process_group

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (", sync=True" if self.sync or self.process_group is not None else "")

    # -- the forward template --------------------------------------------------------------

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        """Batch statistics in training (or without running stats), running ones in eval.

        ``args`` are passed on to ``_forward_train``/``_forward_eval`` (e.g. a domain id).
        """
        self._check_input(x)
        if self.training or not self.track_running_stats:
            group = self._sync_group()
            if group is not None:  # before any state changes and any statistics exchange
                self._check_ranks_agree(x, group)
            factor = self._advance_step()
            try:
                return self._forward_train(x, factor, *args)
            except Exception:
                self._undo_step(factor)
                raise
        return self._forward_eval(x, *args)

    def _forward_eval(self, x: Tensor, *args: Any) -> Tensor:
        return normalize_with_population(x, *self.running_stats(), self.eps, self.weight, self.bias)

    def _forward_train(self, x: Tensor, factor: float | None, *args: Any) -> Tensor:
        """Normalize with batch statistics; update running stats with ``factor`` if given."""
        raise NotImplementedError

    def _advance_step(self) -> float | None:
        """Count a training step; return the running-average factor, or None if not tracking."""
        if not (self.training and self.track_running_stats):
            return None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)  # cumulative moving average
        return self.momentum

    def _undo_step(self, factor: float | None) -> None:
        """Uncount a step whose batch was rejected (too small, NaN/Inf): a caller that skips
        the batch and goes on must find the layer as it was (the cumulative average and the
        BRN schedule read the step counter)."""
        if factor is not None:
            self.num_batches_tracked.sub_(1)  # type: ignore[union-attr]

    # -- batch statistics ----------------------------------------------------------------

    def _sync_group(self) -> _distributed.ProcessGroup | None:
        # As torch's SyncBatchNorm: never in eval mode, where batch statistics (without
        # running ones) are a per-process evaluation that other ranks need not join.
        if not self.training:
            return None
        return _distributed.active_group(self.sync, self.process_group)

    #: Options that decide how samples are grouped or pooled: ranks that differ in one of them
    #: exchange buffers of other sizes (a gloo abort) or pool unrelated statistics (silently).
    _sync_options: ClassVar[tuple[str, ...]] = (
        "group_size",
        "norm_batch_size",
        "num_domains",
        "window",
    )

    def _check_ranks_agree(self, x: Tensor, group: _distributed.ProcessGroup) -> None:
        """The ranks' agreement on this layer's configuration, at its first synchronized
        training call and every ``_SIGNATURE_INTERVAL`` calls after (one collective and one
        host read each time): every rank counts the same calls, so all check together.  A
        configuration that later changes on one rank is caught at the next check."""
        if torch.compiler.is_compiling():
            # A compiled step keeps no host counter (dynamo would recompile for each value):
            # only a layer never checked before checks, once.
            due = self._synchronized_calls == 0
            self._synchronized_calls = max(self._synchronized_calls, 1)
        else:
            due = self._synchronized_calls % _SIGNATURE_INTERVAL == 0
            self._synchronized_calls += 1
        if not due:
            return
        _distributed.check_same_on_all_ranks(
            self._sync_signature(x), group, x.device, self.describe(), _SYNC_FIX
        )

    def _sync_signature(self, x: Tensor) -> dict[str, int | str | None]:
        """What every rank of the sync group must agree on, checked once per synchronized
        training step by :func:`smallbn._distributed.check_same_on_all_ranks` (one small
        collective): layer type, channels, input dtype and the grouping options (``None``
        where a layer has no such option).  Batch and spatial sizes may differ."""
        options = {name: getattr(self, name, None) for name in self._sync_options}
        return {
            "layer type": type(self).__name__,
            "num_features": self.num_features,
            "input dtype": str(x.dtype),
            **options,
        }

    def _batch_moments(self, x: Tensor, differentiable: bool = True) -> Moments:
        """Per-channel moments over the batch, pooled across the process group if syncing.

        ``differentiable=False`` (layers whose backward is written out) returns them detached;
        unsynchronized, they then come from torch's fused statistics kernel
        (:func:`~smallbn.stats.detached_channel_moments`).
        """
        group = self._sync_group()
        if group is None and not differentiable:
            moments = detached_channel_moments(x)
        else:
            moments = channel_moments(x)
            if group is not None:
                moments = merge_moments(all_gather_moments(moments, group))
            if not differentiable:
                moments = moments.detach()
        local_count = x.numel() // x.shape[1]
        if local_count <= 1 and (group is None or float(moments.count) <= 1):
            self._raise_too_small(x, local_count if group is None else int(moments.count))
        self._check_finite(moments, x)
        return moments

    def _batch_norm(
        self,
        x: Tensor,
        affine: AffineFn | None = None,
        *,
        params: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> tuple[Tensor, Moments]:
        """Normalize ``x`` with its batch statistics (pooled across processes if syncing) and
        affine ``affine(moments)``, else ``params`` (a fixed ``(γ, β)`` such as one domain's
        rows), else the layer's ``(γ, β)``; returns the output and the moments.

        Unpooled, this runs torch's fused BN kernel — forward and backward at torch BN's
        speed — with ``affine`` evaluated on statistics computed beforehand without
        gradient (as Batch Renorm's r and d are); pooled, the differentiable core path.
        """
        weight, bias = (self.weight, self.bias) if params is None else params
        if self._sync_group() is None:
            if affine is None:
                local_count = x.numel() // x.shape[1]
                if local_count <= 1:
                    self._raise_too_small(x, local_count)
                y, moments = fused_batch_norm(x, weight, bias, self.eps)
                self._check_finite(moments, x)
                return y, moments
            with torch.no_grad():
                moments = self._batch_moments(x)
            weight, bias = affine(moments)
            return fused_batch_norm(x, weight, bias, self.eps)[0], moments
        moments = self._batch_moments(x)
        if affine is not None:
            weight, bias = affine(moments.detach())
        return normalize(x, moments.mean, moments.var, self.eps, weight, bias), moments

    def _grouped_moments(self, x: Tensor, index: Tensor, num_groups: int) -> Moments:
        """Moments per group of samples (``index[n]`` is sample n's group), pooled across
        processes if syncing: every rank must pass the same ``num_groups``."""
        return self._merge_groups(sample_moments(x), index, num_groups, x)

    def _merge_groups(
        self,
        instance: Moments,
        index: Tensor,
        num_groups: int,
        x: Tensor | None = None,
        *,
        check: bool = True,
    ) -> Moments:
        """:meth:`_grouped_moments` from the samples' instance moments ``(N, C)`` (``x``, the
        input, only makes a non-finite result's message precise; ``check=False`` leaves the
        finiteness check to the caller, e.g. after its own checks of the groups' sizes)."""
        moments = merge_moments(instance, index, num_groups)
        group = self._sync_group()
        if group is not None:
            moments = merge_moments(all_gather_moments(moments, group))
        if check:
            self._check_finite(moments, x)
        return moments

    def _sample_groups(self, x: Tensor, group_size: int) -> tuple[Tensor, int]:
        """Split the batch into consecutive groups of ``group_size`` samples (the last may be
        smaller, :func:`smallbn.stats.sample_groups`): each local sample's group index and the
        number of groups.  With synchronization, groups are formed over the concatenation of
        all processes' batches in rank order, so a group may span two processes."""
        size = x.shape[0]
        process_group = self._sync_group()
        offset, total = (0, size)
        if process_group is not None:
            offset, total = _distributed.rank_offset(size, process_group, x.device)
        groups = sample_groups(size, group_size, x.device, offset, total)
        per_sample = math.prod(x.shape[2:])
        smallest = groups.sizes[-1] * per_sample
        if smallest <= 1:
            short = (
                f": a batch that is a multiple of {group_size} has no short last group"
                if total % group_size and group_size * per_sample > 1
                else ""
            )
            what = f"its smallest group of samples (groups of {group_size}, batch {total}{short})"
            self._raise_too_small(x, smallest, what)
        return groups.index, groups.count

    def _normalize_groups(self, x: Tensor, group_size: int, factor: float | None) -> Tensor:
        """Normalize consecutive groups of ``group_size`` samples with each group's own
        statistics (Ghost BN), updating the running statistics from the groups."""
        index, num_groups = self._sample_groups(x, group_size)

        def statistics(instance: Moments) -> SampleNormalization:
            groups = self._merge_groups(instance, index, num_groups, x)
            self._update_running_from_groups(groups, factor)
            return groups.mean[index], groups.var[index], self.weight, self.bias

        return normalize_from_sample_moments(x, statistics, self.eps, (self.weight, self.bias))

    def _normalize_current_batch(
        self, x: Tensor, factor: float | None, group_size: int | None = None
    ) -> Tensor:
        """BN of ``x`` with its own batch statistics (per group of ``group_size`` samples when
        given and the batch is larger, pooled across processes if syncing), updating the
        running statistics: what a :attr:`statistics_pass` asks of a layer that otherwise
        pools past batches."""
        if group_size is not None and (x.shape[0] > group_size or self._sync_group()):
            return self._normalize_groups(x, group_size, factor)
        y, moments = self._batch_norm(x)
        self._update_running(moments.mean, moments.unbiased_var(), factor)
        return y

    def _update_running_from_groups(self, groups: Moments, factor: float | None) -> None:
        """Running statistics from groups: the count-weighted average of what the groups were
        normalized with (group means, Bessel-corrected group variances), so inference matches
        training rather than the spread of the whole batch (Wu & Johnson, 2021)."""
        if factor is not None:
            weight = (groups.count / groups.count.sum()).unsqueeze(-1)
            self._update_running(
                (weight * groups.mean).sum(0), (weight * groups.unbiased_var()).sum(0), factor
            )

    def _update_running(self, mean: Tensor, unbiased_var: Tensor, factor: float | None) -> None:
        """BN's running average of a batch mean and Bessel-corrected variance (if tracking)."""
        if factor is not None:
            update_running_stats(*self.running_stats(), mean, unbiased_var, factor)

    # -- population statistics (PreciseBN) -------------------------------------------------

    def population_moments(self, x: Tensor, *args: Any) -> Moments:
        """Moments of one batch of inputs for the population estimate of PreciseBN
        (Wu & Johnson 2021): per-channel count, mean and biased variance over ``(N, *spatial)``.
        ``args`` are the forward's extra arguments (e.g. a domain id)."""
        return channel_moments(x.detach())

    @torch.no_grad()
    def set_population_stats(self, population: Moments) -> None:
        """Store population moments (from :meth:`population_moments`, merged over batches)
        as running statistics: the population variance ``E[x²] − E[x]²`` is stored as is —
        no Bessel correction, it summarizes thousands of samples, not one batch."""
        running_mean, running_var = self.running_stats()
        running_mean.copy_(population.mean)
        running_var.copy_(population.var)

    def _raise_too_small(self, x: Tensor, count: int, what: str = "the batch") -> None:
        raise ValueError(
            f"{self.describe()}: training needs more than one value per channel to compute "
            f"batch statistics, but {what} has {count} (input shape {tuple(x.shape)}). Use a "
            f"larger batch, pool statistics across processes (sync=True), switch to a "
            f"batch-independent norm ('gn', 'ln', 'frozenbn'), or put the layer in eval mode."
        )
