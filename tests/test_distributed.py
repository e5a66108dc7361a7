"""Synchronized statistics across processes (gloo on CPU, loopback only).

For each world size (2 and 3) the processes are spawned ONCE and run every scenario of
``_dist_worker.SCENARIOS``: four training steps with empty ranks and unequal batch sizes,
a backward pass per step with a fixed per-rank upstream gradient, then an eval pass.  Each
rank saves what it computed; this process then runs the single-process reference on the
concatenated batch (rank order) and checks, step by step:

* each rank's output and input gradient equal the matching slice of the reference's;
* the weight/bias gradients summed over ranks (what DDP's all-reduce gives) equal the
  reference's;
* running statistics and ``num_batches_tracked`` after every step, and the eval outputs,
  equal the reference's.

Scenarios with an explicit ``process_group`` (and ``sync=False``) use the groups of
``_dist_worker.PARTITIONS``: 3 ranks are split into {0} and {1, 2}, so that group ranks differ
from global ranks; each part is compared with a reference over its own ranks' batches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

# tests/ on sys.path (conftest.py does it too) so that the spawned workers can import the
# worker module by name.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_worker as dw  # noqa: E402
import smallbn  # noqa: E402
from _spawn import run_world  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

TOL: dict[str, Any] = dict(rtol=1e-6, atol=1e-6)
SPAWN_DEADLINE_S = 180.0


# -- running the world ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, run_world(
        dw.run_scenarios, world, tmp_path_factory.mktemp(f"world{world}"), SPAWN_DEADLINE_S
    )


# -- the single-process reference -----------------------------------------------------------


def _reference(name: str, world: int, ranks: list[int]) -> dict[str, Any]:
    """Run the reference layer of scenario ``name`` on the concatenation of ``ranks``' data."""
    scenario = dw.SCENARIOS[name]
    layer = scenario.reference().to(dw.DTYPE)
    dw.init_params(layer)

    def concat(step: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        parts = [dw.make_batch(scenario.kind, world, step, r, sizes[r]) for r in ranks]
        x = torch.cat([p[0] for p in parts])
        g = torch.cat([p[1] for p in parts])
        domains = [p[2] for p in parts if p[2] is not None]
        return x, g, torch.cat(domains) if scenario.kind == "domain" else None

    batches = [concat(step, sizes) for step, sizes in enumerate(dw.SIZES[world])]
    eval_x, _, eval_domain = concat(-1, dw.EVAL_SIZES[world])
    return dw.run_steps(layer, batches, eval_x, eval_domain)


def _slices(sizes: list[int], ranks: list[int]) -> Iterator[tuple[int, slice]]:
    start = 0
    for r in ranks:
        yield r, slice(start, start + sizes[r])
        start += sizes[r]


def _close(actual: torch.Tensor | None, expected: torch.Tensor, what: str) -> None:
    if actual is None:
        # A rank without samples may legitimately end up without an input gradient.
        assert expected.numel() == 0, f"{what}: no gradient was computed"
        return
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# -- tests ------------------------------------------------------------------------------------


def test_batch_sizes_cover_empty_and_unequal_ranks() -> None:
    for world, steps in dw.SIZES.items():
        assert all(len(sizes) == world for sizes in steps)
        assert any(0 in sizes for sizes in steps), world
        assert any(len(set(s for s in sizes if s)) > 1 for sizes in steps), world
        assert len(steps) >= 4  # the Batch Renorm ramp (warmup 1, ends at 2 and 3) completes


@pytest.mark.parametrize("world", sorted(dw.SIZES))
def test_scenarios_are_not_trivially_bn(world: int) -> None:
    """The data make the Ghost groups straddle ranks and the Batch Renorm ramp clip r and d,
    so matching those references is not the same as matching plain BN."""
    for name in ("ghost_groups_straddle_ranks_size2", "ghost_groups_straddle_ranks_size3"):
        group_size = int(dw.SCENARIOS[name].reference().group_size)  # type: ignore[arg-type]
        straddles = 0
        for sizes in dw.SIZES[world]:
            owners: dict[int, set[int]] = {}
            for rank, part in _slices(sizes, list(range(world))):
                for n in range(part.start, part.stop):
                    owners.setdefault(n // group_size, set()).add(rank)
            straddles += sum(len(ranks) > 1 for ranks in owners.values())
        assert straddles >= 2, (name, world)
    ramp = _reference("batch_renorm_ramp", world, list(range(world)))
    plain = _reference("batch_renorm_rmax1_dmax0_is_bn", world, list(range(world)))
    assert not torch.allclose(ramp["steps"][-1]["y"], plain["steps"][-1]["y"], atol=1e-2)


@pytest.mark.parametrize("name", list(dw.SCENARIOS))
def test_matches_single_process_reference(
    name: str, world_results: tuple[int, list[dict[str, Any]]]
) -> None:
    world, results = world_results
    partition = dw.PARTITIONS[world] if dw.SCENARIOS[name].explicit_group else [list(range(world))]
    for ranks in partition:
        ref = _reference(name, world, ranks)
        where = f"{name}, world {world}, ranks {ranks}"
        for step, sizes in enumerate(dw.SIZES[world]):
            expected = ref["steps"][step]
            got = {r: results[r][name]["steps"][step] for r in ranks}
            at = f"{where}, step {step} (local batch sizes {[sizes[r] for r in ranks]})"
            for r, part in _slices(sizes, ranks):
                _close(got[r]["y"], expected["y"][part], f"{at}: output of rank {r}")
                _close(got[r]["x_grad"], expected["x_grad"][part], f"{at}: input grad of rank {r}")
                for key in ("running_mean", "running_var"):
                    _close(got[r][key], expected[key], f"{at}: {key} of rank {r}")
                assert got[r]["num_batches_tracked"] == expected["num_batches_tracked"], at
            for key in ("weight_grad", "bias_grad"):
                grads = [got[r][key] for r in ranks if got[r][key] is not None]
                summed = sum(grads, torch.zeros_like(expected[key]))
                _close(summed, expected[key], f"{at}: {key} summed over ranks")
        for r, part in _slices(dw.EVAL_SIZES[world], ranks):
            got_eval = results[r][name]["eval_y"]
            _close(got_eval, ref["eval_y"][part], f"{where}: eval output of rank {r}")


def test_eval_with_batch_statistics_does_not_synchronize(
    world_results: tuple[int, list[dict[str, Any]]],
) -> None:
    _, results = world_results
    alone = results[0]["eval_alone"]
    reference = nn.BatchNorm2d(dw.C, track_running_stats=False).to(dw.DTYPE).eval()
    dw.init_params(reference)
    with torch.no_grad():
        expected = reference(alone["x"])
    for name in dw.EVAL_ALONE:
        _close(alone[name], expected, f"{name} evaluated by rank 0 alone")


# -- no synchronization: world size 1, and torch.distributed not initialized -----------------


def _check_plain_bn(sync: dict[str, Any]) -> None:
    """Every synchronizing layer, given ``sync``, behaves as plain BN in this process."""
    layers = {
        "syncbn": smallbn.SyncBatchNorm(dw.C, **sync),
        "batch_renorm": smallbn.BatchRenorm2d(dw.C, momentum=0.1, r_max=1.0, d_max=0.0, **sync),
        "ghost": smallbn.GhostBatchNorm2d(dw.C, group_size=64, **sync),
        "domain": smallbn.DomainBatchNorm2d(dw.C, num_domains=1, **sync),
    }
    batches = [dw.make_batch("2d", 1, step, 0, n) for step, n in enumerate([3, 1, 4])]
    eval_x = dw.make_batch("2d", 1, -1, 0, 2)[0]
    reference = nn.BatchNorm2d(dw.C).to(dw.DTYPE)
    dw.init_params(reference)
    ref = dw.run_steps(reference, batches, eval_x, None)
    for name, layer in layers.items():
        layer = layer.to(dw.DTYPE)
        dw.init_params(layer)
        got = dw.run_steps(layer, batches, eval_x, None)
        for step, (g, e) in enumerate(zip(got["steps"], ref["steps"], strict=True)):
            for key in ("y", "x_grad", "weight_grad", "bias_grad"):
                _close(g[key], e[key], f"{name}, step {step}: {key}")
            for key in ("running_mean", "running_var"):
                _close(g[key].reshape(-1, dw.C)[0], e[key], f"{name}, step {step}: {key}")
        _close(got["eval_y"], ref["eval_y"], f"{name}: eval output")


def test_without_process_group_layers_are_plain_bn() -> None:
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialized in this process")
    _check_plain_bn({"sync": True})


def test_world_size_one_layers_are_plain_bn(tmp_path: Path) -> None:
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialized in this process")
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "filestore"), 1), rank=0, world_size=1
    )
    try:
        _check_plain_bn({"sync": True})
        _check_plain_bn({"sync": False, "process_group": dist.group.WORLD})
        # A single-member group needs no collective: none is attempted.
        assert smallbn._distributed.active_group(True, None) is None
    finally:
        dist.destroy_process_group()


