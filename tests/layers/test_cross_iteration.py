"""Cross-Iteration BN against the float64 reference written from methods.md (tests/reference.py:
derivatives by autograd, a plain loop over the window), over real SGD trajectories of
producer + norm blocks; identities (unchanged weights = BN over the concatenated batches, no
compensation = naive pooling, gradient accumulation = exactly no compensation); checkpoints,
binding, conversion, errors; mixed precision; pooling across processes."""

from __future__ import annotations

import copy
import gc
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import smallbn
from _spawn import run_world
from _sync_training import assert_ranks_equal_concatenated, train_on_slices
from reference import RefCrossIterationBatchNorm
from smallbn.experiments.models import SmallResNet
from smallbn.layers.cross_iteration import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    recommended_window,
)

NORMS = {1: CrossIterationBatchNorm1d, 2: CrossIterationBatchNorm2d, 3: CrossIterationBatchNorm3d}
TOL: dict[str, float] = {"rtol": 1e-6, "atol": 1e-9}
BN_KEYS = set(nn.BatchNorm2d(3).state_dict())
WINDOW_KEYS = {"iteration", "window_fill", "window_mean", "window_var"} | {
    "window_mean_dot",
    "window_var_dot",
}
GRAD_KEYS = {"window_mean_grad", "window_var_grad"}


def _spec() -> Any:
    """The registered name once smallbn registers "cbn", the rank-agnostic class until then."""
    return "cbn" if "cbn" in smallbn.available_norms() else CrossIterationBatchNorm


