"""The window of Cross-Iteration BN (Yao et al., CVPR 2021; docs/methods.md, "Cross-Iteration
BN"): the statistics and derivatives of the last ``k`` training iterations, which of them each
step pools and stores, and how they load from a checkpoint.

**Storage.**  Per window slot (iteration t lives in slot ``t mod k``): μ and the biased σ²
(C each), the two derivative tensors (``C_in·K`` and ``C_out·C_in/groups·K``: the conv
weight's size) and the scalars ⟨∂μ, θ⟩, ⟨∂σ², θ⟩ evaluated at the weights of record time
(C each).  Then

    ⟨∂μ_{t−τ}, θ_t − θ_{t−τ}⟩ = ⟨∂μ_{t−τ}, θ_t⟩ − (recorded scalar)

needs only the current weights: no weight snapshots, ``k·(|W| + C_in·K) + O(k·C)`` numbers
per layer.  Storing σ² and ∂σ² rather than ν and ∂ν is the same first-order term
(``ν(θ_t) − μ(θ_t)² = σ² + ⟨∂σ², Δθ⟩ − ⟨∂μ, Δθ⟩²``, exact algebra) without the cancellation
of ``E[x²] − E[x]²`` in float32, and the recorded scalars stay of the size of σ² (by
homogeneity ⟨∂σ²_j, W_j⟩ = 2σ²_j).  The scalars of a slot and the inner products that later
use them come from the same batched product of the whole window with the weights
(:meth:`IterationWindow.inner_products`), so the compensation is exactly zero while the
weights are unchanged (micro-batches of gradient accumulation, frozen producers).

**Where the state lives.**  The tensors are the layer's buffers, under the layer's
``state_dict`` keys (``iteration``, ``window_fill``, ``window_mean``, …): the window reads and
writes them in the layer's own buffer dict, so checkpoints, ``.to()``, copies and
``torch.compile`` see ordinary buffers.  The window keeps host copies of the two counters,
so that an eager step reads nothing back from the device; compiled steps advance the buffers
only (a host int read by compiled code is a guard on its value: a recompilation per step),
and the host copies are re-read once by the next eager use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = [
    "COUNTERS",
    "GRAD_BUFFERS",
    "STAT_BUFFERS",
    "BurnIn",
    "BurninMode",
    "IterationWindow",
    "Schedule",
]

BurninMode = Literal["two_stage", "linear"]

#: The counters: training iterations seen, and recent iterations stored (0-dim long each).
COUNTERS = ("iteration", "window_fill")
#: Per-slot statistics, shape (k, C): μ, biased σ², and ⟨∂μ, θ⟩, ⟨∂σ², θ⟩ at record time.
STAT_BUFFERS = ("window_mean", "window_var", "window_mean_dot", "window_var_dot")
#: Per-slot derivatives: ∂μ/∂W (groups, k, C_in/groups·K) and ∂σ²/∂W (C_out, k, C_in/groups·K).
GRAD_BUFFERS = ("window_mean_grad", "window_var_grad")

_Cached = TypeVar("_Cached")


class BurnIn(NamedTuple):
    """The window in force at each iteration: plain BN (k = 1) for the first ``iterations``
    (``"two_stage"``, the paper's) or k growing linearly to its value at ``iterations``
    (``"linear"``, the release's), then k."""

    iterations: int
    mode: BurninMode

    def window_at(self, step: int, k: int) -> int:
        """Iterations pooled at (0-based) iteration ``step``, current included."""
        if step >= self.iterations:
            return k
        if self.mode == "linear":
            return 1 + (k - 1) * step // self.iterations
        return 1

    def window_on_device(self, step: Tensor, k: int) -> Tensor:
        """:meth:`window_at` of iteration tensors (``iterations > 0``)."""
        if self.mode == "linear":
            during = 1 + (k - 1) * step // self.iterations
        else:
            during = torch.ones_like(step)
        return torch.where(step >= self.iterations, k, during)

    def needs_record(self, step: int, k: int) -> bool:
        """Whether a later iteration of the next k − 1 pools iteration ``step``'s statistics
        (after burn-in, the next one does whenever k > 1: no loop on the step's path)."""
        if step >= self.iterations:
            return k > 1
        return any(self.window_at(step + d, k) - 1 >= d for d in range(1, k))


class Schedule(NamedTuple):
    """One training step's use of the window (:meth:`IterationWindow.host_schedule`,
    :meth:`IterationWindow.device_schedule`).

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


def put_slots(buffer: Tensor, dim: int, slots: Tensor, rows: Tensor, keep: Tensor | None) -> None:
    """``buffer``'s entries ``slots`` (an index along ``dim``) ← ``rows`` (one per slot along
    ``dim``), left as they were where ``keep`` is false.  An index tensor, not an int: the
    compiled step computes the slot on the device (``t mod k``)."""
    rows = rows.to(buffer.dtype)
    if keep is not None:
        rows = torch.where(keep, rows, buffer.index_select(dim, slots))
    buffer.index_copy_(dim, slots, rows)


class IterationWindow:
    """The stored iterations of one Cross-Iteration BN layer (module docstring).

    ``buffers`` is the layer's own buffer dict (``module._buffers``): the window's tensors
    are registered there, under the layer's ``state_dict`` keys; the derivative buffers are
    ``None`` without a producer, the statistics ones until k is known (``window=None``).
    ``iteration`` and ``fill`` are the host copies of the counters (:meth:`counters`
    re-reads them when ``stale``, after compiled steps).
    """

    def __init__(self, buffers: dict[str, Tensor | None]) -> None:
        self.buffers = buffers
        self.iteration = 0
        self.fill = 0
        self.stale = False
        # Host-built index tensors by schedule: no host→device copy per step.
        self._cache: dict[tuple[Any, ...], Any] = {}

    def _tensor(self, name: str) -> Tensor:
        value = self.buffers[name]
        assert value is not None, f"{name} is not allocated"
        return value

    @property
    def allocated(self) -> bool:
        """Whether the statistics buffers exist (k > 1 is known)."""
        return self.buffers["window_mean"] is not None

    @property
    def has_grads(self) -> bool:
        """Whether the derivative buffers exist (a producer is bound, ``compensate=True``)."""
        return self.buffers["window_mean_grad"] is not None and (
            self.buffers["window_var_grad"] is not None
        )

    @property
    def size(self) -> int | None:
        """k of the allocated buffers, or ``None``."""
        mean = self.buffers["window_mean"]
        return None if mean is None else int(mean.shape[0])

    # -- counters ------------------------------------------------------------------------

    def counters(self) -> tuple[int, int]:
        """``(iteration, fill)`` on the host; re-read from the buffers (one host read) after
        compiled steps, which advance the buffers only."""
        if self.stale:
            self.reload()
        return self.iteration, self.fill

    def reload(self) -> None:
        """Re-read the host copies of the counters from the buffers (after a checkpoint
        loads, after :func:`smallbn.precise_bn` restores them, after compiled steps)."""
        self.iteration = int(self._tensor("iteration"))
        self.fill = min(int(self._tensor("window_fill")), self.size or 1)
        self.stale = False

    def set_fill(self, fill: int) -> None:
        self.fill = fill
        self._tensor("window_fill").fill_(fill)

    def advance(self, steps: int, fill: int) -> None:
        """Count ``steps`` eager iterations, after which ``fill`` iterations are stored."""
        self.iteration += steps
        self._tensor("iteration").fill_(self.iteration)
        self.set_fill(fill)

    def advance_on_device(self, fill: Tensor) -> None:
        """Count one compiled iteration on the device only (the host copies go stale)."""
        self._tensor("iteration").add_(1)
        self._tensor("window_fill").copy_(fill)
        self.stale = True

    # -- allocation ----------------------------------------------------------------------

    def allocate_stats(self, k: int, channels: int, dtype: torch.dtype) -> None:
        """Empty statistics buffers for a window of ``k``."""
        device = self._tensor("iteration").device
        for name in STAT_BUFFERS:
            self.buffers[name] = torch.zeros(k, channels, device=device, dtype=dtype)

    def grad_shapes_fit(self, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
        """Whether both derivative buffers exist with these shapes."""
        current = (self.buffers["window_mean_grad"], self.buffers["window_var_grad"])
        return all(
            t is not None and tuple(t.shape) == s for t, s in zip(current, shapes, strict=True)
        )

    def grad_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the derivative buffers that exist."""
        return [tuple(t.shape) for name in GRAD_BUFFERS if (t := self.buffers[name]) is not None]

    def allocate_grads(
        self, shapes: tuple[tuple[int, ...], tuple[int, ...]], dtype: torch.dtype
    ) -> None:
        """Fresh derivative buffers: they cannot compensate stored entries, so the window
        restarts."""
        device = self._tensor("iteration").device
        for name, shape in zip(GRAD_BUFFERS, shapes, strict=True):
            self.buffers[name] = torch.zeros(shape, device=device, dtype=dtype)
        self.set_fill(0)

    def drop_grads(self) -> None:
        """No derivatives (no producer): entries stored from now on are not compensated."""
        for name in GRAD_BUFFERS:
            self.buffers[name] = None

    # -- schedule ------------------------------------------------------------------------

    def cached(self, key: tuple[Any, ...], build: Callable[[], _Cached]) -> _Cached:
        """``build()``, built once per ``key`` (index tensors of a schedule)."""
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= 256:  # burn-in ramps make new schedules: keep it small
                self._cache.clear()
            value = self._cache[key] = build()
        return value  # type: ignore[no-any-return]

    def cached_index(
        self,
        key: tuple[Any, ...],
        build: Callable[[], list[Any]],
        device: torch.device,
        dtype: torch.dtype = torch.long,
    ) -> Tensor:
        """``torch.tensor(build())`` on ``device``, built once per ``key``."""
        return self.cached(
            (*key, device, dtype), lambda: torch.tensor(build(), dtype=dtype, device=device)
        )

    def slot_index(self, step: int, k: int, past: int, device: torch.device) -> Tensor:
        """Slots of iterations ``step − 1 … step − past`` (cached: no host→device copy)."""
        # k too: a loaded checkpoint may change it
        return self.cached_index(
            ("past", step % k, past, k),
            lambda: [(step - tau) % k for tau in range(1, past + 1)],
            device,
        )

    def host_schedule(self, burn_in: BurnIn, k: int, device: torch.device) -> Schedule:
        """This step's schedule from the host-side counters (eager: no device work, the index
        tensors are cached per position in the window)."""
        step, fill = self.counters()
        past = min(burn_in.window_at(step, k) - 1, fill)
        record = k > 1 and burn_in.needs_record(step, k)
        slot = self.cached_index(("slot", step % k), lambda: [step % k], device)
        index = self.slot_index(step, k, past, device) if past > 0 else slot[:0]
        fill = min(fill + 1, k) if record else 0
        return Schedule(past, record, slot, index, None, None, fill)

    def device_schedule(self, burn_in: BurnIn, k: int) -> Schedule:
        """This step's schedule computed on the device from the ``iteration`` and
        ``window_fill`` buffers, for a compiled step: one graph for every step.

        Every stored slot is gathered (``past = k − 1``) and ``valid`` masks the entries
        the eager schedule would not pool, ``τ <= min(k_t − 1, fill)`` with ``k_t`` the
        burn-in window at iteration t; the slot ``t mod k`` is written where some iteration
        of the next ``k − 1`` pools it (``keep``; always after burn-in), and left as it was
        elsewhere, as the eager step leaves it.
        """
        step, fill = self._tensor("iteration"), self._tensor("window_fill")
        if k == 1:  # plain BN: no window, nothing stored
            empty = torch.zeros(0, dtype=torch.long, device=step.device)
            return Schedule(0, False, empty, empty, None, None, torch.zeros_like(fill))
        taus = torch.arange(1, k, device=step.device)  # τ = 1 … k − 1
        slot = step.remainder(k).view(1)
        index = (step - taus).remainder(k)
        keep: Tensor | None = None
        if burn_in.iterations == 0:  # the full window from the start (host-known)
            limit = fill.clamp_max(k - 1)
        else:
            limit = torch.minimum(burn_in.window_on_device(step, k) - 1, fill)
            keep = (burn_in.window_on_device(step + taus, k) - 1 >= taus).any()
        grown = (fill + 1).clamp_max(k)
        after = grown if keep is None else torch.where(keep, grown, 0)
        return Schedule(k - 1, True, slot, index, taus <= limit, keep, after)

    @staticmethod
    def group_schedule(
        burn_in: BurnIn, step: int, fill: int, num: int, k: int
    ) -> tuple[list[int], list[bool], int]:
        """For iterations ``step … step + num − 1``: the stored iterations each pools, whether
        each is recorded, and the window fill after the last — :meth:`host_schedule`'s
        bookkeeping, iteration by iteration."""
        pasts, records = [], []
        for t in range(step, step + num):
            pasts.append(min(burn_in.window_at(t, k) - 1, fill))
            record = k > 1 and burn_in.needs_record(t, k)
            records.append(record)
            fill = min(fill + 1, k) if record else 0
        return pasts, records, fill

    # -- storage and compensation ----------------------------------------------------------

    def store(
        self,
        slots: Tensor,
        mean: Tensor,
        var: Tensor,
        grads: tuple[Tensor, Tensor] | None,
        keep: Tensor | None = None,
    ) -> None:
        """Store ``G`` iterations in ``slots`` (``(G,)``): their ``mean`` and ``var``
        ``(G, C)`` and, with derivative buffers, ``grads`` (``(G, groups, P)``,
        ``(G, C_out, P)``); nothing where ``keep`` (a 0-dim bool on the device) is false."""
        put_slots(self._tensor("window_mean"), 0, slots, mean, keep)
        put_slots(self._tensor("window_var"), 0, slots, var, keep)
        if grads is not None:
            mean_grad, var_grad = (self._tensor(name) for name in GRAD_BUFFERS)
            put_slots(mean_grad, 1, slots, grads[0].transpose(0, 1), keep)
            put_slots(var_grad, 1, slots, grads[1].transpose(0, 1), keep)

    def store_products(
        self, slots: Tensor, products: tuple[Tensor, Tensor], keep: Tensor | None = None
    ) -> None:
        """Record ``⟨∂μ, θ⟩, ⟨∂σ², θ⟩`` of ``slots`` from :meth:`inner_products` at the
        current weights (the batched product that later steps repeat)."""
        for name, dot in zip(("window_mean_dot", "window_var_dot"), products, strict=True):
            put_slots(self._tensor(name), 0, slots, dot.index_select(0, slots), keep)

    @torch.no_grad()
    def inner_products(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(⟨∂μ, θ_t⟩, ⟨∂σ², θ_t⟩)`` of every slot with the producer's current ``weight``
        and ``bias``, ``(k, C)`` each.

        One batched product over the whole window: a slot's value does not depend on which
        slots are in use, so it is bit-for-bit the one recorded while θ is unchanged.
        """
        mean_grad, var_grad = (self._tensor(name) for name in GRAD_BUFFERS)
        groups, k, per_channel = mean_grad.shape
        channels = var_grad.shape[0]
        weight = weight.detach().to(var_grad.dtype).reshape(channels, per_channel)
        with torch.autocast(weight.device.type, enabled=False):  # bmm would run in half
            # (C, 1, P) @ (C, P, k): a transposed operand, no copy; twice as fast on CPU
            # as (C, k, P) @ (C, P, 1).
            var_dot = torch.bmm(weight.unsqueeze(1), var_grad.transpose(1, 2)).reshape(channels, k)
            var_dot = var_dot.t()
            mean_dot = torch.bmm(
                weight.reshape(groups, channels // groups, per_channel), mean_grad.transpose(1, 2)
            ).reshape(channels, k)
        if bias is not None:  # ∂μ/∂b = 1, ∂σ²/∂b = 0
            mean_dot = mean_dot + bias.detach().to(mean_dot.dtype).unsqueeze(1)
        return mean_dot.t(), var_dot

    @torch.no_grad()
    def past(self, index: Tensor, products: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``(μ, σ²)`` of the stored iterations in slots ``index``, ``(past, C)``, moved to the
        current weights with ``products`` (the current inner products) if given."""
        past_mean = self._tensor("window_mean").index_select(0, index)
        past_var = self._tensor("window_var").index_select(0, index)
        if products is not None:
            mean_dot, var_dot = self._tensor("window_mean_dot"), self._tensor("window_var_dot")
            shift = products[0].index_select(0, index) - mean_dot.index_select(0, index)
            spread = products[1].index_select(0, index) - var_dot.index_select(0, index)
            # ν(θ_t) − μ(θ_t)² to first order: σ² + ⟨∂σ², Δθ⟩ − ⟨∂μ, Δθ⟩².
            past_var = past_var + spread - shift.square()
            past_mean = past_mean + shift
        return past_mean, past_var

    # -- checkpoints -----------------------------------------------------------------------

    def fit_checkpoint(self, state_dict: dict[str, Any], prefix: str, dtype: torch.dtype) -> int:
        """Make the window buffers fit a checkpoint of any version: create those it has
        (their shapes depend on the producer and the window, so this layer may not have them
        yet, and new ones take ``dtype``); where it lacks buffers this layer holds (saved
        without a producer, or before k was known), its stored entries cannot be used or
        compensated, so the window restarts empty.  Returns the number of the checkpoint's
        stored iterations so dropped (the caller says so)."""
        fresh = False
        device = self._tensor("iteration").device
        for name in (*STAT_BUFFERS, *GRAD_BUFFERS):
            key = prefix + name
            mine = self.buffers[name]
            if key in state_dict:
                stored = state_dict[key]
                if mine is None or mine.shape != stored.shape:
                    kept = mine.dtype if mine is not None else dtype
                    self.buffers[name] = torch.zeros(stored.shape, dtype=kept, device=device)
            elif mine is not None:
                state_dict[key] = torch.zeros_like(mine)
                fresh = True
        if not fresh:
            return 0
        key = prefix + "window_fill"
        stored_fill = state_dict.get(key)
        dropped = 0
        if isinstance(stored_fill, Tensor) and stored_fill.numel() == 1 and not stored_fill.is_meta:
            dropped = int(stored_fill)  # a load, not a step: one host read
        state_dict[key] = torch.zeros_like(self._tensor("window_fill"))
        return dropped

    def migrate_before_version_3(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A checkpoint of version ≤ 2 (a BN one, or CBN's from before the version) may lack
        the counters: without ``iteration`` it starts at iteration 0 with an empty window, as
        a freshly built layer does (a BN checkpoint starts CBN afresh)."""
        if prefix + "iteration" not in state_dict:
            state_dict[prefix + "iteration"] = torch.zeros_like(self._tensor("iteration"))
            state_dict[prefix + "window_fill"] = torch.zeros_like(self._tensor("window_fill"))
        state_dict.setdefault(prefix + "window_fill", torch.zeros_like(self._tensor("window_fill")))
