"""Shuffle BN (smallbn.layers.shuffle) against references that never call the layer's internals.

Across processes (2 and 3 gloo processes, spawned once per world size): every step's outputs,
input gradients and affine gradients (summed over ranks, as DDP's all-reduce gives) equal a
single-process float64 computation that permutes the concatenated batch with
``shuffle_permutation(seed, step, N)`` (the documented permutation), cuts it into the ranks'
counts, normalizes each part with its own batch statistics (or its groups of
``norm_batch_size``) and inverse-permutes; running statistics are each rank's EMA of its part's
statistics; empty and unequal batches, the all_gather exchange and a subgroup are covered, as
are the errors (a part with one value per channel, samples of different shapes) raised on
every rank with the collectives still aligned, and the host reads of a step.  In one process:
BN without ``norm_batch_size``, the shuffled groups against a reference with it, eval, state,
conversion, errors.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import smallbn
from _host_reads import count_host_reads
from _layer_checks import BN_STATE_KEYS, SHAPES, lockstep_vs_torch_bn, shape_id
from _spawn import run_world
from smallbn import ShuffleBatchNorm, ShuffleBatchNorm1d, ShuffleBatchNorm2d
from smallbn._distributed import shuffle_permutation, shuffle_plan

EPS = 1e-5
MOMENTUM = 0.3
SEED = 1234
C = 3
TAIL = (2, 3)  # spatial dims of the 2d scenarios
TOL: dict[str, Any] = dict(rtol=1e-9, atol=1e-9)

# -- the float64 reference ----------------------------------------------------------------------


def _bn(part: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    dims = [0, *range(2, part.dim())]
    view = (1, -1, *([1] * (part.dim() - 2)))
    mean = part.mean(dims, keepdim=True)
    var = part.var(dims, unbiased=False, keepdim=True)
    return (part - mean) / torch.sqrt(var + EPS) * weight.view(view) + bias.view(view)


def _part_statistics(groups: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Count-weighted mean of the groups' means and Bessel-corrected variances."""
    counts = torch.tensor([g.numel() // g.shape[1] for g in groups], dtype=torch.float64)
    share = counts / counts.sum()
    dims = [0, *range(2, groups[0].dim())]
    means = torch.stack([g.mean(dims) for g in groups])
    variances = torch.stack([g.var(dims, unbiased=True) for g in groups])
    return (share[:, None] * means).sum(0), (share[:, None] * variances).sum(0)


def reference_step(
    xs: list[Tensor],
    gs: list[Tensor],
    weight: Tensor,
    bias: Tensor,
    seed: int,
    step: int,
    norm_batch_size: int | None = None,
) -> dict[str, Any]:
    """One training step of Shuffle BN over ranks holding ``xs`` (upstream gradients ``gs``),
    computed in one process on the concatenated batch: outputs and input gradients per rank,
    affine gradients of the whole, and each rank's part statistics (None: an empty part)."""
    sizes = [x.shape[0] for x in xs]
    xcat = torch.cat([x.detach().double() for x in xs]).requires_grad_()
    w = weight.detach().double().clone().requires_grad_()
    b = bias.detach().double().clone().requires_grad_()
    perm = shuffle_permutation(seed, step, sum(sizes))
    shuffled = xcat[perm]
    outputs, statistics = [], []
    for part in shuffled.split(sizes):
        if part.shape[0] == 0:
            outputs.append(part)
            statistics.append(None)
            continue
        groups = [part] if norm_batch_size is None else list(part.split(norm_batch_size))
        outputs.append(torch.cat([_bn(g, w, b) for g in groups]))
        statistics.append(_part_statistics([g.detach() for g in groups]))
    y = torch.cat(outputs)[torch.argsort(perm)]  # y[n] = output at sample n's position
    (y * torch.cat([g.double() for g in gs])).sum().backward()
    return {
        "y": list(y.detach().split(sizes)),
        "x_grad": list(xcat.grad.split(sizes)),
        "weight_grad": w.grad,
        "bias_grad": b.grad,
        "statistics": statistics,
        "perm": perm,
    }


def _ema(
    running: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    if new is None:
        return running
    return tuple((1 - MOMENTUM) * r + MOMENTUM * n for r, n in zip(running, new, strict=True))


# -- the processes ------------------------------------------------------------------------------

#: Per scenario: per-step batch sizes of each rank (per world size), the layer's options and,
#: optionally, the ranks forming the layer's process group.
SCENARIOS: dict[str, dict[str, Any]] = {
    "uneven_and_empty": {
        "sizes": {
            2: [[3, 2], [0, 4], [5, 1], [2, 2]],
            3: [[2, 0, 3], [4, 1, 2], [0, 0, 3], [1, 2, 1]],
        },
        "options": {},
    },
    "norm_batch_size_2": {
        "sizes": {2: [[3, 4], [0, 5], [2, 3]], 3: [[3, 0, 4], [5, 2, 3], [1, 3, 2]]},
        "options": {"norm_batch_size": 2},
    },
    "all_gather_exchange": {
        "sizes": {2: [[3, 2], [0, 4]], 3: [[2, 0, 3], [1, 2, 2]]},
        "options": {"exchange": "all_gather"},
    },
    "subgroup": {  # world 3 only: ranks 1 and 2 shuffle together, rank 0 alone (plain BN)
        "sizes": {3: [[2, 3, 2], [2, 0, 4], [3, 4, 1]]},
        "options": {},
        "group": [1, 2],
    },
}


def _data(
    name: str, step: int, rank: int, n: int, tail: tuple[int, ...] = TAIL
) -> tuple[Tensor, Tensor]:
    key = sum(map(ord, name)) * 1000 + step * 10 + rank
    gen = torch.Generator().manual_seed(key)
    loc = torch.linspace(-1.0, 2.0, C, dtype=torch.float64).view(1, C, *([1] * len(tail)))
    x = torch.randn((n, C, *tail), generator=gen, dtype=torch.float64) * (1 + rank) + loc + rank
    g = torch.randn((n, C, *tail), generator=gen, dtype=torch.float64)
    return x, g


def _affine() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    return (
        torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(C, generator=gen, dtype=torch.float64),
    )


def _layer(**options: Any) -> ShuffleBatchNorm2d:
    layer = ShuffleBatchNorm2d(C, momentum=MOMENTUM, seed=SEED, dtype=torch.float64, **options)
    weight, bias = _affine()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _train(layer: nn.Module, name: str, sizes: list[list[int]], rank: int) -> list[dict[str, Any]]:
    steps = []
    for step, per_rank in enumerate(sizes):
        x, g = _data(name, step, rank, per_rank[rank])
        x.requires_grad_()
        y = layer(x)
        (y * g).sum().backward()
        steps.append(
            {
                "y": y.detach(),
                "x_grad": x.grad,
                "weight_grad": layer.weight.grad.clone(),
                "bias_grad": layer.bias.grad.clone(),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
                "perm": None if layer.last_permutation is None else layer.last_permutation.clone(),
                "shuffle_step": layer.shuffle_step,
            }
        )
        layer.weight.grad = layer.bias.grad = None
    return steps


def _square_step(layer: nn.Module, x: Tensor) -> None:
    layer(x).square().sum().backward()


def _host_reads(rank: int) -> dict[str, list[str]]:
    old = smallbn.set_finite_check("deferred")
    try:
        found = {}
        for options in ({}, {"norm_batch_size": 2}):
            layer = _layer(**options)
            x = _data("reads", 0, rank, 3 + rank)[0].requires_grad_()
            step = functools.partial(_square_step, layer, x)
            # the first call also checks that the ranks agree (a read the detector must see)
            found[f"first {options}"] = count_host_reads(step)
            found[str(options)] = count_host_reads(step)
        return found
    finally:
        smallbn.set_finite_check(old)


def _errors(rank: int, world: int) -> dict[str, Any]:
    """Each bad step raises on every rank before any exchange; a good step then works."""
    out: dict[str, Any] = {}
    layer = ShuffleBatchNorm1d(4, seed=SEED)
    single = [1, 3, 2][:world]  # rank 0's part holds one (N, C) sample: one value per channel
    try:
        layer(torch.randn(single[rank], 4))
    except ValueError as error:
        out["one_value"] = str(error)
    out["one_value_state"] = (int(layer.num_batches_tracked), layer.shuffle_step)
    grouped = ShuffleBatchNorm1d(4, seed=SEED, norm_batch_size=2)
    try:  # parts of 3 samples: groups of 2 and 1 (the last with one value per channel)
        grouped(torch.randn(3, 4))
    except ValueError as error:
        out["one_value_group"] = str(error)
    shapes = ShuffleBatchNorm2d(2, seed=SEED)
    try:
        shapes(torch.randn(2, 2, 3, 3 + rank))
    except ValueError as error:
        out["shapes"] = str(error)
    out["empty_may_differ"] = tuple(
        shapes(torch.randn(0 if rank == 0 else 2, 2, 5 if rank == 0 else 3, 3)).shape
    )
    out["after"] = tuple(layer(torch.randn(3, 4)).shape)  # still aligned
    return out


def _world_body(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(100 + rank)  # ranks differ in their own random state, as in real runs
    results: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        if world not in scenario["sizes"]:
            continue
        options = dict(scenario["options"])
        if "group" in scenario:
            members = scenario["group"]
            groups = {r: dist.new_group([r]) for r in range(world) if r not in members}
            groups.update(dict.fromkeys(members, dist.new_group(members)))
            options["process_group"] = groups[rank]
        layer = _layer(**options)
        steps = _train(layer, name, scenario["sizes"][world], rank)
        layer.eval()
        x_eval = _data(name, -1, rank, 4)[0]
        results[name] = {
            "steps": steps,
            "eval": layer(x_eval).detach(),
            "state": copy.deepcopy(layer.state_dict()),
        }
    results["host_reads"] = _host_reads(rank)
    results["errors"] = _errors(rank, world)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, list[dict[str, Any]]]:
    size = request.param
    return size, run_world(_world_body, size, tmp_path_factory.mktemp(f"shuffle{size}"))


def distributed(test: Any) -> Any:
    """Mark a test that needs the spawned processes."""
    test = pytest.mark.distributed(test)
    return pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    )(test)


def _close(actual: Tensor | None, expected: Tensor, what: str) -> None:
    if actual is None:
        assert expected.numel() == 0, f"{what}: no gradient"
        return
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(SCENARIOS))
@distributed
def test_matches_single_process_reference(
    name: str, world: tuple[int, list[dict[str, Any]]]
) -> None:
    size, results = world
    scenario = SCENARIOS[name]
    if size not in scenario["sizes"]:
        pytest.skip(f"{name} runs in a world of {sorted(scenario['sizes'])}")
    members = scenario.get("group", list(range(size)))
    partition = [members] + [[r] for r in range(size) if r not in members]
    weight, bias = _affine()
    for ranks in partition:
        running = {
            r: (torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64))
            for r in ranks
        }
        tracked = dict.fromkeys(ranks, 0)
        for step, per_rank in enumerate(scenario["sizes"][size]):
            data = [_data(name, step, r, per_rank[r]) for r in ranks]
            # A shuffled step uses the permutation of (seed, step): every layer here has seed
            # SEED and shuffles once per step.  A group of one is plain BN (no options here).
            groups = scenario["options"].get("norm_batch_size") if len(ranks) > 1 else None
            xs, gs = [d[0] for d in data], [d[1] for d in data]
            ref = reference_step(xs, gs, weight, bias, SEED, step, groups)
            counts = [per_rank[r] for r in ranks]
            at = f"{name}, world {size}, ranks {ranks}, step {step}, sizes {counts}"
            got = {r: results[r][name]["steps"][step] for r in ranks}
            for i, r in enumerate(ranks):
                _close(got[r]["y"], ref["y"][i], f"{at}: output of rank {r}")
                _close(got[r]["x_grad"], ref["x_grad"][i], f"{at}: input gradient of rank {r}")
                running[r] = _ema(running[r], ref["statistics"][i])
                tracked[r] += ref["statistics"][i] is not None
                _close(got[r]["running_mean"], running[r][0], f"{at}: running_mean of rank {r}")
                _close(got[r]["running_var"], running[r][1], f"{at}: running_var of rank {r}")
                assert got[r]["num_batches_tracked"] == tracked[r], at
                if len(ranks) > 1:  # every rank used the documented permutation of this step
                    assert torch.equal(got[r]["perm"], ref["perm"]), at
                    assert got[r]["shuffle_step"] == step + 1, at
            for key in ("weight_grad", "bias_grad"):
                total = sum(got[r][key] for r in ranks)
                _close(total, ref[key], f"{at}: {key} summed over ranks")
        for r in ranks:  # eval is BN's with the rank's own running statistics
            bn = nn.BatchNorm2d(C, dtype=torch.float64).eval()
            bn.load_state_dict(results[r][name]["state"])
            expected = bn(_data(name, -1, r, 4)[0])
            _close(results[r][name]["eval"], expected, f"{name}: eval of rank {r}")


