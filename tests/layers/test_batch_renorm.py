"""Batch Renormalization: BN where it reduces to BN (r_max=1, d_max=0; the warm-up steps),
the float64 reference (tests/reference.py) with the r/d clipping active, the ramp of the
bounds, BN state and error messages."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from torch import nn

import smallbn
from _layer_checks import (
    BN_STATE_KEYS,
    SHAPES,
    TORCH_BN,
    cases,
    check_step,
    close,
    lockstep_vs_torch_bn,
    make_input,
    randomize_affine,
    run_case,
    shape_id,
    upstream,
)
from reference import RefBatchRenorm, limit_schedule
from smallbn import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

BRN = {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}
SHORT = dict(r_max=3.0, d_max=5.0, warmup_steps=2, r_max_ramp_end=6, d_max_ramp_end=4)


def renorm_input(shape: tuple[int, ...], step: int, seed: int = 0) -> torch.Tensor:
    """Batches whose statistics jump around (mean drifting up, spread alternating between
    small and large) so that r and d leave their bounds once the bounds are relaxed."""
    return make_input(shape, seed + step, loc=1.5 * step, scale=4.0 if step % 2 else 0.25)


@pytest.mark.parametrize("momentum", [0.01, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_r_max_1_d_max_0_is_batchnorm(shape, momentum):
    layer = BRN[len(shape)](
        shape[1],
        momentum=momentum,
        r_max=1.0,
        d_max=0.0,
        warmup_steps=0,
        r_max_ramp_end=1,
        d_max_ramp_end=1,
        dtype=torch.float64,
    )
    lockstep_vs_torch_bn(layer, shape, steps=4, momentum=momentum)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_warm_up_steps_are_batchnorm_then_it_departs(shape):
    """r_max = 1 and d_max = 0 up to step ``warmup_steps``: BN on data that would clip."""
    layer = BRN[len(shape)](shape[1], momentum=0.1, dtype=torch.float64, **SHORT)
    bn = TORCH_BN[len(shape)](shape[1], momentum=0.1, dtype=torch.float64)
    randomize_affine(layer, 3)
    bn.load_state_dict(layer.state_dict())
    gen = torch.Generator().manual_seed(5)
    params = [("weight", layer.weight, bn.weight), ("bias", layer.bias, bn.bias)]
    for step in range(SHORT["warmup_steps"] + 1):  # steps 0, 1, 2: ramps start at 0
        x, g = renorm_input(shape, step), upstream(shape, gen)
        check_step(layer, bn, x, g, 1e-6, params)
        close(layer.running_mean, bn.running_mean, 1e-6, "running_mean")
        close(layer.running_var, bn.running_var, 1e-6, "running_var")
    # past warm-up the bounds open and, on this data, the output is no longer BN's
    x = renorm_input(shape, SHORT["warmup_steps"] + 1)
    assert not torch.allclose(layer(x), bn(x), atol=1e-3)


def test_limits_follow_the_schedule():
    layer = BatchRenorm2d(3, **SHORT)
    for step in range(12):
        r_max, d_max = layer.current_limits(step)
        expected = limit_schedule(step, *SHORT.values())
        assert float(r_max) == pytest.approx(expected[0])
        assert float(d_max) == pytest.approx(expected[1])
    assert float(layer.current_limits()[0]) == 1.0  # the next step of a fresh layer
    paper = BatchRenorm2d(3)  # paper defaults: 5k warm-up, r_max 3 by 40k, d_max 5 by 25k
    assert [float(v) for v in paper.current_limits(5000)] == [1.0, 0.0]
    assert float(paper.current_limits(15000)[1]) == pytest.approx(2.5)
    assert [float(v) for v in paper.current_limits(40000)] == [3.0, 5.0]


def train_against_reference(layer, ref, shape, steps, seed=0):
    """Lockstep training in float64; returns every step's (r, d, r_max, d_max) from the
    reference, so callers can check the clipping was active."""
    gen = torch.Generator().manual_seed(seed)
    params = [("weight", layer.weight, ref.weight), ("bias", layer.bias, ref.bias)]
    record = []
    for step in range(steps):
        x, g = renorm_input(shape, step, seed), upstream(shape, gen)
        check_step(layer, ref.train_step, x, g, 1e-6, params)
        record.append((ref.last_r, ref.last_d, *ref.last_limits))
        close(layer.running_mean, ref.running_mean, 1e-6, f"running_mean after step {step}")
        close(layer.running_var, ref.running_var, 1e-6, f"running_var after step {step}")
        assert int(layer.num_batches_tracked) == step + 1
    layer.eval()
    x, g = make_input(shape, seed + 50, loc=3.0), upstream(shape, gen)
    check_step(layer, ref.eval, x, g, 1e-6, params)
    return record


def assert_clipping_was_active(record):
    r_hit = d_hit = r_inside = False
    for r, d, r_max, d_max in record:
        if r_max > 1:
            r_hit |= bool(
                torch.isclose(r, torch.tensor(r_max, dtype=r.dtype)).any()
                | torch.isclose(r, torch.tensor(1 / r_max, dtype=r.dtype)).any()
            )
            r_inside |= bool(((r < r_max - 1e-6) & (r > 1 / r_max + 1e-6) & (r != 1)).any())
        if d_max > 0:
            d_hit |= bool(torch.isclose(d.abs(), torch.tensor(d_max, dtype=d.dtype)).any())
    assert r_hit and d_hit and r_inside, (r_hit, d_hit, r_inside)


@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference_with_clipping_active(shape, momentum):
    layer = BRN[len(shape)](shape[1], momentum=momentum, dtype=torch.float64, **SHORT)
    weight, bias = randomize_affine(layer, 1)
    ref = RefBatchRenorm(shape[1], momentum=momentum, weight=weight, bias=bias, **SHORT)
    record = train_against_reference(layer, ref, shape, steps=8)
    assert [rec[2:] for rec in record][3] == (1.5, 2.5)  # mid-ramp
    assert_clipping_was_active(record)


def test_matches_reference_without_affine():
    shape = (6, 3, 4)
    layer = BatchRenorm1d(3, affine=False, momentum=0.1, dtype=torch.float64, **SHORT)
    ref = RefBatchRenorm(3, affine=False, momentum=0.1, **SHORT)
    assert_clipping_was_active(train_against_reference(layer, ref, shape, steps=8))


def test_without_running_stats_it_is_batchnorm_without_running_stats():
    layer = BatchRenorm2d(3, track_running_stats=False, dtype=torch.float64, **SHORT)
    lockstep_vs_torch_bn(layer, (3, 3, 4, 4), steps=6, track_running_stats=False)


@given(cases())
def test_matches_reference_over_shapes_and_dtypes(case):
    schedule = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_ramp_end=2, d_max_ramp_end=1)
    layer = BatchRenorm(case.shape[1], momentum=0.3, dtype=case.param_dtype, **schedule)
    weight, bias = randomize_affine(layer, case.seed)
    ref = RefBatchRenorm(case.shape[1], momentum=0.3, weight=weight, bias=bias, **schedule)
    run_case(layer, ref, case, steps=3)


def test_rejected_batch_does_not_advance_the_schedule():
    layer = BatchRenorm2d(2, momentum=0.1, dtype=torch.float64, **SHORT)
    weight, bias = randomize_affine(layer, 2)
    ref = RefBatchRenorm(2, momentum=0.1, weight=weight, bias=bias, **SHORT)
    shape = (2, 2, 3, 3)
    for step in range(6):
        if step == 3:
            bad = renorm_input(shape, step)
            bad[0, 1, 0, 0] = float("nan")
            with pytest.raises(FloatingPointError):
                layer(bad)
        x = renorm_input(shape, step)
        close(layer(x), ref.train_step(x), 1e-6, f"output at step {step}")
    assert int(layer.num_batches_tracked) == 6


def test_state_dict_is_batchnorms():
    layer = BatchRenorm2d(4)
    assert list(layer.state_dict().keys()) == BN_STATE_KEYS
    bn = nn.BatchNorm2d(4)
    bn.num_batches_tracked.fill_(7)
    layer.load_state_dict(bn.state_dict())
    assert int(layer.num_batches_tracked) == 7  # the schedule resumes from the checkpoint
    nn.BatchNorm2d(4).load_state_dict(layer.state_dict())


# -- bad input ----------------------------------------------------------------------------------


def test_rejects_wrong_rank():
    with pytest.raises(
        ValueError,
        match=r"BatchRenorm2d\(4\): expected a \(N, C, H, W\) input, got a 3D tensor.*Use "
        r"BatchRenorm1d for \(N, C\) or \(N, C, L\)",
    ):
        BatchRenorm2d(4)(torch.randn(2, 4, 5))
    with pytest.raises(
        ValueError,
        match=r"BatchRenorm1d\(4\): expected a \(N, C\) or \(N, C, L\) input, got a 4D "
        r"tensor.*BatchRenorm2d for",
    ):
        BatchRenorm1d(4)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"BatchRenorm3d\(4\): expected a \(N, C, D, H, W\) input"):
        BatchRenorm3d(4)(torch.randn(2, 4, 5, 5))


def test_rejects_wrong_channel_count():
    with pytest.raises(
        ValueError,
        match=r"BatchRenorm2d\(4\): expected 4 channels in dim 1, got 6.*num_features=6",
    ):
        BatchRenorm2d(4)(torch.randn(2, 6, 3, 3))


def test_rejects_a_single_value_per_channel_in_training():
    with pytest.raises(
        ValueError,
        match=r"BatchRenorm1d\(4\): training needs more than one value per channel.*\(1, "
        r"4\).*larger batch",
    ):
        BatchRenorm1d(4)(torch.randn(1, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=str)
def test_rejects_non_finite_input_in_training(bad):
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 1, 1] = bad
    with pytest.raises(
        FloatingPointError,
        match=r"BatchRenorm2d\(3\): batch statistics are NaN or Inf in channel\(s\) \[0\].*lower "
        r"learning rate",
    ):
        BatchRenorm2d(3)(x)


def test_rejects_incompatible_checkpoint():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchRenorm2d(8))
    source = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(16)).state_dict()
    with pytest.raises(
        RuntimeError,
        match=r"BatchRenorm2d\(8\): incompatible checkpoint .*size mismatch for "
        r"1.weight.*num_features",
    ):
        model.load_state_dict(source)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r_max=0.5), r"BatchRenorm2d: need finite r_max >= 1 and d_max >= 0, got r_max=0.5"),
        (
            dict(d_max=-1.0),
            r"BatchRenorm2d: need finite r_max >= 1 and d_max >= 0, .*d_max=-1.0 "
            r"\(r_max=1, d_max=0 is plain BN",
        ),
        (dict(r_max=math.inf), r"need finite r_max .*large finite limits"),
        (dict(d_max=math.inf), r"need finite r_max .*large finite limits"),
        (dict(r_max=math.nan), r"need finite r_max"),
        (dict(norm_batch_size=0), r"BatchRenorm2d: norm_batch_size must be >= 1 or None, got 0"),
        (dict(momentum=1.01), r"BatchRenorm2d: momentum .* must lie in \[0, 1\]"),
    ],
)
def test_rejects_bad_constructor_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(4, **kwargs)


@pytest.mark.parametrize("options", [{}, {"norm_batch_size": 2}], ids=["batch", "groups"])
def test_compiled_training_matches_eager(options):
    # Under torch.compile the backward used to fail with "modified by an inplace operation":
    # the AOT partitioner recomputed r and d from the running statistics the step had
    # already updated.  aot_eager runs the same partitioner as inductor, without codegen.
    torch.manual_seed(0)
    eager = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        smallbn.BatchRenorm2d(4, warmup_steps=0, r_max_ramp_end=0, d_max_ramp_end=0, **options),
    )
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for step in range(3):
        x = torch.randn(4, 3, 6, 6) * (step + 1) + step
        for model in (eager, compiled):
            model(x).square().sum().backward()
        torch.testing.assert_close(compiled(x).detach(), eager(x).detach(), rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(
        eager.named_parameters(), compiled_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