# -- producers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Producer:
    """A layer before the norm: how to build it, its input shape and the norm's rank."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    dim: int

    def functional(self, module: nn.Module) -> Callable[[Tensor, list[Tensor]], Tensor]:
        """``producer(u, params)`` for the reference: the same layer as a function of its
        parameters (``torch.func.functional_call`` keeps stride, padding, groups, ...)."""
        names = [name for name, _ in module.named_parameters()]

        def run(u: Tensor, params: list[Tensor]) -> Tensor:
            return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (u,))

        return run


PRODUCERS = {
    p.name: p
    for p in [
        Producer("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1, bias=False), (2, 3, 9), 1),
        Producer("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 5, 6), 2),
        Producer("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1, bias=False), (2, 2, 4, 3, 4), 3),
        Producer("strided", lambda: nn.Conv2d(3, 4, 3, stride=2, bias=False), (2, 3, 7, 8), 2),
        Producer(
            "dilated",
            lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False),
            (2, 3, 6, 6),
            2,
        ),
        Producer(
            "grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (2, 4, 5, 5), 2
        ),
        Producer("biased", lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), 2),
        Producer(
            "all_at_once",
            lambda: nn.Conv2d(
                4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2
            ),
            (3, 4, 7, 6),
            2,
        ),
        Producer(
            "same_reflect",
            lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"),
            (2, 3, 8),
            1,
        ),
        Producer("linear", lambda: nn.Linear(5, 4), (6, 5), 1),
    ]
}


# -- lockstep with the reference -------------------------------------------------------------


@dataclass
class Lockstep:
    """A producer + CBN block and the reference, trained side by side with SGD."""

    producer: Producer
    window: int = 3
    lr: float = 0.1
    options: dict[str, Any] = field(default_factory=dict)
    ref_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.conv = self.producer.build().double()
        channels = self.conv.weight.shape[0]
        self.norm = NORMS[self.producer.dim](
            channels, window=self.window, dtype=torch.float64, **self.options
        )
        gen = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
            self.norm.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        self.norm.bind_producer(self.conv)
        self.ref = RefCrossIterationBatchNorm(
            channels,
            self.window,
            weight=self.norm.weight,
            bias=self.norm.bias,
            **self.ref_options,
        )
        self.ref_params = [p.detach().clone().requires_grad_() for p in self.conv.parameters()]
        self.fn = self.producer.functional(self.conv)
        mine = [*self.conv.parameters(), *self.norm.parameters()]
        theirs = [*self.ref_params, self.ref.weight, self.ref.bias]
        self.opt = torch.optim.SGD(mine, lr=self.lr, momentum=0.9)
        self.ref_opt = torch.optim.SGD(theirs, lr=self.lr, momentum=0.9)
        self.gen = torch.Generator().manual_seed(self.seed + 2)
        self.step_count = 0

    def data(self) -> tuple[Tensor, Tensor]:
        shape = self.producer.shape
        u = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        u = u * (1.0 + 0.1 * self.step_count) + 0.3
        with torch.no_grad():
            out_shape = self.conv(u).shape
        g = torch.randn(out_shape, generator=self.gen, dtype=torch.float64)
        return u, g

    def step(self, check: bool = True) -> tuple[Tensor, Tensor]:
        u, g = self.data()
        u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
        y1 = self.norm(self.conv(u1))
        y2 = self.ref.train_step(u2, self.ref_params, self.fn)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        where = f"{self.producer.name}, step {self.step_count}"
        if check:
            close(y1, y2, f"output ({where})")
            close(u1.grad, u2.grad, f"input gradient ({where})")
            for (name, p), r in zip(self.conv.named_parameters(), self.ref_params, strict=True):
                close(p.grad, r.grad, f"producer {name} gradient ({where})")
            close(self.norm.weight.grad, self.ref.weight.grad, f"gamma gradient ({where})")
            close(self.norm.bias.grad, self.ref.bias.grad, f"beta gradient ({where})")
            close(self.norm.running_mean, self.ref.running_mean, f"running_mean ({where})")
            close(self.norm.running_var, self.ref.running_var, f"running_var ({where})")
        self.opt.step()
        self.ref_opt.step()
        self.opt.zero_grad()
        self.ref_opt.zero_grad()
        self.step_count += 1
        return y1.detach(), y2.detach()


def close(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    assert actual is not None and expected is not None, what
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), **TOL, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_matches_reference_over_sgd_steps(name: str) -> None:
    run = Lockstep(PRODUCERS[name])
    for _ in range(20):
        run.step()
    assert int(run.norm.iteration) == 20 and int(run.norm.window_fill) == 3


@pytest.mark.parametrize("aggregation", ["max", "drop"])
@pytest.mark.parametrize("eps_placement", ["inside", "outside"])
def test_aggregation_rules_and_eps_placements(aggregation: str, eps_placement: str) -> None:
    # A large learning rate moves the weights far enough for negative compensated variances.
    run = Lockstep(
        PRODUCERS["biased"],
        window=4,
        lr=2.0,
        options={"aggregation": aggregation, "eps_placement": eps_placement, "eps": 1e-3},
        ref_options={
            "aggregation": aggregation,
            "eps_outside": eps_placement == "outside",
            "eps": 1e-3,
        },
    )
    negative = dropped = 0
    for _ in range(20):
        run.step()
        negative += run.ref.last_negative
        dropped += run.ref.last_dropped
    assert negative > 0  # the rule was exercised: some compensated ν fell below μ²
    assert (dropped > 0) == (aggregation == "drop")


@pytest.mark.parametrize(
    ("burnin", "mode"), [(5, "two_stage"), (6, "linear"), (0, "linear")], ids=str
)
def test_burnin_schedules(burnin: int, mode: str) -> None:
    run = Lockstep(
        PRODUCERS["strided"],
        window=4,
        options={"burnin": burnin, "burnin_mode": mode},
        ref_options={"burnin": burnin, "ramp": mode == "linear"},
    )
    windows = [run.norm.effective_window(t) for t in range(10)]
    expected = [run.ref.window_at(t) for t in range(10)]
    assert windows == expected
    for _ in range(15):
        run.step()


def test_burnin_window_values() -> None:
    two_stage = CrossIterationBatchNorm2d(4, window=4, burnin=3)
    linear = CrossIterationBatchNorm2d(4, window=4, burnin=6, burnin_mode="linear")
    assert [two_stage.effective_window(t) for t in range(5)] == [1, 1, 1, 4, 4]
    assert [linear.effective_window(t) for t in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_burnin_is_plain_bn() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    norm = CrossIterationBatchNorm2d(4, window=3, burnin=4, dtype=torch.float64)
    norm.bind_producer(conv)
    bn = nn.BatchNorm2d(4, dtype=torch.float64)
    for _ in range(4):
        x = conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
        torch.testing.assert_close(norm(x), bn(x), rtol=0, atol=1e-12)
    x = conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert not torch.allclose(norm(x), bn(x), atol=1e-3)  # the window is in use


def test_without_compensation_is_naive_pooling() -> None:
    run = Lockstep(
        PRODUCERS["biased"], options={"compensate": False}, ref_options={"compensate": False}
    )
    for _ in range(20):
        run.step()
    assert run.norm.window_var_grad is None  # nothing stored for compensation


def test_compensation_changes_the_result() -> None:
    """The trajectories above move the weights enough for the compensation to matter."""
    compensated = Lockstep(PRODUCERS["biased"])
    naive = Lockstep(PRODUCERS["biased"], options={"compensate": False})
    for _ in range(6):
        y, _ = compensated.step(check=False)
        y_naive, _ = naive.step(check=False)
    assert (y - y_naive).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["conv2d", "linear"])
def test_unchanged_weights_give_bn_over_the_concatenated_batches(name: str) -> None:
    producer = PRODUCERS[name]
    run = Lockstep(producer, window=4, lr=0.0)
    inputs = []
    for _ in range(8):
        u, _ = run.data()
        inputs.append(u)
        with torch.no_grad():
            y = run.norm(run.conv(u))
            recent = torch.cat([run.conv(v) for v in inputs[-4:]])
        expected = F.batch_norm(
            recent, None, None, run.norm.weight, run.norm.bias, training=True, eps=run.norm.eps
        )
        torch.testing.assert_close(y, expected[-u.shape[0] :], rtol=1e-10, atol=1e-10)


# -- exactness of the compensation -----------------------------------------------------------


def _twin_blocks(window: int, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """A compensated and a naive conv + CBN block with the same parameters."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    blocks = []
    for compensate in (True, False):
        c = copy.deepcopy(conv)
        norm = CrossIterationBatchNorm2d(4, window=window, compensate=compensate)
        if compensate:
            norm.bind_producer(c)
        blocks.append(nn.Sequential(c, norm))
    return blocks[0], blocks[1]


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_gradient_accumulation_compensates_exactly_nothing(micro_batches: int) -> None:
    """Micro-batches of one optimizer step share the weights: once the window holds only
    micro-batches of the current step, compensated and naive pooling agree bit for bit."""
    compensated, naive = _twin_blocks(window=micro_batches)
    opts = [torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9) for b in (compensated, naive)]
    gen = torch.Generator().manual_seed(3)
    differs = 0
    for step in range(5):
        for micro in range(micro_batches):
            u = torch.randn(2, 3, 6, 6, generator=gen) + step
            g = torch.randn(2, 4, 6, 6, generator=gen)
            y = compensated(u)
            y_naive = naive(u)
            if micro == micro_batches - 1:
                assert torch.equal(y, y_naive), (step, micro)
            else:
                differs += not torch.equal(y, y_naive)
            # identical gradients keep the twins' weights identical
            (y_naive * g).sum().backward()
            for p, q in zip(compensated.parameters(), naive.parameters(), strict=True):
                p.grad = None if q.grad is None else q.grad.clone()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert differs > 0  # entries from earlier steps were compensated