@pytest.mark.parametrize("name", ["uneven_and_empty", "norm_batch_size_2"])
@distributed
def test_steps_draw_different_permutations_that_every_rank_agrees_on(
    name: str, world: tuple[int, list[dict[str, Any]]]
) -> None:
    size, results = world
    steps = len(SCENARIOS[name]["sizes"][size])
    perms = [results[0][name]["steps"][s]["perm"] for s in range(steps)]
    for r in range(1, size):
        for s in range(steps):
            assert torch.equal(results[r][name]["steps"][s]["perm"], perms[s]), (r, s)
    same_total = [p for p in perms if p.numel() == perms[0].numel()]
    if len(same_total) > 1:
        assert any(not torch.equal(p, same_total[0]) for p in same_total[1:])
    # ... and the permutation is not the identity every time (shuffling happened)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms)


@distributed
def test_shuffling_changes_which_samples_share_statistics(
    world: tuple[int, list[dict[str, Any]]],
) -> None:
    """Not trivially BN: where two ranks hold samples, some rank's outputs differ from BN of
    its own batch (the reference above is not just per-rank BN)."""
    size, results = world
    weight, bias = _affine()
    differs = 0
    for step, per_rank in enumerate(SCENARIOS["uneven_and_empty"]["sizes"][size]):
        for r in range(size):
            x = _data("uneven_and_empty", step, r, per_rank[r])[0]
            if x.shape[0] == 0:
                continue
            own = _bn(x, weight, bias)
            got = results[r]["uneven_and_empty"]["steps"][step]["y"]
            differs += not torch.allclose(got, own, atol=1e-3)
    assert differs >= 3


