"""Every method and tool on every available device (CPU always, CUDA where present).

The rest of the suite checks each layer against float64 references written from docs/methods.md on
CPU.  Here the same layer runs on each device in float32 (and under autocast, and as a
half-precision model) and must give what it gives on CPU in float64: outputs, gradients and
running buffers, step after step.  On a GPU this runs the CUDA kernels of every method; the
CUDA-only tests check that a training step makes no device synchronization
(``torch.cuda.set_sync_debug_mode("error")``) and that synchronized layers work over NCCL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import smallbn

METHODS = smallbn.available_norms()

#: Options that make every method do all it does within a few steps.
OPTIONS: dict[str, dict[str, Any]] = {
    "cbn": {"window": 3, "burnin": 0},
    "mabn": {"window": 2, "warmup": 0},
    "ghostbn": {"group_size": 2},
    "brn": {"warmup_steps": 0},
}

pytestmark = pytest.mark.filterwarnings("ignore::smallbn.ConversionWarning")


def _block(method: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Tanh(),  # smooth: float32 and float64 agree on every branch (a ReLU kink may not)
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    return smallbn.convert(model, method, **OPTIONS.get(method, {}))


def _batches(steps: int, batch: int = 4) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 6, 6, generator=generator) * 2 + 0.5 for _ in range(steps)]


def _run(model: nn.Module, batches: list[Tensor], device: torch.device, dtype: torch.dtype):
    """Training steps (forward, backward, SGD), then an eval forward: what each produced."""
    model = model.to(device=device, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    record: list[Tensor] = []
    model.train()
    for x in batches:
        x = x.to(device=device, dtype=dtype).requires_grad_(True)
        optimizer.zero_grad()
        y = model(x)
        (
            y * torch.linspace(-1, 1, y.numel(), device=device, dtype=dtype).view_as(y)
        ).mean().backward()
        record += [y.detach(), x.grad]
        record += [p.grad for p in model.parameters() if p.grad is not None]
        optimizer.step()
    record += [b for b in model.buffers() if b.is_floating_point()]
    model.eval()
    with torch.no_grad():
        record.append(model(batches[0].to(device=device, dtype=dtype)))
    return [t.detach().to("cpu", torch.float64) for t in record]


def _close(actual: list[Tensor], expected: list[Tensor], rtol: float) -> None:
    """Each tensor within ``rtol`` of its expected values, relative to its largest one (a
    fixed atol would pass any pair of small gradients), or to 1e-3 for tensors that are zero
    up to rounding (the gradient of a conv bias that a norm's mean removes)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        atol = rtol * max(float(e.abs().max()), 1e-3)
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"item {i}: {m}")


@pytest.fixture(scope="module")
def float64_cpu() -> dict[str, list[Tensor]]:
    """Each method's steps on CPU in float64 (checked against references elsewhere)."""
    return {m: _run(_block(m), _batches(4), torch.device("cpu"), torch.float64) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_float32_on_each_device_equals_float64_on_cpu(
    method: str, device: torch.device, float64_cpu: dict[str, list[Tensor]]
) -> None:
    actual = _run(_block(method), _batches(4), device, torch.float32)
    _close(actual, float64_cpu[method], rtol=1e-4)


def _autocast_dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.bfloat16] if device.type == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("method", METHODS)
def test_autocast_training_is_close_to_float32(
    method: str, device: torch.device, float64_cpu: dict[str, list[Tensor]]
) -> None:
    for dtype in _autocast_dtypes(device):
        with torch.autocast(device.type, dtype=dtype):
            actual = _run(_block(method), _batches(4), device, torch.float32)
        for a in actual:
            assert torch.isfinite(a).all(), f"{dtype}: non-finite result"
        # the eval output of a model trained in reduced precision stays near the float64 one
        scale = float64_cpu[method][-1].abs().max()
        assert (actual[-1] - float64_cpu[method][-1]).abs().max() <= 0.1 * scale, dtype


@pytest.mark.parametrize("method", METHODS)
def test_a_half_precision_model_trains_finite_and_close(
    method: str, device: torch.device, float64_cpu: dict[str, list[Tensor]]
) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    actual = _run(_block(method), _batches(4), device, dtype)
    assert all(bool(torch.isfinite(a).all()) for a in actual)
    scale = float64_cpu[method][-1].abs().max()
    assert (actual[-1] - float64_cpu[method][-1]).abs().max() <= 0.1 * scale


def _tools(model: nn.Module, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """PreciseBN, batch-statistics eval and fold on ``device``: their outputs."""
    model = model.to(device=device, dtype=dtype)
    data = [x.to(device=device, dtype=dtype) for x in _batches(3, batch=4)]
    x = data[0]
    model.train()
    for batch in data:
        model(batch)
    smallbn.precise_bn(model, data, num_samples=12)
    model.eval()
    with torch.no_grad():
        precise = model(x)
        with smallbn.batch_stats_eval(model):
            batch_stats = model(x)
        folded = smallbn.fold(model)(x)
    return [t.to("cpu", torch.float64) for t in (precise, batch_stats, folded)]


@pytest.mark.parametrize("method", METHODS)
def test_tools_on_each_device_equal_float64_on_cpu(method: str, device: torch.device) -> None:
    expected = _tools(_block(method), torch.device("cpu"), torch.float64)
    actual = _tools(_block(method), device, torch.float32)
    _close(actual, expected, rtol=1e-4)


# -- CUDA only ---------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("method", METHODS)
def test_a_cuda_training_step_makes_no_device_synchronization(method: str) -> None:
    model = _block(method).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for _ in range(3):  # warm-up: lazy state, windows, cuDNN plans
        model(x).square().mean().backward()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).square().mean().backward()
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()  # (train() itself may read the deferred flag: outside the step)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _nccl_body(rank: int, world: int) -> dict[str, Tensor]:
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    layer = smallbn.SyncBatchNorm2d(4).to(device)
    x = torch.randn(world * 2, 4, 5, 5).to(device)[rank * 2 : rank * 2 + 2].requires_grad_(True)
    y = layer(x)
    (y * torch.arange(y.numel(), device=device).view_as(y)).sum().backward()
    return {"y": y.detach().cpu(), "grad": x.grad.cpu(), "mean": layer.running_mean.cpu()}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_sync_over_nccl_equals_one_process(tmp_path: Path) -> None:
    from _spawn import run_world

    results = run_world(_nccl_body, 2, tmp_path, backend="nccl")
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(4).cuda()
    x = torch.randn(4, 4, 5, 5).cuda().requires_grad_(True)
    y = layer(x)
    (y * torch.cat([torch.arange(y[:2].numel())] * 2).cuda().view_as(y)).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach().cpu())
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), x.grad.cpu())
    torch.testing.assert_close(results[0]["mean"], layer.running_mean.cpu())