def test_frozen_producer_compensates_nothing() -> None:
    compensated, naive = _twin_blocks(window=3)
    for block in (compensated, naive):
        block[0].requires_grad_(False)
    opts = [torch.optim.SGD(b.parameters(), lr=0.5) for b in (compensated, naive)]
    for step in range(6):
        u = torch.randn(2, 3, 5, 5) + step
        y, y_naive = compensated(u), naive(u)
        assert torch.equal(y, y_naive)
        assert compensated[1].window_var_grad is not None  # derivatives were recorded
        for out in (y, y_naive):
            out.square().sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()


# -- state -----------------------------------------------------------------------------------


def _block(seed: int = 0, **options: Any) -> nn.Sequential:
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CrossIterationBatchNorm2d(4, **options))
    return block


def _train(block: nn.Sequential, opt: torch.optim.Optimizer, steps: range) -> list[Tensor]:
    outputs = []
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        u = torch.randn(2, 3, 5, 5, generator=gen) * (1 + 0.2 * step)
        y = block(u)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outputs.append(y.detach())
    return outputs


@pytest.mark.parametrize("order", ["bind_then_load", "load_then_bind"])
@pytest.mark.parametrize("window", [3, None])
def test_resuming_from_a_checkpoint_continues_identically(order: str, window: int | None) -> None:
    full = _block(window=window)
    smallbn.bind_producers(full)
    full_opt = torch.optim.SGD(full.parameters(), lr=0.3, momentum=0.9)
    expected = _train(full, full_opt, range(12))

    first = _block(window=window)
    smallbn.bind_producers(first)
    first_opt = torch.optim.SGD(first.parameters(), lr=0.3, momentum=0.9)
    _train(first, first_opt, range(7))
    state = copy.deepcopy(first.state_dict())
    opt_state = copy.deepcopy(first_opt.state_dict())
    assert GRAD_KEYS | WINDOW_KEYS <= {k.split(".", 1)[1] for k in state}

    resumed = _block(seed=1, window=window)  # other initial weights: all comes from the state
    if order == "bind_then_load":
        smallbn.bind_producers(resumed)
        resumed.load_state_dict(state)
    else:
        resumed.load_state_dict(state)
        smallbn.bind_producers(resumed)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    resumed_opt.load_state_dict(opt_state)
    for got, want in zip(_train(resumed, resumed_opt, range(7, 12)), expected[7:], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("window", [3, None])
def test_bn_checkpoint_loads_strict_as_an_empty_window(window: int | None) -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(), bn.running_mean.uniform_()
        bn.running_var.uniform_(1, 2)
    bn.num_batches_tracked.fill_(7)
    block = _block(window=window)
    smallbn.bind_producers(block)
    block[1].load_state_dict(bn.state_dict())  # before any training
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(4))
    assert int(block[1].window_fill) == min(4, block[1].window_size) > 1
    assert bn.state_dict()._metadata[""]["version"] == 2  # type: ignore[attr-defined]
    block[1].load_state_dict(bn.state_dict())  # into a filled window: it empties
    norm = block[1]
    assert int(norm.window_fill) == 0 and int(norm.iteration) == 0
    assert torch.equal(norm.running_var, bn.running_var) and int(norm.num_batches_tracked) == 7
    assert set(norm.state_dict()) == BN_KEYS | WINDOW_KEYS | GRAD_KEYS
    # training goes on as plain BN for the first step (empty window)
    u = torch.randn(2, 3, 5, 5)
    x = block[0](u)
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(norm(x), expected)


def test_a_checkpoint_of_the_current_version_round_trips_exactly() -> None:
    """CBN's state_dict records its version (3, above BN's 2), and such a checkpoint loads as
    it is: the same state, host counters included, and the same next training steps."""
    block = _block(window=3)
    smallbn.bind_producers(block)
    opt = torch.optim.SGD(block.parameters(), lr=0.3)
    _train(block, opt, range(5))
    state = copy.deepcopy(block.state_dict())
    assert state._metadata["1"]["version"] == CrossIterationBatchNorm._version == 3  # type: ignore[attr-defined]
    assert nn.BatchNorm2d._version == 2
    resumed = _block(seed=1, window=3)  # other weights: all comes from the checkpoint
    smallbn.bind_producers(resumed)
    resumed.load_state_dict(state)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert (resumed[1]._iteration, resumed[1]._fill) == (block[1]._iteration, block[1]._fill)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.3)
    for got, want in zip(
        _train(resumed, resumed_opt, range(5, 8)), _train(block, opt, range(5, 8)), strict=True
    ):
        assert torch.equal(got, want)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, block.state_dict()[key]), key