@distributed
def test_a_step_reads_back_only_the_exchanged_sizes(
    world: tuple[int, list[dict[str, Any]]],
) -> None:
    """With the finite check deferred, a shuffled training step (forward and backward) makes
    one host read on every rank: the all-reduced batch sizes (``Tensor.tolist``)."""
    size, results = world
    for r in range(size):
        for options, found in results[r]["host_reads"].items():
            if options.startswith("first"):  # + the agreement check's read: seen too
                assert found == ["Tensor.tolist", "Tensor.tolist"], (r, options, found)
            else:
                assert found == ["Tensor.tolist"], (r, options, found)


@distributed
def test_errors_are_raised_on_every_rank_naming_the_layer(
    world: tuple[int, list[dict[str, Any]]],
) -> None:
    size, results = world
    for r in range(size):
        errors = results[r]["errors"]
        message = errors["one_value"]
        assert message.startswith(
            "ShuffleBatchNorm1d(4): training needs more than one value per channel"
        )
        assert (
            "the part of the shuffled batch that rank 0 normalizes (1 sample(s) of shape (4,)"
            in message
        )
        assert "has 1 (input shape" in message and "'syncbn'" in message
        assert errors["one_value_state"] == (0, 0)  # the rejected step changed nothing
        assert (
            "(groups of 2)" in errors["one_value_group"]
            and "norm_batch_size (now 2)" in errors["one_value_group"]
        )
        assert errors["shapes"].startswith(
            "ShuffleBatchNorm2d(2): shuffling moves samples between processes"
        )
        assert "rank 0 has (2, 3, 3), rank 1 has (2, 3, 4)" in errors["shapes"]
        assert errors["empty_may_differ"] == ((0, 2, 5, 3) if r == 0 else (2, 2, 3, 3))
        assert errors["after"] == (3, 4)


