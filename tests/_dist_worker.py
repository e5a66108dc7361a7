"""Worker and shared test data for tests/test_distributed.py.

Kept importable (not a test module) so that ``torch.multiprocessing.spawn`` can pickle
:func:`worker` by reference.  The parent test process and the workers both call
:func:`make_batch` with the same arguments, so the data never travels between them: the
workers save only what they computed, and the parent computes the single-process
references itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import smallbn

C, H, W = 4, 3, 5
DTYPE = torch.float64
NUM_DOMAINS = 3

# Local batch size of every rank at every training step: empty ranks and unequal sizes on
# purpose.  At least 4 steps, so the Batch Renorm ramp below runs to its end.
SIZES: dict[int, list[list[int]]] = {
    2: [[3, 5], [4, 0], [1, 6], [2, 2]],
    3: [[5, 2, 0], [1, 3, 4], [3, 0, 3], [2, 2, 1]],
}
EVAL_SIZES: dict[int, list[int]] = {2: [2, 3], 3: [3, 0, 2]}
# Process groups for the scenarios that pass an explicit ``process_group``: with 3 ranks,
# rank 0 is alone (plain local BN) and ranks 1, 2 synchronize, so a group rank differs
# from the global rank.  Rank 0 never has an empty batch (it could not normalize alone).
PARTITIONS: dict[int, list[list[int]]] = {2: [[0, 1]], 3: [[0], [1, 2]]}

# Per-channel scale and shift of the inputs: the statistics are far from the initial
# running statistics (0, 1), so Batch Renorm's r and d are clipped in some channels only.
_SCALE = torch.tensor([0.5, 1.0, 1.3, 3.0], dtype=DTYPE)
_SHIFT = torch.tensor([-2.0, 0.0, 0.3, 1.0], dtype=DTYPE)


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = seed * 1009 + k + 1
    return torch.Generator().manual_seed(seed)


def make_batch(
    kind: str, world: int, step: int, rank: int, size: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, g, domain)`` of one rank at one step (``step = -1``: the eval batch).

    ``g`` is the fixed upstream gradient: the loss is ``(layer(x) * g).sum()``.
    """
    gen = _generator(world, step + 1, rank)
    shape = (size, C) if kind == "1d" else (size, C, H, W)
    view = (1, C) if kind == "1d" else (1, C, 1, 1)
    x = torch.randn(shape, generator=gen, dtype=DTYPE) * _SCALE.view(view) + _SHIFT.view(view)
    g = torch.randn(shape, generator=gen, dtype=DTYPE)
    domain = torch.randint(0, NUM_DOMAINS, (size,), generator=gen) if kind == "domain" else None
    return x, g, domain


def init_params(layer: Any) -> None:
    """Non-trivial affine parameters, the same in every process."""
    gen = _generator(12345)
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.2 * torch.randn(C, generator=gen, dtype=DTYPE))
        layer.bias.copy_(0.2 * torch.randn(C, generator=gen, dtype=DTYPE))


_BRN_RAMP: dict[str, Any] = dict(
    momentum=0.3, r_max=1.5, d_max=0.5, warmup_steps=1, r_max_ramp_end=3, d_max_ramp_end=2
)
# MABN's SMA from the second step and r clamped from the third (the defaults wait 100 and 1000).
_MABN_SCHEDULE: dict[str, Any] = dict(window=3, warmup=1, clamp_start=2, momentum=0.1)


@dataclass(frozen=True)
class Scenario:
    """A layer under test and its single-process reference.

    ``build(**sync)`` makes the synchronized layer: ``sync`` is ``{"sync": True}``, or for
    ``explicit_group`` scenarios ``{"sync": False, "process_group": group}``.
    ``reference()`` makes the layer run in one process over the concatenated batch.
    """

    build: Callable[..., nn.Module]
    reference: Callable[[], nn.Module]
    kind: str = "2d"  # "2d", "1d" (input (N, C)), "domain" (2d with per-sample domain ids)
    explicit_group: bool = False