def test_a_current_checkpoint_without_its_counters_is_incomplete_not_a_bn_one() -> None:
    """Version 3 is read as it is: a missing counter is a missing key of a strict load (the
    version, not the keys, tells a BN checkpoint)."""
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(4))
    state = block[1].state_dict()
    del state["iteration"]
    fresh = _block(window=3)
    smallbn.bind_producers(fresh)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"iteration\""):
        fresh[1].load_state_dict(state)


def test_a_state_dict_without_a_version_loads_as_an_old_one() -> None:
    """torch passes ``version=None`` when ``_metadata`` lacks it (e.g. a state_dict rebuilt
    as a plain dict): read as version ≤ 2, missing counters start the window afresh at
    iteration 0, as for a BN checkpoint, and a complete one loads exactly."""
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(4))
    state = block[1].state_dict()
    target = _block(window=3)
    smallbn.bind_producers(target)
    norm = target[1]
    norm.load_state_dict(dict(state))  # no _metadata at all: every key as it is
    for key, value in norm.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert int(norm.window_fill) == 3 and int(norm.iteration) == 4
    del state._metadata[""]["version"]  # type: ignore[attr-defined]
    del state["iteration"]
    norm.load_state_dict(state)  # strict, no missing key: migrated
    assert int(norm.iteration) == 0 and int(norm.window_fill) == 0 and norm._fill == 0
    assert torch.equal(norm.running_var, state["running_var"])


def test_state_holds_no_producer_and_is_bounded() -> None:
    block = _block(window=4)
    smallbn.bind_producers(block)
    norm = block[1]
    assert list(norm.children()) == [] and len(list(norm.parameters())) == 2
    assert set(norm.state_dict()) == BN_KEYS | WINDOW_KEYS | GRAD_KEYS
    weight = block[0].weight
    groups, k, per_channel = norm.window_mean_grad.shape
    assert (groups, k, per_channel) == (1, 4, weight[0].numel())
    assert norm.window_var_grad.shape == (4, 4, weight[0].numel())
    # k × (conv weight + C_in·K) + O(k·C) numbers
    window = sum(t.numel() for name, t in norm.named_buffers() if name.startswith("window_"))
    assert window == 4 * (weight.numel() + weight[0].numel()) + 4 * (4 * 4) + 1


def test_deepcopy_and_pickling_keep_the_binding() -> None:
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(2))
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(block), torch.load(buffer, weights_only=False)):
        assert twin[1].producer is twin[0] and block[1].producer is block[0]
        assert len(twin[0]._forward_hooks) == 1
        original = copy.deepcopy(block)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a broken binding would warn
            for step in range(3):
                u = torch.randn(2, 3, 5, 5) + step
                torch.testing.assert_close(original(u), twin(u))
            torch.testing.assert_close(twin[1].window_mean, original[1].window_mean)


def test_an_object_pickled_before_the_iteration_window_loads() -> None:
    """``CrossIterationBatchNorm.__setstate__``: a layer pickled whole before the window object
    existed (its ``__dict__`` held the host counters and index caches, not ``_stored``) gets a
    window whose counters are re-read from the buffers, and goes on as the original."""
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(2))
    original, twin = copy.deepcopy(block), copy.deepcopy(block)
    norm = twin[1]
    state = dict(norm.__dict__)
    del state["_stored"]
    old = {"_iteration": 0, "_fill": 0, "_slots": {}, "_group_index": {}, "_host_stale": True}
    state.update(old)  # stale host values: the buffers are what counts
    norm.__dict__.clear()
    norm.__setstate__(state)
    assert not set(old) & set(norm.__dict__)
    assert norm.window_mean is norm._stored.buffers["window_mean"]
    assert (norm._iteration, norm._fill) == (original[1]._iteration, original[1]._fill) == (2, 2)
    for step in range(3):
        u = torch.randn(2, 3, 5, 5) + step
        torch.testing.assert_close(twin(u), original(u))
    assert int(norm.iteration) == norm._iteration == 5
    torch.testing.assert_close(norm.window_mean, original[1].window_mean)


def test_eval_is_bn_and_folds_into_the_conv() -> None:
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(5))
    block.eval()
    norm = block[1]
    u = torch.randn(3, 3, 5, 5)
    x = block[0](u)
    expected = F.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps
    )
    torch.testing.assert_close(block(u), expected)
    folded = smallbn.fold(block)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(u), expected, rtol=1e-5, atol=1e-5)


def test_running_stats_are_bn_ema_of_the_current_batch() -> None:
    torch.manual_seed(0)
    norm = CrossIterationBatchNorm2d(3, window=3, momentum=None, dtype=torch.float64)
    xs = [torch.randn(2, 3, 4, 4, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    with pytest.warns(RuntimeWarning, match="no producing layer is bound"):
        for x in xs:
            norm(x)
    torch.testing.assert_close(
        norm.running_mean, torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    )
    torch.testing.assert_close(
        norm.running_var, torch.stack([x.var((0, 2, 3)) for x in xs]).mean(0)
    )


# -- binding and conversion ------------------------------------------------------------------


def _bn_resnet() -> SmallResNet:
    return SmallResNet(widths=(4, 8), blocks=1, norm="bn")


def test_convert_small_resnet_binds_every_norm_to_its_conv() -> None:
    model = smallbn.convert(_bn_resnet(), _spec(), window=2)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm)}
    # every norm of SmallResNet directly follows a conv: stem, both convs of each block and
    # the projection shortcut
    expected = {
        "stem_norm": "stem",
        "stages.0.bn1": "stages.0.conv1",
        "stages.0.bn2": "stages.0.conv2",
        "stages.1.bn1": "stages.1.conv1",
        "stages.1.bn2": "stages.1.conv2",
        "stages.1.shortcut.1": "stages.1.shortcut.0",
    }
    assert set(norms) == set(expected)
    for name, conv in expected.items():
        assert norms[name].producer is model.get_submodule(conv), name
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all compensated: no naive-pooling warning
        for step in range(3):
            loss = F.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([step % 10, 1]))
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(int(m.window_fill) == 2 for m in norms.values())