# -- the exchange plan, in one process ----------------------------------------------------------


@pytest.mark.parametrize("sizes", [[3, 0, 4], [1, 1], [0, 0, 5, 2], [0, 0], [6]], ids=str)
@pytest.mark.parametrize("step", [0, 1])
def test_plan_gives_each_rank_its_part_of_the_shuffled_batch(sizes: list[int], step: int) -> None:
    """Simulate the exchange with the plans' counts: each rank receives exactly its part of
    the permuted concatenation (in shuffled order), and the inverse returns every row home."""
    world = len(sizes)
    perm = shuffle_permutation(SEED, step, sum(sizes))
    rows = [torch.arange(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(world)]  # global ids
    plans = [shuffle_plan(perm, sizes, r) for r in range(world)]
    for plan in plans:
        assert plan.counts == plans[0].counts
    counts = plans[0].counts
    sent = [rows[r][plans[r].send_order] for r in range(world)]
    chunks = [list(sent[s].split(list(counts[s]))) for s in range(world)]
    received = [torch.cat([chunks[s][d] for s in range(world)]) for d in range(world)]
    parts = perm.split(sizes)
    for d in range(world):
        shuffled = received[d] if world == 1 else received[d][plans[d].to_shuffled]
        assert torch.equal(shuffled, parts[d]), d
        assert sum(counts[s][d] for s in range(world)) == sizes[d]
        # back: from shuffled order, to the owners, into their original order
        back_order = received[d] if world == 1 else shuffled[plans[d].from_shuffled]
        assert torch.equal(back_order, received[d])
    back_chunks = [
        list(received[d].split([counts[s][d] for s in range(world)])) for d in range(world)
    ]
    for s in range(world):
        returned = torch.cat([back_chunks[d][s] for d in range(world)])
        assert torch.equal(returned[plans[s].restore], rows[s]), s


def test_permutation_is_a_documented_deterministic_function() -> None:
    gen = torch.Generator().manual_seed(smallbn._distributed._mix(SEED, 3))
    assert torch.equal(shuffle_permutation(SEED, 3, 10), torch.randperm(10, generator=gen))
    assert torch.equal(shuffle_permutation(SEED, 3, 10), shuffle_permutation(SEED, 3, 10))
    perms = {tuple(shuffle_permutation(SEED, s, 8).tolist()) for s in range(20)}
    assert len(perms) >= 19  # 8! permutations: repeats among 20 steps are (nearly) impossible
    assert not torch.equal(shuffle_permutation(SEED, 0, 8), shuffle_permutation(SEED + 1, 0, 8))
    state = torch.get_rng_state()
    shuffle_permutation(SEED, 0, 8)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator untouched


# -- one process --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_without_norm_batch_size_one_process_is_batchnorm(shape: tuple[int, ...]) -> None:
    layer = smallbn.build_norm(
        "shufflebn", shape[1], dim=max(len(shape) - 2, 1), dtype=torch.float64
    )
    lockstep_vs_torch_bn(layer, shape, steps=3, momentum=0.1)
    assert layer.shuffle_step == 0 and layer.last_permutation is None  # nothing drawn


@pytest.mark.parametrize("shape", [(7, 3, 2, 3), (9, 3), (5, 3, 4)], ids=shape_id)
def test_norm_batch_size_normalizes_groups_of_the_permuted_batch(shape: tuple[int, ...]) -> None:
    size = 3
    layer = ShuffleBatchNorm(
        shape[1], momentum=MOMENTUM, seed=SEED, norm_batch_size=size, dtype=torch.float64
    )
    weight, bias = _affine()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    running = (torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    perms = []
    for step in range(3):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1) + step
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        ref = reference_step([x], [g], weight, bias, SEED, step, size)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * g).sum().backward()
        at = f"step {step}"
        _close(y.detach(), ref["y"][0], f"{at}: output")
        _close(xi.grad, ref["x_grad"][0], f"{at}: input gradient")
        _close(layer.weight.grad, ref["weight_grad"], f"{at}: weight gradient")
        _close(layer.bias.grad, ref["bias_grad"], f"{at}: bias gradient")
        layer.weight.grad = layer.bias.grad = None
        running = _ema(running, ref["statistics"][0])
        _close(layer.running_mean, running[0], f"{at}: running_mean")
        _close(layer.running_var, running[1], f"{at}: running_var")
        assert torch.equal(layer.last_permutation, ref["perm"]) and layer.shuffle_step == step + 1
        perms.append(layer.last_permutation)
    assert not torch.equal(perms[0], perms[1]) or not torch.equal(perms[1], perms[2])
    # the permutation matters: consecutive (unshuffled) groups give other outputs
    ghost = smallbn.GhostBatchNorm(shape[1], group_size=size, dtype=torch.float64)
    with torch.no_grad():
        ghost.weight.copy_(weight)
        ghost.bias.copy_(bias)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert not torch.allclose(ghost(x), layer(x))