SCENARIOS: dict[str, Scenario] = {
    "syncbn": Scenario(
        lambda **kw: smallbn.SyncBatchNorm(C, **kw),
        lambda: nn.BatchNorm2d(C),
    ),
    "syncbn_cumulative_average": Scenario(
        lambda **kw: smallbn.SyncBatchNorm(C, momentum=None, **kw),
        lambda: nn.BatchNorm2d(C, momentum=None),
    ),
    "syncbn_2d_input": Scenario(
        lambda **kw: smallbn.SyncBatchNorm(C, **kw),
        lambda: nn.BatchNorm1d(C),
        kind="1d",
    ),
    "batch_renorm_rmax1_dmax0_is_bn": Scenario(
        lambda **kw: smallbn.BatchRenorm2d(C, momentum=0.1, r_max=1.0, d_max=0.0, **kw),
        lambda: nn.BatchNorm2d(C),
    ),
    "batch_renorm_ramp": Scenario(
        lambda **kw: smallbn.BatchRenorm2d(C, **_BRN_RAMP, **kw),
        lambda: smallbn.BatchRenorm2d(C, **_BRN_RAMP, sync=False),
    ),
    "ghost_group_covers_batch_is_bn": Scenario(
        lambda **kw: smallbn.GhostBatchNorm2d(C, group_size=64, **kw),
        lambda: nn.BatchNorm2d(C),
    ),
    "ghost_groups_straddle_ranks_size2": Scenario(
        lambda **kw: smallbn.GhostBatchNorm2d(C, group_size=2, **kw),
        lambda: smallbn.GhostBatchNorm2d(C, group_size=2, sync=False),
    ),
    "ghost_groups_straddle_ranks_size3": Scenario(
        lambda **kw: smallbn.GhostBatchNorm2d(C, group_size=3, **kw),
        lambda: smallbn.GhostBatchNorm2d(C, group_size=3, sync=False),
    ),
    "domain_per_sample_ids": Scenario(
        lambda **kw: smallbn.DomainBatchNorm2d(C, num_domains=NUM_DOMAINS, **kw),
        lambda: smallbn.DomainBatchNorm2d(C, num_domains=NUM_DOMAINS, sync=False),
        kind="domain",
    ),
    "switchable_norm_batch_branch": Scenario(
        lambda **kw: smallbn.SwitchableNorm2d(C, **kw),
        lambda: smallbn.SwitchableNorm2d(C, sync=False),
    ),
    "batch_renorm_groups_straddle_ranks": Scenario(
        lambda **kw: smallbn.BatchRenorm2d(C, norm_batch_size=2, **_BRN_RAMP, **kw),
        lambda: smallbn.BatchRenorm2d(C, norm_batch_size=2, **_BRN_RAMP, sync=False),
    ),
    "switchable_norm_groups_straddle_ranks": Scenario(
        lambda **kw: smallbn.SwitchableNorm2d(C, norm_batch_size=2, **kw),
        lambda: smallbn.SwitchableNorm2d(C, norm_batch_size=2, sync=False),
    ),
    "mabn_groups_straddle_ranks": Scenario(
        lambda **kw: smallbn.MovingAverageBatchNorm2d(C, norm_batch_size=2, **_MABN_SCHEDULE, **kw),
        lambda: smallbn.MovingAverageBatchNorm2d(C, norm_batch_size=2, **_MABN_SCHEDULE),
    ),
    "syncbn_explicit_process_group": Scenario(
        lambda **kw: smallbn.SyncBatchNorm(C, **kw),
        lambda: nn.BatchNorm2d(C),
        explicit_group=True,
    ),
    "ghost_explicit_process_group": Scenario(
        lambda **kw: smallbn.GhostBatchNorm2d(C, group_size=2, **kw),
        lambda: smallbn.GhostBatchNorm2d(C, group_size=2, sync=False),
        explicit_group=True,
    ),
}


