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

**Derivatives, analytically** (paper §3.3; no extra autograd pass): ``∂μ/∂W`` is the mean
input patch and ``∂ν/∂W`` one weight-gradient convolution of the output itself
(:mod:`smallbn.layers._producer_derivatives`).  **The window** stores per slot μ, σ², the two
derivatives and the scalars ⟨∂μ, θ⟩, ⟨∂σ², θ⟩ at record time, so that compensating needs
only the current weights (no weight snapshots), and is exactly zero while they are unchanged
(:mod:`smallbn.layers._cross_iteration_window`).  The window is aggregated in the centred form
``σ̄² = mean_τ max(σ²_τ, 0) + mean_τ (μ_τ − μ̄)²`` (the max rule: ``max(ν, μ²) − μ² =
max(σ², 0)``) by the autograd Functions of :mod:`smallbn.layers._cross_iteration_functions`,
whose backward is written out.

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
(:func:`smallbn.stats.ema_after`; ``momentum=None``: the cumulative average over groups);
``iteration`` and ``num_batches_tracked`` count groups, so burn-in and
``window=None`` (k from the group size b) mean what they mean for ``GroupedNorm``.  A batch of
N ≤ b samples is one iteration.  A group of a single value per channel is an error before any
state changes (``GroupedNorm`` would fail at that group, after updating the earlier ones).
With ``sync=True`` the groups are formed over the concatenation of every process's batch in
rank order (:func:`smallbn.stats.sample_groups`; a group may span two processes), the
groups' moments and derivatives pooled across processes: two processes equal one process on
the concatenated batch.  (``GroupedNorm`` around a synchronized layer instead pools group g of
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

Why this module is long: the layer's two training paths (one iteration per call, with the
schedule computed on the device when compiled; ``G`` groups of one call) and its producer
binding (the hook that captures the producer's input, the checks that name the fix) share
the layer's state; the derivatives, the autograd Functions and the window live in their own
modules.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm
from smallbn.layers._cross_iteration_functions import (
    GroupedWindowNorm,
    WindowNorm,
    inverse_std,
    pool,
    pool_groups,
)
from smallbn.layers._cross_iteration_window import (
    COUNTERS,
    GRAD_BUFFERS,
    STAT_BUFFERS,
    BurnIn,
    BurninMode,
    IterationWindow,
)
from smallbn.layers._producer_derivatives import (
    PRODUCERS,
    Producer,
    as_groups,
    group_derivatives,
    plain_class,
    plain_forward,
    producer_derivatives,
)
from smallbn.stats import (
    Moments,
    affine_from_moments,
    apply_affine,
    ema_after,
    mean_var,
    sample_groups,
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

_Layer = TypeVar("_Layer", bound="CrossIterationBatchNorm")


class _GroupSamples(NamedTuple):
    """Where iterations recorded from groups of ``group_size`` samples lie: from sample
    ``first`` of the (global) batch on, of which this process holds samples from ``offset``."""

    first: int
    offset: int
    group_size: int


def recommended_window(batch_size: int) -> int:
    """The paper's window for a per-process batch of ``batch_size``: ``min(ceil(16/b), 8)``
    (§4.1: "pooling statistics over an effective batch of at least 16")."""
    if batch_size < 1:
        raise ValueError(f"recommended_window: batch_size must be >= 1, got {batch_size}")
    return min(math.ceil(16 / batch_size), 8)


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
    checkpoint creates them when it has them, so loading works before or after binding.
    Checkpoints carry a version (:attr:`_version`): a BN checkpoint (version 2) loads
    (strict) as an empty window at iteration 0.  Each training forward is an iteration
    (micro-batches of gradient accumulation included); with ``norm_batch_size``, each group
    of a training batch is.
    """

    _family = "CrossIterationBatchNorm"
    #: The state_dict version (``state_dict._metadata[prefix]["version"]``, as torch's BN
    #: has 2): 3 holds the window as stored now, and loads as it is; a checkpoint of version
    #: ≤ 2 or without one (a BN checkpoint, CBN's from before the version) is migrated
    #: (:meth:`_migrate`).
    _version = 3
    wants_producer = True
    #: GroupedNorm may call this layer on consecutive groups of its producer's output; it
    #: then sets ``sample_slice`` so the matching rows of the producer's input are used.
    accepts_sample_slice = True

    #: b of the simulated normalization batches, or ``None`` (a class default too, so that
    #: layers pickled before the option existed still train).
    norm_batch_size: int | None = None
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
        for counter in COUNTERS:
            self.register_buffer(counter, torch.tensor(0, dtype=torch.long, device=device))
        for buffer in (*STAT_BUFFERS, *GRAD_BUFFERS):
            self.register_buffer(buffer, None)
        # The window works on these buffers (this layer's state_dict keys) and keeps the
        # host copies of the counters: reading the buffers every step would synchronize
        # with the device.
        self._stored = IterationWindow(self._buffers)
        self._auto_window: int | None = None
        self._warned: set[str] = set()
        self._pending_warnings: tuple[str, ...] = ()
        # The producer and its hook live outside the module tree (no duplicate parameters).
        self.__dict__["_producer"] = None
        self.__dict__["_hook"] = None
        self.__dict__["_captured"] = None
        self.sample_slice: slice | None = None
        if self.window is not None and self.window > 1:
            self._stored.allocate_stats(self.window, self.num_features, self._state_dtype())

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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_stored" not in self.__dict__:  # pickled before the window object existed
            for old in ("_iteration", "_fill", "_slots", "_group_index", "_host_stale"):
                self.__dict__.pop(old, None)
            self._stored = IterationWindow(self._buffers)
            self._stored.stale = True  # the host copies are read from the buffers

    @property
    def window_size(self) -> int | None:
        """k in force: the window buffers' length, the constructor's ``window``, or the one
        chosen from the first batch; ``None`` while still to be chosen."""
        size = self._stored.size
        if size is not None:
            return size
        return self.window if self.window is not None else self._auto_window

    @property
    def _iteration(self) -> int:
        """The host copy of ``iteration`` (the window keeps it; the tests compare it)."""
        return self._stored.counters()[0]

    @property
    def _fill(self) -> int:
        """The host copy of ``window_fill`` (the window keeps it; the tests compare it)."""
        return self._stored.counters()[1]

    def _burn_in(self) -> BurnIn:
        return BurnIn(self.burnin, self.burnin_mode)

    def effective_window(self, iteration: int | None = None) -> int:
        """Iterations pooled at training ``iteration`` (0-based; default: the next one),
        burn-in applied; before k is chosen (``window=None``, no batch seen) k counts as 1."""
        step = self._stored.counters()[0] if iteration is None else int(iteration)
        return self._burn_in().window_at(step, self.window_size or 1)

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
            and isinstance(producer, PRODUCERS)
            and type(producer).forward is not plain_forward(producer)
        ):
            # e.g. timm's Conv2dSame (pads in its forward), weight-standardized convs: the
            # derivatives below are those of the plain conv of the stored weight on the
            # module's input, which such a forward does not compute (a oneDNN shape error
            # at the first step, or silently wrong compensation).
            raise ValueError(
                f"{self.describe()}: bind_producer got a {type(producer).__name__}, whose "
                f"forward is not {plain_class(producer).__name__}'s (it pads or transforms "
                f"its weight itself), so its statistics' derivatives are not those of a plain "
                f"conv. Leave the layer unbound (naive cross-iteration pooling) or replace "
                f"the producer by a plain {plain_class(producer).__name__} that computes the "
                f"same (e.g. an explicit nn.ZeroPad2d before it)."
            )
        bound: Producer | None = producer if isinstance(producer, PRODUCERS) else None
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
                f"{', '.join(t.__name__ for t in PRODUCERS)})"
            )
        previous = self.producer
        self.__dict__["_producer"] = bound
        self._sync_hook(force=True)
        if previous is not None and bound is not previous:
            # Stored derivatives belong to the other layer's weights.
            self._stored.drop_grads()
            self._stored.set_fill(0)
        if bound is None:
            if self.compensate:
                self._warn_once(
                    "no_producer",
                    f"no producing conv/linear layer ({note or 'none given'}): statistics are "
                    f"pooled across iterations without Taylor compensation (naive "
                    f"cross-iteration BN). If the input does come from a conv or linear "
                    f"layer, bind it with layer.bind_producer(conv).",
                )
            self._stored.drop_grads()
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
    _float32_buffers = (*STAT_BUFFERS, *GRAD_BUFFERS)

    def _state_dtype(self) -> torch.dtype:
        if self.window_mean is not None:
            return torch.promote_types(torch.float32, self.window_mean.dtype)
        reference = self.running_mean if self.running_mean is not None else self.weight
        base = reference.dtype if reference is not None else torch.float32
        return torch.promote_types(torch.float32, base)

    def _grad_shapes(self, k: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The derivative buffers' shapes for the bound producer (the conv weight's size per
        slot), or ``None`` where nothing is compensated."""
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
        if shapes is None or self._stored.grad_shapes_fit(shapes):
            return
        stored = self._stored.grad_shapes()
        if stored:
            self._warn_once(
                "grad_shape",
                f"the stored derivatives (shapes {stored}) do not fit the bound producer "
                f"({list(shapes)}): the window restarts.",
            )
        self._stored.allocate_grads(shapes, self._state_dtype())

    def reset_window(self) -> None:
        """Forget the stored iterations (the iteration count, hence burn-in, is kept)."""
        self._stored.set_fill(0)

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
            if not self._stored.allocated:
                self._stored.allocate_stats(k, self.num_features, self._state_dtype())
            self._prepare_grads(k)
        return k

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
        window = self._stored
        if compiled:
            plan = window.device_schedule(self._burn_in(), k)
        else:
            plan = window.host_schedule(self._burn_in(), k, x.device)
        local = self._sync_group() is None
        inside, drop = self.eps_placement == "inside", self.aggregation == "drop"
        fused = plan.past == 0 and inside  # plain BN: torch's fused kernel where unsynchronized
        if fused:
            y, moments = self._batch_norm(x)
        elif local:  # the gradient through them is WindowNorm's
            moments = self._batch_moments(x, differentiable=False)
        else:
            moments = self._batch_moments(x)  # pooled across processes, with gradient
        if plan.record:
            own = moments.detach()  # stored as G = 1 iterations
            stacked = Moments(own.count.unsqueeze(0), own.mean.unsqueeze(0), own.var.unsqueeze(0))
            self._record(x, stacked, captured, plan.slot, plan.keep)
        products = None
        if self._compensating() and (plan.record or plan.past > 0):
            products = self._inner_products()
            if plan.record:  # the scalars ⟨∂, θ⟩ at record time, from the same batched product
                window.store_products(plan.slot, products, plan.keep)
        if not fused:
            if plan.past > 0:
                past_mean, past_var = window.past(plan.index, products)
            else:  # eps outside the square root: not BN even without stored iterations
                past_mean = past_var = moments.mean.detach().new_zeros((0, self.num_features))
            if local:
                y = WindowNorm.apply(
                    x, moments.mean, moments.var, self.weight, self.bias,
                    past_mean, past_var, plan.valid, self.eps, inside, drop,
                )  # fmt: skip
            else:  # moments pooled across processes: autograd through the all-gather
                mean, var, _ = pool(
                    moments.mean, moments.var, past_mean, past_var, drop, plan.valid
                )
                inv_std = inverse_std(var, self.eps, inside)
                scale, shift = affine_from_moments(mean, inv_std, self.weight, self.bias)
                y = apply_affine(x, scale, shift)
        self._update_running(moments.mean, moments.unbiased_var(), factor)
        if compiled:
            # The counters advance on the device only: a host int read by the compiled
            # step would be a guard on its value, so a recompilation at every step.  The
            # host copies are re-read once, by the next eager step that needs them.
            assert isinstance(plan.fill, Tensor)
            window.advance_on_device(plan.fill)
        else:
            assert isinstance(plan.fill, int)
            window.advance(1, plan.fill)
        return y

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
        window = self._stored
        # Cached per batch layout: no index built per step.
        split = window.cached(
            ("samples", offset, samples, size, total, device),
            lambda: sample_groups(samples, size, device, offset, total),
        )
        num, index = split.count, split.index
        smallest = split.sizes[-1] * math.prod(x.shape[2:])
        if smallest <= 1:
            what = f"its smallest group of samples (norm_batch_size={size}, batch {total})"
            self._raise_too_small(x, smallest, what)
        local = self._sync_group() is None
        if local and split.equal:  # equal groups: two passes over x, no merging
            with torch.no_grad():  # the gradient through them is GroupedWindowNorm's
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
        step, fill = window.counters()
        pasts, records, fill = window.group_schedule(self._burn_in(), step, fill, num, k)
        # The timeline: the groups' own moments at positions 0 … G − 1, then the stored
        # iterations t − 1, t − 2, … (compensated) at G, G + 1, …
        stored = max(max(past - g for g, past in enumerate(pasts)), 0)
        timeline_mean, timeline_var = current.mean, current.var
        if stored:
            products = self._inner_products() if self._compensating() else None
            old_mean, old_var = window.past(window.slot_index(step, k, stored, device), products)
            timeline_mean = torch.cat([timeline_mean, old_mean.to(timeline_mean.dtype)])
            timeline_var = torch.cat([timeline_var, old_var.to(timeline_var.dtype)])
        # Entry τ = 1 … k − 1 of group g: iteration t + g − τ, pooled if τ <= pasts[g].
        key = (num, stored, tuple(pasts), k)
        gather = window.cached_index(
            ("gather", *key),
            lambda: [
                [(g - tau if tau <= g else num + tau - g - 1) if tau <= past else 0
                 for tau in range(1, k)]
                for g, past in enumerate(pasts)
            ],
            device,
        )  # fmt: skip
        valid = window.cached_index(
            ("valid", *key),
            lambda: [[tau <= past for tau in range(1, k)] for past in pasts],
            device,
            torch.bool,
        )
        past_mean, past_var = timeline_mean[gather], timeline_var[gather]  # (G, k − 1, C)
        # Records that a later call can read: the last k groups' (records are monotone in t).
        recorded = [g for g in range(max(num - k, 0), num) if records[g]]
        if recorded:
            first = recorded[0]
            slots = window.cached_index(
                ("slots", (step + first) % k, num - first, k),
                lambda: [(step + g) % k for g in range(first, num)],
                device,
            )
            samples = _GroupSamples(first * size, offset, size)
            self._record(x, current[first:], captured, slots, samples=samples)
            if self._compensating():
                # ⟨∂, θ⟩ at record time, from the batched product that later calls repeat.
                window.store_products(slots, self._inner_products())
        inside, drop = self.eps_placement == "inside", self.aggregation == "drop"
        if local:
            y = GroupedWindowNorm.apply(
                x, groups.mean, groups.var, groups.count, index, self.weight, self.bias,
                past_mean, past_var, valid, self.eps, inside, drop,
            )  # fmt: skip
        else:  # moments pooled across processes: autograd through the all-gather
            mean, var, _ = pool_groups(groups.mean, groups.var, past_mean, past_var, valid, drop)
            inv_std = inverse_std(var, self.eps, inside)
            scale, shift = affine_from_moments(mean, inv_std, self.weight, self.bias)
            y = apply_affine(x, scale[index], shift[index])
        if factor is not None:
            self._update_running_per_iteration(current)
        window.advance(num, fill)
        return y

    @torch.no_grad()
    def _update_running_per_iteration(self, groups: Moments) -> None:
        """BN's running average updated once per group, in order, as ``G`` calls would
        (:func:`~smallbn.stats.ema_after`, in closed form; ``momentum=None``: the
        cumulative average, counting groups); ``num_batches_tracked`` counts the groups."""
        running_mean, running_var = self.running_stats()
        assert self.num_batches_tracked is not None
        channels = groups.mean.shape[1]
        dtype = torch.promote_types(running_mean.dtype, groups.mean.dtype)
        start = torch.cat([running_mean.to(dtype), running_var.to(dtype)])
        values = torch.cat([groups.mean, groups.unbiased_var()], dim=1).to(dtype)
        # The forward template counted one step already, so the cumulative average had seen
        # num_batches_tracked − 1 before the first group: a device tensor, no host read.
        seen = self.num_batches_tracked - 1
        after = ema_after(start, values, seen, self.momentum)
        running_mean.copy_(after[:channels])
        running_var.copy_(after[channels:])
        self.num_batches_tracked.add_(groups.mean.shape[0] - 1)

    @torch.no_grad()
    def _record(
        self,
        x: Tensor,
        moments: Moments,
        captured: tuple[Any, Any] | None,
        slots: Tensor,
        keep: Tensor | None = None,
        samples: _GroupSamples | None = None,
    ) -> None:
        """Store ``G ≥ 1`` iterations' statistics (``moments``, ``(G, C)``) and derivatives
        in ``slots`` (``(G,)``), where ``keep`` (a 0-dim bool on the device, if given) is true.

        One iteration (``samples=None``): ``x`` is its batch.  Groups of ``b`` samples of
        one call (``norm_batch_size``): ``samples`` says where they lie in this process's
        batch; their derivatives come from one batched computation.
        """
        producer = self.producer
        grads = None
        if producer is not None and self._stored.has_grads:  # else compensate=False
            grads = self._derivatives(producer, x, moments, captured, samples)
        self._stored.store(slots, moments.mean, moments.var, grads, keep)
        if producer is None:
            # Entries stored from now on have no derivatives: drop stale ones (e.g. loaded
            # before a producer was bound), so that a later binding restarts the window.
            self._stored.drop_grads()
            if self.compensate:
                self._warn_once(
                    "no_producer",
                    "no producing layer is bound (call smallbn.bind_producers(model) after "
                    "building the model, or layer.bind_producer(conv)): statistics are pooled "
                    "across iterations without Taylor compensation (naive cross-iteration BN).",
                )

    def _derivatives(
        self,
        producer: Producer,
        x: Tensor,
        moments: Moments,
        captured: tuple[Any, Any] | None,
        samples: _GroupSamples | None,
    ) -> tuple[Tensor, Tensor]:
        """``(∂μ/∂W, ∂σ²/∂W)`` of the ``G`` iterations of :meth:`_record`, ``(G, groups, P)``
        and ``(G, C_out, P)``, pooled across processes when syncing; zeros (uncompensated
        entries) where ``x`` is not the producer's output."""
        assert self.window_mean_grad is not None and self.window_var_grad is not None
        mean_buffer, var_buffer = self.window_mean_grad, self.window_var_grad
        dtype, num = var_buffer.dtype, moments.mean.shape[0]
        u = self._producer_input(x, captured)
        group = self._sync_group()
        if u is None:
            grads = (
                mean_buffer.new_zeros(num, *mean_buffer[:, 0].shape),
                var_buffer.new_zeros(num, *var_buffer[:, 0].shape),
            )
        elif samples is None:
            # Unsynchronized, the count is this batch's, known on the host from the shape.
            count = moments.count[0] if group is not None else float(x.numel() // x.shape[1])
            with torch.autocast(x.device.type, enabled=False):
                one = producer_derivatives(producer, u, x, moments.mean[0], count, dtype)
            grads = (one[0].unsqueeze(0), one[1].unsqueeze(0))
        else:
            # This process's samples of the recorded groups, laid out (G, b, ...).
            size = samples.group_size
            start = max(samples.first - samples.offset, 0)
            lead = max(samples.offset - samples.first, 0) if start < x.shape[0] else 0
            with torch.autocast(x.device.type, enabled=False):
                grads = group_derivatives(
                    producer,
                    as_groups(u, start, lead, num, size),
                    as_groups(x, start, lead, num, size),
                    moments.mean,
                    moments.count,
                    dtype,
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
        return grads

    def _compensating(self) -> bool:
        return self.compensate and self.producer is not None and self._stored.has_grads

    def _inner_products(self) -> tuple[Tensor, Tensor]:
        """The window's ``(⟨∂μ, θ_t⟩, ⟨∂σ², θ_t⟩)`` with the producer's current weights."""
        producer = self.producer
        assert producer is not None
        return self._stored.inner_products(producer.weight, producer.bias)

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint_refusal(self, state_dict: dict[str, Any], prefix: str) -> str | None:
        """A checkpoint whose window holds another number of iterations than this layer's
        ``window``: refused before anything is copied (the window buffers otherwise take the
        checkpoint's shapes whatever the version: they depend on the producer)."""
        stored = state_dict.get(prefix + "window_mean")
        if stored is None or self.window is None or stored.shape[0] == self.window:
            return None
        return (
            f"{self.describe()}: the checkpoint holds a window of {stored.shape[0]} "
            f"iterations, this layer was built with window={self.window}. Build it with "
            f"window={stored.shape[0]} (or window=None to take the checkpoint's)."
        )

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        """Before version 3 (a BN checkpoint, CBN's from before the version, or a state_dict
        without ``_metadata``, which torch passes as ``None``) missing counters start the
        window afresh; version 3 loads the counters as they are (a missing one is a missing
        key, not a guessed BN checkpoint)."""
        super()._migrate(state_dict, prefix, version)
        if version is None or version < 3:
            self._stored.migrate_before_version_3(state_dict, prefix)

    def _reload_host_state(self) -> None:
        self._stored.reload()

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """The window's buffers take the checkpoint's shapes (any version); stored iterations
        of a checkpoint that lacks this layer's derivative buffers (saved without a bound
        producer) cannot be compensated: the window restarts, with a warning."""
        dropped = self._stored.fit_checkpoint(state_dict, prefix, self._state_dtype())
        if dropped > 0:
            warnings.warn(
                f"{self.describe()}: the checkpoint's window ({dropped} stored iterations) "
                f"was saved without the derivatives this layer compensates with (no producer "
                f"bound, or compensate=False), so its entries cannot be compensated: the "
                f"window restarts empty. Bind the producer (smallbn.bind_producers) before "
                f"saving to keep it; otherwise the next steps pool fewer iterations.",
                RuntimeWarning,
                stacklevel=5,
            )


class CrossIterationBatchNorm1d(CrossIterationBatchNorm):
    """Cross-Iteration BN for ``(N, C)`` or ``(N, C, L)`` inputs (after a Linear or Conv1d)."""

    _input_dim = 1


class CrossIterationBatchNorm2d(CrossIterationBatchNorm):
    """Cross-Iteration BN for ``(N, C, H, W)`` inputs (after a Conv2d)."""

    _input_dim = 2


class CrossIterationBatchNorm3d(CrossIterationBatchNorm):
    """Cross-Iteration BN for ``(N, C, D, H, W)`` inputs (after a Conv3d)."""

    _input_dim = 3