# -- ranks that disagree on a synchronized layer's configuration -----------------------------


@pytest.fixture(scope="module")
def mismatch_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_world(dw.run_mismatches, 2, tmp_path_factory.mktemp("mismatch"), SPAWN_DEADLINE_S)


@pytest.mark.parametrize("name", [n for n, c in dw.MISMATCHES.items() if c.expected])
def test_ranks_that_disagree_raise_a_clear_error_on_every_rank(
    name: str, mismatch_results: list[dict[str, Any]]
) -> None:
    """Channels, dtype, grouping option or layer type differing across ranks: before the fix
    gloo aborted one process ("Received data size doesn't match") without naming the layer, or
    (MABN's norm_batch_size) statistics were pooled silently.  Now every rank raises, naming the
    layer, what differs on which rank, and the fix; and the step is not counted."""
    expected = dw.MISMATCHES[name].expected
    assert expected is not None
    for rank, results in enumerate(mismatch_results):
        got = results[name]
        assert got["error"] is not None, f"{name}: rank {rank} raised nothing"
        kind, message = got["error"]
        assert kind == "ValueError", f"{name}, rank {rank}: {kind}: {message}"
        assert f"at 'backbone.{name}'" in message, message
        for part in expected:
            assert part in message, f"{name}, rank {rank}: {part!r} not in {message!r}"
        assert "build this layer identically on every rank" in message, message
        assert got["steps"] == 0, f"{name}, rank {rank}: the rejected step was counted"
    # The same diagnosis on both ranks (each names the layer as it was built there).
    tails = [r[name]["error"][1].partition(": ")[2] for r in mismatch_results]
    assert tails[0] == tails[1], tails


@pytest.mark.parametrize("name", [n for n, c in dw.MISMATCHES.items() if c.expected is None])
def test_ranks_may_differ_in_batch_and_spatial_size(
    name: str, mismatch_results: list[dict[str, Any]]
) -> None:
    """Unequal and empty batches and other spatial sizes are legitimate: no error (these run
    after the failing cases, so they also show that the ranks' collectives stay aligned)."""
    for rank, results in enumerate(mismatch_results):
        assert results[name]["error"] is None, f"{name}, rank {rank}: {results[name]['error']}"
        assert results[name]["steps"] == 1