def test_a_batch_within_norm_batch_size_is_batchnorm_without_a_permutation() -> None:
    layer = ShuffleBatchNorm2d(C, norm_batch_size=8, dtype=torch.float64)
    lockstep_vs_torch_bn(layer, (4, C, 3, 3), steps=2)
    assert layer.shuffle_step == 0


def test_eval_is_batchnorms_eval_and_state_dict_is_batchnorms() -> None:
    layer = ShuffleBatchNorm2d(C, norm_batch_size=2, seed=SEED, dtype=torch.float64)
    for step in range(3):
        layer(torch.randn(5, C, 4, 4, dtype=torch.float64) + step).sum().backward()
    assert list(layer.state_dict().keys()) == BN_STATE_KEYS
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    bn.load_state_dict(layer.state_dict())
    layer.eval()
    bn.eval()
    x = torch.randn(4, C, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bn(x), **TOL)
    with torch.no_grad():  # the same kernel as BN's
        torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=0)
    back = ShuffleBatchNorm2d(C, dtype=torch.float64)
    back.load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_is_a_torch_batchnorm_for_code_that_finds_norms_by_type() -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    assert isinstance(ShuffleBatchNorm2d(4), _BatchNorm)


def test_convert_to_and_from_shufflebn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].running_var.uniform_(1, 2)
        model[1].weight.uniform_()
    state = copy.deepcopy(model.state_dict())
    converted = smallbn.convert(copy.deepcopy(model), "shufflebn", norm_batch_size=2)
    assert type(converted[1]) is ShuffleBatchNorm2d and converted[1].norm_batch_size == 2
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    back = smallbn.convert(converted, "bn")
    assert type(back[1]) is nn.BatchNorm2d
    for key, value in back.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert type(smallbn.build_norm("shufflebn", 4, dim=1)) is ShuffleBatchNorm1d
    assert type(smallbn.build_norm("shufflebn", 4, dim=None)) is ShuffleBatchNorm


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1)], ids=shape_id)
def test_one_value_per_channel_is_a_clear_error_naming_the_layer(shape: tuple[int, ...]) -> None:
    layer = ShuffleBatchNorm1d(4)
    with pytest.raises(
        ValueError,
        match=r"^ShuffleBatchNorm1d\(4\): training needs more than one value per channel.*the "
        r"batch has 1.*larger per-process batch.*'syncbn'",
    ):
        layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 0 and (layer.running_var == 1).all()
    grouped = ShuffleBatchNorm1d(4, norm_batch_size=2)
    with pytest.raises(
        ValueError,
        match=r"^ShuffleBatchNorm1d\(4\): .*smallest group of samples \(groups of 2, batch 3.*"
        r"larger norm_batch_size \(now 2\)",
    ):
        grouped(torch.randn(3, 4))
    assert int(grouped.num_batches_tracked) == 0 and grouped.shuffle_step == 0