def call(layer: Any, x: Tensor, domain: Tensor | None) -> Tensor:
    return layer(x) if domain is None else layer(x, domain)


def run_steps(
    layer: Any,
    batches: list[tuple[Tensor, Tensor, Tensor | None]],
    eval_x: Tensor,
    eval_domain: Tensor | None,
) -> dict[str, Any]:
    """Train ``layer`` on ``batches`` (one backward each), then evaluate on ``eval_x``.

    Returns per step: output, input gradient, weight/bias gradients and the state after
    the step; and the eval output.  Used by the workers and for the references alike.
    """
    steps = []
    layer.train()
    for x, g, domain in batches:
        x = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = call(layer, x, domain)
        (y * g).sum().backward()
        steps.append(
            {
                "y": y.detach().clone(),
                "x_grad": None if x.grad is None else x.grad.clone(),
                "weight_grad": None if layer.weight.grad is None else layer.weight.grad.clone(),
                "bias_grad": None if layer.bias.grad is None else layer.bias.grad.clone(),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
            }
        )
    layer.eval()
    with torch.no_grad():
        eval_y = call(layer, eval_x, eval_domain)
    return {"steps": steps, "eval_y": eval_y}


def run_scenarios(rank: int, world: int) -> dict[str, Any]:
    """One process of the world (``_spawn.run_world``'s body): run every scenario."""
    my_group = None
    for ranks in PARTITIONS[world]:  # every rank must create every group
        group = dist.new_group(ranks)
        if rank in ranks:
            my_group = group
    results = {}
    for name, scenario in SCENARIOS.items():
        sync: dict[str, Any] = (
            {"sync": False, "process_group": my_group}
            if scenario.explicit_group
            else {"sync": True}
        )
        layer = scenario.build(**sync).to(DTYPE)
        init_params(layer)
        batches = [
            make_batch(scenario.kind, world, step, rank, sizes[rank])
            for step, sizes in enumerate(SIZES[world])
        ]
        eval_x, _, eval_domain = make_batch(scenario.kind, world, -1, rank, EVAL_SIZES[world][rank])
        results[name] = run_steps(layer, batches, eval_x, eval_domain)
    # Eval mode with batch statistics (no running ones) is per process, as in torch's
    # SyncBatchNorm: rank 0 evaluates alone while the others go on to the final barrier.
    if rank == 0:
        x = make_batch("2d", world, -2, 0, 3)[0]
        alone = {}
        for name, layer in EVAL_ALONE.items():
            layer = layer().to(DTYPE).eval()
            init_params(layer)
            with torch.no_grad():
                alone[name] = layer(x)
        results["eval_alone"] = {"x": x, **alone}
    return results


#: Layers evaluated by rank 0 alone (``track_running_stats=False``, ``sync=True``).
EVAL_ALONE: dict[str, Callable[[], nn.Module]] = {
    "syncbn": lambda: smallbn.SyncBatchNorm(C, track_running_stats=False, sync=True),
    "ghost": lambda: smallbn.GhostBatchNorm2d(
        C, group_size=64, track_running_stats=False, sync=True
    ),
}


# -- ranks that disagree on a synchronized layer's configuration ----------------------------

Built = tuple[nn.Module, Tensor, tuple[Any, ...]]


@dataclass(frozen=True)
class Mismatch:
    """A synchronized layer built differently on rank 0 and rank 1.

    ``build(rank)`` gives the rank's layer, input and extra forward arguments; every rank must
    raise ``ValueError`` whose message contains each of ``expected`` (``None``: the ranks
    legitimately differ, e.g. in batch or spatial size, and the step must succeed).
    """

    build: Callable[[int], Built]
    expected: tuple[str, ...] | None