class _PreActivation(nn.Module):
    """A norm after a ReLU (no producer) and one after a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.after_conv = nn.BatchNorm2d(4)
        self.after_relu = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.after_relu(F.relu(self.after_conv(self.conv(x))))


def test_norm_without_producer_warns_once_and_pools_naively() -> None:
    with pytest.warns(RuntimeWarning) as record:
        model = smallbn.convert(_PreActivation(), _spec(), window=3)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "at 'after_relu'" in messages[0] and "input is not the output" in messages[0]
    assert "without Taylor compensation" in messages[0]
    assert model.after_relu.producer is None and model.after_conv.producer is model.conv
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        for _ in range(4):
            model(torch.randn(2, 3, 5, 5))
    assert model.after_relu.window_var_grad is None


def test_explicit_binding_and_its_checks() -> None:
    norm = CrossIterationBatchNorm2d(4, window=2)
    with pytest.raises(ValueError, match=r"CrossIterationBatchNorm2d\(4\): bind_producer got a "
                       r"Conv2d with 8 output channels, but this layer normalizes 4"):  # fmt: skip
        norm.bind_producer(nn.Conv2d(3, 8, 1))
    with pytest.warns(RuntimeWarning, match="ConvTranspose2d is not supported"):
        norm.bind_producer(nn.ConvTranspose2d(3, 4, 2))
    assert norm.producer is None
    conv = nn.Conv2d(3, 4, 1)
    assert norm.bind_producer(conv) is None and norm.producer is conv
    assert len(conv._forward_hooks) == 1
    norm.bind_producer(conv)  # rebinding does not stack hooks
    assert len(conv._forward_hooks) == 1
    norm.eval()  # the hook exists in training mode only (fold refuses hooked producers)
    assert len(conv._forward_hooks) == 0
    norm.train()
    assert len(conv._forward_hooks) == 1


def test_converting_away_unhooks_the_producer() -> None:
    """A layer replaced while in training mode leaves no hook behind (fold refuses hooked
    producers, and the hook would keep the replaced layer's inputs alive)."""
    model = smallbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), _spec())
    model(torch.randn(2, 3, 5, 5))
    assert len(model[0]._forward_hooks) == 1
    model = smallbn.convert(model, "bn")
    gc.collect()
    assert len(model[0]._forward_hooks) == 0
    smallbn.fold(model.eval())  # no "producer has forward hooks"
    assert isinstance(smallbn.fold(model)[1], nn.Identity)


def test_input_not_from_the_producer_warns_and_stays_usable() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    norm = CrossIterationBatchNorm2d(4, window=2)
    norm.bind_producer(conv)
    with pytest.warns(RuntimeWarning, match="not the output of the bound Conv2d"):
        for _ in range(3):
            y = norm(F.relu(conv(torch.randn(2, 3, 4, 4))))
    assert torch.isfinite(y).all()


def test_rebinding_to_another_producer_empties_the_window() -> None:
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(3))
    assert int(block[1].window_fill) == 3
    block[1].bind_producer(nn.Conv2d(3, 4, 5))
    assert int(block[1].window_fill) == 0


def test_auto_window_from_the_first_batch() -> None:
    assert [recommended_window(b) for b in (1, 2, 3, 4, 8, 16, 32)] == [8, 8, 6, 4, 2, 1, 1]
    norm = CrossIterationBatchNorm2d(3, compensate=False)  # no producer: no warning
    assert norm.window_size is None and "window=auto" in repr(norm)
    norm(torch.randn(3, 3, 4, 4))
    assert norm.window_size == 6 and norm.window_mean.shape == (6, 3)
    norm(torch.randn(8, 3, 4, 4))  # later batches do not change it
    assert norm.window_size == 6
    large = CrossIterationBatchNorm2d(3)
    x = torch.randn(16, 3, 2, 2)
    torch.testing.assert_close(large(x), F.batch_norm(x, None, None, training=True))
    assert large.window_size == 1 and large.window_mean is None


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"window": 0}, "window is the number of iterations pooled"),
        ({"burnin": -1}, "burnin is a number of iterations"),
        ({"aggregation": "mean"}, r"aggregation must be one of \('max', 'drop'\)"),
        ({"eps_placement": "both"}, "eps_placement must be one of"),
        ({"burnin_mode": "cosine"}, "burnin_mode must be one of"),
    ],
)
def test_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CrossIterationBatchNorm2d(4, **options)