def test_rejects_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match=r"ShuffleBatchNorm2d: norm_batch_size must be >= 1"):
        ShuffleBatchNorm2d(4, norm_batch_size=0)
    with pytest.raises(
        ValueError, match=r"ShuffleBatchNorm2d: seed must be an int in \[0, 2\*\*63\)"
    ):
        ShuffleBatchNorm2d(4, seed=-1)
    with pytest.raises(ValueError, match=r"ShuffleBatchNorm2d: exchange must be 'auto'"):
        ShuffleBatchNorm2d(4, exchange="ring")  # type: ignore[arg-type]


@pytest.fixture
def deferred() -> Iterator[None]:
    old = smallbn.set_finite_check("deferred")
    yield
    smallbn.set_finite_check(old)


@pytest.mark.parametrize("options", [{}, {"norm_batch_size": 2}], ids=str)
def test_one_process_step_reads_nothing_back(options: dict[str, Any], deferred: None) -> None:
    layer = ShuffleBatchNorm2d(C, **options)
    x = torch.randn(5, C, 4, 4, requires_grad=True)
    layer(x).square().sum().backward()
    assert count_host_reads(lambda: layer(x).square().sum().backward()) == []
    layer.eval()
    assert count_host_reads(lambda: layer(x)) == []


def test_a_statistics_pass_does_not_advance_the_permutation() -> None:
    model = nn.Sequential(ShuffleBatchNorm2d(C, norm_batch_size=2, seed=SEED))
    x = torch.randn(6, C, 3, 3)
    model(x)
    assert model[0].shuffle_step == 1
    with smallbn.batch_stats_eval(model):
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # the same permutation both times
    assert model[0].shuffle_step == 1
    assert np.array_equal(
        model[0].last_permutation.numpy(), shuffle_permutation(SEED, 1, 6).numpy()
    )