def _x(size: int, channels: int = C, dtype: torch.dtype = DTYPE, hw: int = 3) -> Tensor:
    return torch.randn(
        size, channels, hw, hw, generator=_generator(size, channels, hw), dtype=dtype
    )


_SYNC: dict[str, Any] = {"sync": True}

#: Run in this order in one world of 2 processes: the agreeing cases come last, so they also
#: show that the ranks' collectives are still aligned after the errors.
MISMATCHES: dict[str, Mismatch] = {
    "channels": Mismatch(
        lambda r: (smallbn.SyncBatchNorm(8 * (r + 1), **_SYNC), _x(3, 8 * (r + 1)), ()),
        ("num_features: rank 0 has 8, rank 1 has 16",),
    ),
    "channels_explicit_group": Mismatch(
        lambda r: (
            smallbn.SyncBatchNorm(8 * (r + 1), process_group=dist.group.WORLD),
            _x(3, 8 * (r + 1)),
            (),
        ),
        ("num_features: rank 0 has 8, rank 1 has 16",),
    ),
    "dtype": Mismatch(
        lambda r: (
            smallbn.SyncBatchNorm(C, **_SYNC).to([torch.float32, DTYPE][r]),
            _x(3, dtype=[torch.float32, DTYPE][r]),
            (),
        ),
        ("input dtype: rank 0 has torch.float32, rank 1 has torch.float64",),
    ),
    "mabn_norm_batch_size": Mismatch(  # equal buffer sizes: pooled silently before the check
        lambda r: (
            smallbn.MovingAverageBatchNorm2d(C, norm_batch_size=2 * (r + 1), **_SYNC),
            _x(4),
            (),
        ),
        ("norm_batch_size: rank 0 has 2, rank 1 has 4",),
    ),
    "ghost_group_size": Mismatch(
        lambda r: (smallbn.GhostBatchNorm2d(C, group_size=2 + r, **_SYNC), _x(4), ()),
        ("group_size: rank 0 has 2, rank 1 has 3",),
    ),
    "domain_num_domains": Mismatch(
        lambda r: (smallbn.DomainBatchNorm2d(C, num_domains=2 + r, **_SYNC), _x(4), (0,)),
        ("num_domains: rank 0 has 2, rank 1 has 3",),
    ),
    "layer_type": Mismatch(
        lambda r: (
            [smallbn.SyncBatchNorm, smallbn.BatchRenorm2d][r](C, **_SYNC),  # type: ignore[operator]
            _x(4),
            (),
        ),
        ("layer type: rank 0 has SyncBatchNorm, rank 1 has BatchRenorm2d",),
    ),
    "batch_and_spatial_sizes_differ": Mismatch(
        lambda r: (smallbn.SyncBatchNorm(C, **_SYNC), _x([3, 2][r], hw=[5, 2][r]), ()),
        None,
    ),
    "empty_rank": Mismatch(lambda r: (smallbn.SyncBatchNorm(C, **_SYNC), _x([3, 0][r]), ()), None),
    "mabn_batch_sizes_differ": Mismatch(
        lambda r: (
            smallbn.MovingAverageBatchNorm2d(C, norm_batch_size=2, **_SYNC),
            _x([4, 1][r], hw=[3, 4][r]),
            (),
        ),
        None,
    ),
}


def run_mismatches(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """One process (``_spawn.run_world``'s body): one training step of every :data:`MISMATCHES`
    layer; per case the exception raised (type name and message, or ``None``) and the step
    counter after the call."""
    results = {}
    for name, case in MISMATCHES.items():
        layer, x, args = case.build(rank)
        layer.model_path = f"backbone.{name}"  # as smallbn.convert names the layers it makes
        layer.train()
        error: tuple[str, str] | None = None
        try:
            layer(x, *args)
        except Exception as exc:  # noqa: BLE001 - the parent checks the type
            error = (type(exc).__name__, str(exc))
        results[name] = {"error": error, "steps": int(layer.num_batches_tracked)}
    return results