def test_checkpoint_with_another_window_is_an_error() -> None:
    """Refused before anything is copied: the layer keeps its own state, window included
    (it emptied its window and took the checkpoint's running statistics, then raised)."""
    block = _block(window=3)
    smallbn.bind_producers(block)
    _train(block, torch.optim.SGD(block.parameters(), lr=0.1), range(2))
    other_block = _block(seed=1, window=4)
    smallbn.bind_producers(other_block)
    _train(other_block, torch.optim.SGD(other_block.parameters(), lr=0.1), range(2))
    other = other_block[1]
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"holds a window of 3 iterations, this layer was built "
                       r"with window=4"):  # fmt: skip
        other.load_state_dict(block[1].state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert other._fill == 2
    auto = CrossIterationBatchNorm2d(4)  # window=None takes the checkpoint's
    auto.load_state_dict(block[1].state_dict())
    assert auto.window_size == 3 and int(auto.window_fill) == 2


def test_input_checks_and_rejected_batches() -> None:
    norm = CrossIterationBatchNorm2d(4, window=2)
    with pytest.raises(ValueError, match=r"expected a \(N, C, H, W\) input"):
        norm(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="more than one value per channel"):
        norm(torch.randn(1, 4, 1, 1))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        norm(torch.full((2, 4, 2, 2), float("nan")))
    assert int(norm.iteration) == 0 and int(norm.num_batches_tracked) == 0  # nothing counted


# -- shapes, batch sizes, dtypes -------------------------------------------------------------


@given(
    n=st.integers(1, 4),
    spatial=st.tuples(st.integers(2, 4), st.integers(1, 4)),
    window=st.integers(2, 4),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_batch_sizes_and_dtypes_against_reference(
    n: int, spatial: tuple[int, int], window: int, dtype: torch.dtype, seed: int
) -> None:
    """Batch 1 (with spatial dims) included; half precision through autocast (conv in
    bfloat16, parameters and statistics in float32) against the float64 reference, which
    runs at the layer's weights of every step."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    if dtype == torch.float64:
        conv = conv.double()
    norm = CrossIterationBatchNorm2d(4, window=window, dtype=conv.weight.dtype)
    norm.bind_producer(conv)
    ref = RefCrossIterationBatchNorm(4, window)
    fn = PRODUCERS["biased"].functional(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    tol = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for step in range(4):
        u = torch.randn(n, 3, *spatial, dtype=conv.weight.dtype) + step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = norm(conv(u))
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert norm.window_mean.dtype == (
            torch.float64 if dtype == torch.float64 else torch.float32
        )
        params = [p.detach().double().clone().requires_grad_() for p in conv.parameters()]
        y_ref = ref.train_step(u.double(), params, fn)
        # Rounding x to the input dtype moves x̂ by about eps_dtype·|x|/σ: scale the
        # tolerance by each channel's |x|/σ (a batch of a few values may have a tiny σ).
        x = fn(u.double(), params).detach()
        spread = x.std(dim=(0, 2, 3), correction=0).clamp_min(1e-12)
        conditioning = (x.abs().amax(dim=(0, 2, 3)) / spread).reshape(1, -1, 1, 1)
        error = (y.double() - y_ref.detach()).abs()
        assert (error <= tol * (1 + conditioning) * (1 + y_ref.detach().abs())).all(), (
            f"step {step}: largest error {error.max():.3g}"
        )
        y.double().square().sum().backward()
        if dtype != torch.bfloat16:
            y_ref.square().sum().backward()
            torch.testing.assert_close(
                conv.weight.grad.double(), params[0].grad, rtol=tol * 10, atol=tol * 10
            )
        assert torch.isfinite(conv.weight.grad).all()
        opt.step()
        opt.zero_grad()


def test_channels_last_and_float16_inputs() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    norm = CrossIterationBatchNorm2d(4, window=3)
    norm.bind_producer(conv)
    twin_conv = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    twin = CrossIterationBatchNorm2d(4, window=3)
    twin.bind_producer(twin_conv)
    for step in range(4):
        u = torch.randn(2, 3, 5, 5) + step
        y = norm(conv(u.to(memory_format=torch.channels_last)))
        torch.testing.assert_close(y, twin(twin_conv(u)), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p in (*conv.parameters(), *twin_conv.parameters()):
                p.mul_(1.05)
    half = CrossIterationBatchNorm2d(4, window=2)
    x = torch.randn(2, 4, 3, 3).half()
    with pytest.warns(RuntimeWarning):
        for _ in range(3):
            y = half(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_eval_without_running_stats_uses_the_batch() -> None:
    norm = CrossIterationBatchNorm2d(3, window=3, track_running_stats=False).eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), F.batch_norm(x, None, None, training=True))
    assert int(norm.iteration) == 0


# -- pooling across processes ----------------------------------------------------------------

SYNC_SIZES = [[3, 2], [1, 4], [0, 5], [2, 2], [4, 1], [2, 3]]


def _sync_block(sync: bool) -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        CrossIterationBatchNorm2d(4, window=3, sync=sync, dtype=torch.float64),
    ).double()
    smallbn.bind_producers(block)
    return block


def _sync_body(rank: int, world: int) -> list[dict[str, Any]]:
    return train_on_slices(_sync_block(sync=True), SYNC_SIZES, rank)


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_sync_equals_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    world = 2
    ranks = run_world(_sync_body, world, tmp_path)
    expected = train_on_slices(_sync_block(sync=False), SYNC_SIZES, None)
    assert_ranks_equal_concatenated(ranks, expected, SYNC_SIZES, close)


def test_grouped_norm_calls_compensate_each_group_like_separate_steps():
    import copy
    import warnings

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    norm = CrossIterationBatchNorm2d(3, window=3, dtype=torch.float64)
    grouped = nn.Sequential(conv, smallbn.GroupedNorm(norm, 2))
    smallbn.bind_producers(grouped)
    separate_conv = copy.deepcopy(conv)
    separate_norm = CrossIterationBatchNorm2d(3, window=3, dtype=torch.float64)
    separate_norm.bind_producer(separate_conv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step falls back to uncompensated pooling
        for _ in range(4):
            x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
            y = grouped(x)
            expected = torch.cat([separate_norm(separate_conv(x[i : i + 2])) for i in (0, 2, 4)])
            torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
            with torch.no_grad():  # the same weight change for both: compensation is non-zero
                delta = 0.05 * torch.randn_like(conv.weight)
                conv.weight.add_(delta)
                separate_conv.weight.add_(delta)


# -- state across casts, checkpoints and lazy producers -----------------------------------------


def _auto_window_block(seed: int) -> tuple[nn.Conv2d, CrossIterationBatchNorm2d]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    norm = CrossIterationBatchNorm2d(4, window=None, dtype=torch.float64)
    norm.bind_producer(conv)
    return conv, norm


def test_a_checkpoint_with_another_window_continues_as_a_fresh_layer_would():
    """A window=None layer that chose k = 2 loads a k = 4 checkpoint: its window reads the
    same slots as a layer built fresh from that checkpoint (the slot cache is per k)."""
    conv_a, norm_a = _auto_window_block(0)
    for _ in range(7):
        norm_a(conv_a(torch.randn(4, 3, 5, 5, dtype=torch.float64)))
    norm_a.reset_window()
    norm_a(conv_a(torch.randn(4, 3, 5, 5, dtype=torch.float64)))
    conv_b, norm_b = _auto_window_block(1)
    for _ in range(4):
        norm_b(conv_b(torch.randn(8, 3, 5, 5, dtype=torch.float64)))
    conv_c, norm_c = _auto_window_block(2)
    for conv, norm in ((conv_b, norm_b), (conv_c, norm_c)):
        conv.load_state_dict(conv_a.state_dict())
        norm.load_state_dict(norm_a.state_dict())
    for _ in range(4):
        u = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(norm_b(conv_b(u)), norm_c(conv_c(u)), rtol=0, atol=0)


def test_a_window_saved_without_derivatives_restarts_with_a_warning_in_a_bound_layer() -> None:
    """A checkpoint of an unbound layer (naive pooling: no derivative buffers) loaded into a
    bound one: its stored iterations cannot be compensated, so the window restarts, and the
    load says so, naming the layer (the stored iterations were dropped in silence)."""
    unbound = _block(window=3)  # no bind_producers: naive pooling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-producer warning
        _train(unbound, torch.optim.SGD(unbound.parameters(), lr=0.1), range(2))
    state = unbound[1].state_dict()
    assert int(state["window_fill"]) == 2 and "window_var_grad" not in state
    bound = _block(window=3)
    smallbn.bind_producers(bound)
    bound[1].model_path = "1"
    with pytest.warns(RuntimeWarning, match=r"at '1': the checkpoint's window \(2 stored .*"
                      r"restarts empty"):  # fmt: skip
        bound[1].load_state_dict(state)
    assert int(bound[1].window_fill) == bound[1]._fill == 0
    assert torch.equal(bound[1].running_var, state["running_var"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without it
        bound[1].load_state_dict(bound[1].state_dict())


def test_casting_the_model_to_bfloat16_keeps_the_window_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CrossIterationBatchNorm2d(4, window=3))
    model[1].bind_producer(model[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(2, 3, 5, 5)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = {
        k: v.clone()
        for k, v in model[1].state_dict().items()
        if k.startswith("window_") and v.is_floating_point()
    }
    assert len(before) == 6  # statistics, inner products, derivatives
    model.to(torch.bfloat16)
    for name, value in before.items():
        after = getattr(model[1], name)
        assert after.dtype == value.dtype == torch.float32, name
        torch.testing.assert_close(after, value, rtol=0, atol=0)
    assert model[1].weight.dtype == torch.bfloat16  # parameters follow the cast, as in BN
    y = model(torch.randn(2, 3, 5, 5, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_a_lazy_producer_gets_a_clear_error_and_convert_says_why_it_is_unpaired():
    norm = CrossIterationBatchNorm2d(4, window=3)
    with pytest.raises(ValueError, match=r"not materialized yet .*run one forward pass first"):
        norm.bind_producer(nn.LazyConv2d(4, 3, padding=1))
    model = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.warns(RuntimeWarning, match="lazy module '0'.*run one forward pass first"):
        smallbn.convert(model, "cbn", window=3)


# -- gradcheck of the autograd Functions ---------------------------------------------------------
#
# Both Functions take x's own moments as given (computed without gradient) and put the
# gradient through them into x's: as a function of x alone (moments recomputed from x, stored
# window entries constant), their backward must be the exact derivative.


def _gradcheck_inputs(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.4).requires_grad_()
    c = shape[1]
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()
    return x, weight, bias


def _past_entries(entries: tuple[int, ...], c: int, seed: int) -> tuple[Tensor, Tensor]:
    """Stored (compensated) entries, some variances negative (the max and drop rules differ)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(*entries, c, generator=gen, dtype=torch.float64)
    var = torch.rand(*entries, c, generator=gen, dtype=torch.float64) * 2.0 - 0.4
    return mean, var


ROW_SHAPES = [(1, 3, 4), (2, 3), (3, 2, 4, 3), (2, 2, 3, 2, 2)]


@pytest.mark.parametrize("drop", [False, True], ids=["max", "drop"])
@pytest.mark.parametrize("inside", [True, False], ids=["eps-inside", "eps-outside"])
@pytest.mark.parametrize("past", [0, 3, "masked"])
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_window_norm_gradcheck(
    shape: tuple[int, ...], past: int | str, inside: bool, drop: bool
) -> None:
    from smallbn.layers._cross_iteration_functions import WindowNorm

    # "masked": three entries, the middle one masked out (the compiled step's form).
    masked = past == "masked"
    entries = 3 if masked else int(past)
    valid = torch.tensor([True, False, True]) if masked else None
    x, weight, bias = _gradcheck_inputs(shape, seed=len(shape) + entries)
    past_mean, past_var = _past_entries((entries,), shape[1], seed=5)
    dims = [0, *range(2, len(shape))]

    def run(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        moments = x.detach()  # given without gradient: the backward accounts for them
        mean, var = moments.mean(dims), moments.var(dims, unbiased=False)
        return WindowNorm.apply(
            x, mean, var, weight, bias, past_mean, past_var, valid, 1e-3, inside, drop
        )

    assert torch.autograd.gradcheck(run, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x: run(x, None, None), (x,))


@pytest.mark.parametrize("drop", [False, True], ids=["max", "drop"])
def test_masked_pool_equals_the_pool_of_the_valid_entries(drop: bool) -> None:
    """The compiled step pools every slot with a mask: the same window as the eager step's
    gather of the valid slots alone (an all-false mask: the current batch alone, BN)."""
    from smallbn.layers._cross_iteration_functions import pool

    mean, var = _past_entries((), 5, seed=1)
    var = var.abs()  # the current batch's own variance is >= 0
    past_mean, past_var = _past_entries((4,), 5, seed=2)
    for mask in ([True, False, True, True], [False] * 4, [True] * 4):
        valid = torch.tensor(mask)
        masked = pool(mean, var, past_mean, past_var, drop, valid)
        chosen = pool(mean, var, past_mean[valid], past_var[valid], drop)
        for got, want in zip(masked, chosen, strict=True):
            torch.testing.assert_close(got, want.expand_as(got), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("drop", [False, True], ids=["max", "drop"])
@pytest.mark.parametrize("inside", [True, False], ids=["eps-inside", "eps-outside"])
@pytest.mark.parametrize(
    ("sizes", "spatial"),
    # (N, C) rows only with groups of >= 2 samples: one value per channel is rejected earlier
    [
        ((2, 2, 1), (3,)),
        ((2, 2, 1), (2, 3)),
        ((1, 3), (3,)),
        ((1, 3), (2, 3)),
        ((2, 3), ()),
        ((2,), ()),
        ((2,), (3,)),
    ],
    ids=str,
)
def test_grouped_window_norm_gradcheck(
    sizes: tuple[int, ...], spatial: tuple[int, ...], inside: bool, drop: bool
) -> None:
    """Groups of unequal sizes (a group of one sample included, where it has spatial
    values), some entries of each group's window invalid."""
    from smallbn.layers._cross_iteration_functions import GroupedWindowNorm

    num, c = len(sizes), 2
    x, weight, bias = _gradcheck_inputs((sum(sizes), c, *spatial), seed=sum(sizes))
    index = torch.repeat_interleave(torch.arange(num), torch.tensor(sizes))
    per_sample = math.prod(spatial)
    count = torch.tensor([s * per_sample for s in sizes], dtype=torch.float64)
    past_mean, past_var = _past_entries((num, 3), c, seed=9)
    valid = torch.tensor([[True, True, False], [True, False, False], [False] * 3])[:num]

    def run(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        rows = x.detach().reshape(x.shape[0], c, -1)
        total = torch.zeros(num, c, dtype=x.dtype).index_add_(0, index, rows.sum(-1))
        mean = total / count.unsqueeze(1)
        spread = (rows - mean[index].unsqueeze(-1)).square().sum(-1)
        var = torch.zeros(num, c, dtype=x.dtype).index_add_(0, index, spread) / count.unsqueeze(1)
        return GroupedWindowNorm.apply(
            x, mean, var, count, index, weight, bias, past_mean, past_var, valid, 1e-3,
            inside, drop,
        )  # fmt: skip

    assert torch.autograd.gradcheck(run, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x: run(x, None, None), (x,))


class _Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame's behaviour, written out: TF 'SAME' padding computed in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        dims = zip(x.shape[:-3:-1], self.stride[::-1], self.kernel_size[::-1], strict=True)
        for size, stride, kernel in dims:  # width, then height: F.pad's order
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        x = torch.nn.functional.pad(x, pads)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation)


def test_conv_subclasses_with_their_own_forward_are_refused_at_bind_time():
    # Bound to timm's Conv2dSame, CBN crashed at its first training step with a oneDNN error
    # that named nothing.
    layer = CrossIterationBatchNorm2d(4, window=2)
    layer.model_path = "blocks.0.bn1"
    with pytest.raises(ValueError, match=r"at 'blocks.0.bn1': bind_producer got a _Conv2dSame"):
        layer.bind_producer(_Conv2dSame(3, 4, 3, stride=2))
    # convert pairs only exact conv types: the layer is left unpaired, with the reason
    model = nn.Sequential(_Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4))
    with pytest.warns(RuntimeWarning, match="naive cross-iteration"):
        converted, report = smallbn.convert_with_report(model, "cbn", window=2)
    assert report.producers == {"1": None}
    for _ in range(3):
        converted.train()(torch.randn(2, 3, 9, 9)).sum().backward()