def test_default_seed_is_torch_initial_seed_and_draws_nothing() -> None:
    x = torch.randn(4, C, 2, 2)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    layer = ShuffleBatchNorm2d(C, norm_batch_size=2)
    layer(x)
    assert torch.equal(layer.last_permutation, shuffle_permutation(5, 0, 4))
    assert torch.equal(torch.get_rng_state(), state)  # converting a model changes no random draws


def test_second_order_gradients_flow_through_the_exchange_function() -> None:
    """The exchange's backward is itself an exchange (in one process, a permutation): the
    plain-BN part (torch's kernel) then supports double backward like BN."""
    layer = ShuffleBatchNorm2d(C, dtype=torch.float64)
    x = torch.randn(4, C, 2, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    gx.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compiled_groups_equal_eager_without_recompiling() -> None:
    """Under torch.compile the permutation is drawn eagerly (a graph break, no guard on the
    host step counter): every step equals the eager layer and none recompiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled_layer = ShuffleBatchNorm2d(C, norm_batch_size=2, seed=SEED, dtype=torch.float64)
    eager = copy.deepcopy(compiled_layer)
    compiled = torch.compile(compiled_layer, backend=counter)
    gen = torch.Generator().manual_seed(11)
    frames = []
    for step in range(4):
        x = torch.randn(5, C, 3, 3, generator=gen, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), eager(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(ya, yb, **TOL)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        torch.testing.assert_close(compiled_layer.running_var, eager.running_var, **TOL)
        assert compiled_layer.shuffle_step == eager.shuffle_step == step + 1
        frames.append(counter.frame_count)
    assert frames[1:] == frames[:1] * 3, frames  # compiled once, reused by every later step
    torch._dynamo.reset()
