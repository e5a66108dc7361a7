"""Shuffle BN: batch normalization of a random share of the global batch (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021, §6; the shuffling BN of MoCo, He et al., CVPR 2020).

**What it fixes.**  When the samples of one device are correlated — the RoIs of one image in
a Mask R-CNN head, the crops of one image in contrastive learning — BN's per-device batch
statistics carry information about the other samples of that device, which the model learns
to exploit in training (the "information leakage" of Wu & Johnson §6, "cheating" through BN in
MoCo) and which is absent, or different, at inference.  Shuffle BN breaks the correlation:
before normalizing, the samples of all processes are permuted with one random permutation per
step, so that each process normalizes a random subset of the global batch; afterwards the
inverse permutation returns every output to its owner.

**The math.**  Let the global batch be the concatenation, in rank order, of the ranks'
batches, ``n_r`` samples from rank r (``N = Σ_r n_r``), and ``π`` this step's permutation
(:func:`smallbn._distributed.shuffle_permutation`).  The shuffled batch ``z_p = x_{π(p)}`` is
cut into consecutive parts of the same sizes: rank r receives ``P_r = {z_p : Σ_{q<r} n_q ≤ p
< Σ_{q≤r} n_q}`` — as many samples as it holds, so per-device batch sizes (and memory) stay
what they were — and normalizes them with plain BN statistics of ``P_r`` alone:

    μ_r = E_{P_r}[z],   σ²_r = E_{P_r}[(z − μ_r)²]   (over samples and spatial positions),
    ŷ_p = γ (z_p − μ_r) / sqrt(σ²_r + eps) + β   for z_p ∈ P_r,   y_n = ŷ_{π⁻¹(n)}.

No statistic crosses processes (unlike SyncBN): only samples move.  Gradients take the reverse
route: ∂L/∂x_n = ∂L/∂z_{π⁻¹(n)}, computed on the rank that normalized sample n and sent back.

With ``norm_batch_size=b`` each received part is normalized in consecutive groups of b of its
shuffled order (the last group may be smaller), each with its own statistics (Ghost BN's
groups, Hoffer et al. 2017); running statistics then average the groups', as Ghost BN's.  In
one process (no process group, or ``sync=False``) this is the way to use the layer: the batch
is permuted, normalized in groups of b, and un-permuted — random rather than consecutive ghost
batches.  In one process *without* ``norm_batch_size`` the layer is exactly BN (the whole batch
is one part and BN's statistics do not depend on the order of the samples: the permutation
changes nothing, so none is drawn).

**The permutation.**  Every rank computes the same ``π`` on the host, without extra
communication: ``shuffle_permutation(seed, step, N)`` is ``torch.randperm`` from a CPU
generator seeded with a SplitMix64 hash of ``(seed, step)``; ``seed`` and ``step`` travel in
the same small all-reduce that exchanges the batch sizes, rank 0's values win (so the ranks
cannot disagree even if a layer was rebuilt on one of them).  ``seed`` is the constructor's,
or else ``torch.initial_seed()`` of rank 0 (deterministic under ``torch.manual_seed``; nothing
is drawn from torch's global generator, so converting a model does not change its other
random numbers).  ``step`` (:attr:`ShuffleBatchNorm.shuffle_step`) counts this layer's
shuffled training calls; it is host state, not in the ``state_dict`` (which is BN's), and a
statistics pass (:func:`smallbn.batch_stats_eval`) does not advance it.  Layers sharing a
seed draw the same permutation at the same step (as MoCo shuffles once for the whole
encoder); give them different seeds for independent ones.  A training resumed from a
checkpoint draws the permutations an uninterrupted one would only if the checkpoint kept
``shuffle_step`` beside the ``state_dict`` (the comparison job's checkpoints do).  The last
permutation used is :attr:`ShuffleBatchNorm.last_permutation`.

**Running statistics** are, on each rank, BN's exponential moving average of the statistics
its received parts were normalized with (mean and Bessel-corrected variance; with
``norm_batch_size`` the count-weighted average over the groups).  Ranks therefore hold
different running statistics, as with plain BN under DDP (save rank 0's, or run
:func:`smallbn.precise_bn`, which merges population statistics across ranks).  A rank with an
empty batch receives nothing, observes nothing, and leaves its running statistics and
``num_batches_tracked`` unchanged.  Evaluation is BN's (running statistics, no exchange).

**Cost.**  Per training forward, two all-to-all exchanges of the layer's activations (there
and back) plus one all-reduce of ``world × 12`` integers (batch sizes, per-sample shapes, seed,
step); per backward, two more all-to-all exchanges of gradients.  Each all-to-all moves
about ``(1 − 1/world)`` of the local activations, against SyncBN's all-reduce of 2C numbers:
shuffling costs bandwidth proportional to the activations.  Exchanges use
``all_to_all_single`` where the backend has it (gloo on CPU and CUDA, NCCL, MPI, UCC) and
``all_gather`` otherwise (``exchange=`` forces either).

**Host reads.**  One device-to-host read per shuffled training step: the all-reduced sizes
(a host synchronization on CUDA), which the exchange's split sizes need.  The permutation and
the exchange plan are computed on the host from those ints; their index tensors are copied to
the device asynchronously (pinned).  Remaining reads are those of every synchronized layer:
the ranks' agreement check (:meth:`BatchStatsNorm._check_ranks_agree`, at the first and every
100th synchronized call) and the finite check (every step on CPU by default, deferred on CUDA:
:func:`smallbn.set_finite_check`).  In one process without ``norm_batch_size`` the step reads
nothing (it is BN); with it, the permutation is drawn on the host (no device read).

**What it does not fix.**  Each process still normalizes ``n_r`` samples: the statistics are
as noisy as BN's at that batch size (small-batch noise is untouched — SyncBN, GN or the
cross-iteration methods address that), and the train–test inconsistency between batch and
running statistics remains.  Samples still share statistics with the others of their part,
only no longer systematically with their own correlated neighbours (a part may by chance hold
several samples of one image).  In one process without ``norm_batch_size`` it does nothing.
It needs more than one value per channel in every non-empty part (a per-process batch of one
1d sample is an error on every rank).

**Limits.**  Every rank's input must have the same per-sample shape (C, *spatial) — samples
move between ranks; empty batches are exempt — and, as with every collective in autograd,
every rank must run the backward through the layer (with ``requires_grad`` alike on all
ranks), or the others wait in the backward exchange.  A non-finite statistic raises
(:func:`smallbn.set_finite_check`) on the rank whose part holds it, after both exchanges of the
forward; the other ranks then wait at their next collective.  Under ``torch.compile`` the
permutation, the plan and the exchanges run eagerly (graph breaks around them; the host step
counter is no guard, so steps do not recompile); the plain-BN path (one process, no
``norm_batch_size``) compiles whole.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, checked_norm_batch_size
from smallbn.stats import (
    Moments,
    SampleNormalization,
    fused_batch_norm,
    merge_moments,
    normalize,
    normalize_from_sample_moments,
    sample_groups,
    stats_dtype,
)

__all__ = [
    "ShuffleBatchNorm",
    "ShuffleBatchNorm1d",
    "ShuffleBatchNorm2d",
    "ShuffleBatchNorm3d",
    "shuffle_permutation",
]

shuffle_permutation = _distributed.shuffle_permutation

#: Per-sample dimensions (C, *spatial) compared across ranks exactly; more are hashed.
_SHAPE_SLOTS = 8
_SEED_MASK = (1 << 63) - 1


def _shape_code(shape: tuple[int, ...]) -> list[int]:
    """``_SHAPE_SLOTS`` ints standing for a per-sample shape: its dims padded with -1, the
    dims past the last slot folded into it as a hash."""
    dims = list(shape)
    if len(dims) > _SHAPE_SLOTS:
        tail = hash(tuple(dims[_SHAPE_SLOTS - 1 :])) & _SEED_MASK
        dims = dims[: _SHAPE_SLOTS - 1] + [tail]
    return dims + [-1] * (_SHAPE_SLOTS - len(dims))


class ShuffleBatchNorm(BatchStatsNorm, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """Shuffle BN for inputs of any rank ≥ 2 (see the 1d/2d/3d variants and the module
    docstring for the math, the cost and the limits).

    Args mirror ``torch.nn.BatchNorm``'s, plus:
        norm_batch_size: normalize consecutive groups of this many samples of each shuffled
            part, each with its own statistics (``None``: the whole part).  The only option
            that makes a difference in one process.
        seed: the permutations' seed (rank 0's is used by every rank); default rank 0's
            ``torch.initial_seed()``.
        sync: shuffle across the processes of ``process_group`` (default the world) when
            torch.distributed is initialized; ``False``: one process.
        exchange: ``"auto"`` (``all_to_all_single`` where the backend has it, else
            ``all_gather``), ``"all_to_all"`` or ``"all_gather"``.

    Attributes:
        shuffle_step: shuffled training calls so far (host state; the next permutation is
            ``shuffle_permutation(seed, shuffle_step, N)``).
        last_permutation: the permutation of the last shuffled call (a CPU tensor over the
            global batch in rank order), or ``None``.
    """

    _family = "ShuffleBatchNorm"
    _sync_options: ClassVar[tuple[str, ...]] = (*BatchStatsNorm._sync_options, "exchange")

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
        norm_batch_size: int | None = None,
        seed: int | None = None,
        sync: bool = True,
        process_group: _distributed.ProcessGroup | None = None,
        exchange: _distributed.Exchange = "auto",
    ) -> None:
        name = type(self).__name__
        checked_norm_batch_size(name, norm_batch_size)
        if seed is not None and (isinstance(seed, bool) or not 0 <= int(seed) <= _SEED_MASK):
            raise ValueError(f"{name}: seed must be an int in [0, 2**63), got {seed!r}")
        if exchange not in ("auto", "all_to_all", "all_gather"):
            raise ValueError(
                f"{name}: exchange must be 'auto', 'all_to_all' or 'all_gather', got {exchange!r}"
            )
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
        self.norm_batch_size = None if norm_batch_size is None else int(norm_batch_size)
        self.seed = None if seed is None else int(seed)
        self.exchange: _distributed.Exchange = exchange
        self.shuffle_step = 0
        self.last_permutation: Tensor | None = None
        self._agreed_seed: int | None = None  # rank 0's seed, once a shuffled call agreed it

    def host_step(self) -> int | None:
        return self.shuffle_step

    def set_host_step(self, step: int) -> None:
        self.shuffle_step = int(step)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.norm_batch_size is not None:
            text += f", norm_batch_size={self.norm_batch_size}"
        if self.seed is not None:
            text += f", seed={self.seed}"
        if self.exchange != "auto":
            text += f", exchange={self.exchange!r}"
        return text

    # -- groups -------------------------------------------------------------------------------

    def _sync_group(self) -> _distributed.ProcessGroup | None:
        # Statistics are never pooled across processes: every helper of the base computes
        # them over what this rank normalizes.  Samples move instead (_shuffle_group).
        return None

    def _shuffle_group(self) -> _distributed.ProcessGroup | None:
        """The group whose samples are shuffled together (never in eval mode, as SyncBN)."""
        if not self.training:
            return None
        return _distributed.active_group(self.sync, self.process_group)

    def _seed_candidate(self) -> int:
        if self.seed is not None:
            return self.seed
        if self._agreed_seed is not None:
            return self._agreed_seed
        return torch.initial_seed() & _SEED_MASK

    def _next_step(self, step: int) -> None:
        """Advance the host step counter past ``step`` (not in a statistics pass or in eval,
        which use the permutation of the next training step and change no state)."""
        if self.training and not self.statistics_pass:
            self.shuffle_step = step + 1

    # -- training ---------------------------------------------------------------------------

    def _forward_train(self, x: Tensor, factor: float | None) -> Tensor:
        step = self.shuffle_step
        try:
            return self._shuffle_and_normalize(x, factor)
        except Exception:
            self.shuffle_step = step  # a rejected batch leaves the layer as it was
            raise

    def _shuffle_and_normalize(self, x: Tensor, factor: float | None) -> Tensor:
        group = self._shuffle_group()
        if group is not None:
            return self._forward_shuffled(x, factor, group)
        size = self.norm_batch_size
        if size is None or x.shape[0] <= size:
            # One part, one group: BN (the permutation would change nothing).
            y, moments = self._batch_norm(x)
            self._update_running(moments.mean, moments.unbiased_var(), factor)
            return y
        plan = self._local_plan(x.shape[0], x.device)
        shuffled = _distributed.shuffle_rows(x, plan, None)
        y = self._normalize_groups(shuffled, size, factor)
        return _distributed.unshuffle_rows(y, plan, None)

    @torch.compiler.disable
    def _local_plan(self, size: int, device: torch.device) -> _distributed.ShufflePlan:
        """One process: this step's permutation of the batch (host only; eager under
        ``torch.compile``, so that the host counter is not a guard)."""
        seed = self._agreed_seed = self._seed_candidate()
        step = self.shuffle_step
        self.last_permutation = _distributed.shuffle_permutation(seed, step, size)
        self._next_step(step)
        return _distributed.shuffle_plan(self.last_permutation, [size], 0, device)

    @torch.compiler.disable
    def _shuffled_plan(
        self, x: Tensor, group: _distributed.ProcessGroup
    ) -> _distributed.ShufflePlan:
        """Agree on the sizes, seed and step (one all-reduce, one host read), check that
        every rank can take part, and build this rank's plan."""
        row = [x.shape[0], self._seed_candidate(), self.shuffle_step, x.dim() - 1]
        rows = _distributed.all_gather_ints(
            [*row, *_shape_code(tuple(x.shape[1:]))], group, x.device
        )
        sizes = [r[0] for r in rows]
        seed, step = rows[0][1], rows[0][2]
        self._check_parts(x, rows, group)  # the same verdict on every rank: before any exchange
        self._agreed_seed = seed
        self.last_permutation = _distributed.shuffle_permutation(seed, step, sum(sizes))
        self._next_step(step)
        return _distributed.shuffle_plan(
            self.last_permutation, sizes, dist.get_rank(group), x.device
        )

    def _forward_shuffled(
        self, x: Tensor, factor: float | None, group: _distributed.ProcessGroup
    ) -> Tensor:
        self._check_ranks_agree(x, group)
        plan = self._shuffled_plan(x, group)
        size, n = self.norm_batch_size, x.shape[0]
        grouped = size is not None and n > size  # order matters only for groups
        part = _distributed.shuffle_rows(x, plan, group, self.exchange, shuffled_order=grouped)
        moments: Moments | None
        if n == 0:
            y, moments = self._empty_part(part), None
        elif grouped:
            y, moments = self._normalize_part_groups(part, size)  # type: ignore[arg-type]
        else:
            y, moments = fused_batch_norm(part, self.weight, self.bias, self.eps)
        y = _distributed.unshuffle_rows(y, plan, group, self.exchange, shuffled_order=grouped)
        # Checked after both exchanges of the forward, so that a rank that raises has done its
        # share of this layer's collectives.
        if moments is None:
            self._undo_step(factor)  # an empty part: nothing observed, nothing counted
            return y
        self._check_finite(moments, part)
        if grouped:
            self._update_running_from_groups(moments, factor)
        else:
            self._update_running(moments.mean, moments.unbiased_var(), factor)
        return y

    def _empty_part(self, part: Tensor) -> Tensor:
        """The (empty) output of an empty part, connected to γ and β (zero gradients) so that
        every rank's parameters get a gradient, as DDP expects."""
        dtype = stats_dtype(part.dtype)
        channels = self.num_features
        mean = part.new_zeros(channels, dtype=dtype)
        var = part.new_ones(channels, dtype=dtype)
        return normalize(part, mean, var, self.eps, self.weight, self.bias)

    def _normalize_part_groups(self, part: Tensor, size: int) -> tuple[Tensor, Moments]:
        """Consecutive groups of ``size`` samples of the part, each with its own statistics;
        returns the output and the groups' moments (checked and averaged by the caller)."""
        grouping = sample_groups(part.shape[0], size, part.device)
        index = grouping.index
        found: list[Moments] = []

        def statistics(instance: Moments) -> SampleNormalization:
            groups = merge_moments(instance, index, grouping.count)
            found.append(groups)
            return groups.mean[index], groups.var[index], self.weight, self.bias

        y = normalize_from_sample_moments(part, statistics, self.eps, (self.weight, self.bias))
        return y, found[0]

    # -- checks -------------------------------------------------------------------------------

    def _check_parts(
        self, x: Tensor, rows: list[list[int]], group: _distributed.ProcessGroup
    ) -> None:
        """Raise on every rank (all hold the same ``rows``) if the non-empty ranks' samples
        differ in shape, or a part (or its smallest group) has one value per channel."""
        ranks = _global_ranks(group, len(rows))
        shapes = {ranks[i]: _shape_dims(r) for i, r in enumerate(rows) if r[0] > 0}
        if len(set(shapes.values())) > 1:
            held = ", ".join(f"rank {r} has {_shape_text(s)}" for r, s in shapes.items())
            raise ValueError(
                f"{self.describe()}: shuffling moves samples between processes, so every "
                f"non-empty batch must have the same per-sample shape (C, *spatial), but "
                f"{held}. Pad or resize the inputs to one shape, or use 'syncbn' (which "
                f"exchanges statistics only, and allows any spatial sizes)."
            )
        size = self.norm_batch_size
        for i, r in enumerate(rows):
            n = r[0]
            if n == 0:
                continue
            per_sample = math.prod(_shape_dims(r)[1:])
            smallest = n if size is None or n <= size else n - (-(-n // size) - 1) * size
            if smallest * per_sample <= 1:
                grouping = "" if size is None or n <= size else f" (groups of {size})"
                what = (
                    f"the part of the shuffled batch that rank {ranks[i]} normalizes "
                    f"({n} sample(s) of shape {_shape_text(_shape_dims(r))}, as many as it "
                    f"holds){grouping}"
                )
                self._raise_too_small(x, smallest * per_sample, what)

    def _raise_too_small(self, x: Tensor, count: int, what: str = "the batch") -> None:
        groups = (
            f" or a larger norm_batch_size (now {self.norm_batch_size})"
            if self.norm_batch_size is not None
            else ""
        )
        raise ValueError(
            f"{self.describe()}: training needs more than one value per channel to compute "
            f"batch statistics, but {what} has {count} (input shape {tuple(x.shape)}). "
            f"Shuffle BN normalizes each process's share of the shuffled batch, as many "
            f"samples as the process holds: use a larger per-process batch{groups}; to pool "
            f"statistics across processes use 'syncbn'; or switch to a batch-independent norm "
            f"('gn', 'ln', 'frozenbn'), or put the layer in eval mode."
        )


def _shape_dims(row: list[int]) -> tuple[int, ...]:
    """The per-sample shape of an exchanged row (its dims as far as they were sent)."""
    ndim = row[3]
    dims = row[4 : 4 + min(ndim, _SHAPE_SLOTS)]
    return tuple(dims)


def _shape_text(dims: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"


def _global_ranks(group: _distributed.ProcessGroup, world: int) -> list[int]:
    try:
        return [dist.get_global_rank(group, r) for r in range(world)]
    except (RuntimeError, ValueError, AttributeError):
        return list(range(world))


class ShuffleBatchNorm1d(ShuffleBatchNorm):
    """Shuffle BN for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class ShuffleBatchNorm2d(ShuffleBatchNorm):
    """Shuffle BN for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class ShuffleBatchNorm3d(ShuffleBatchNorm):
    """Shuffle BN for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3
