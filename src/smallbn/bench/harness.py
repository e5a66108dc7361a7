"""A small timing harness for conv+norm training steps.

Variants are interleaved (each repeat runs every variant once, in an order that rotates), so
drift in machine load affects all of them alike; ratios are taken per repeat against the
baseline and summarized by their median.  Thread count and seed are fixed and recorded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Timing", "conv_block", "time_training_steps"]


@dataclass(frozen=True)
class Timing:
    """Per-variant step times (seconds) and the median of per-repeat ratios to the baseline."""

    name: str
    seconds: tuple[float, ...]
    ratio: float

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)


def conv_block(norm: nn.Module, channels: int) -> nn.Module:
    """``Conv2d(C, C, 3, padding=1, bias=False)`` followed by ``norm``."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm)


def time_training_steps(
    variants: Mapping[str, Callable[[], nn.Module]],
    shape: tuple[int, ...],
    *,
    baseline: str,
    repeats: int = 50,
    warmup: int = 5,
    threads: int = 2,
    seed: int = 0,
) -> list[Timing]:
    """Median time of one training step (forward + backward, input requiring grad) of each
    variant on a ``shape`` input, and its ratio to ``baseline``."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x = torch.randn(shape, requires_grad=True)
    models = {name: make() for name, make in variants.items()}
    grads: dict[str, Tensor] = {}

    def step(name: str) -> float:
        model = models[name]
        start = time.perf_counter()
        y = model(x)
        if name not in grads:
            grads[name] = torch.randn_like(y)
        y.backward(grads[name])
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        x.grad = None
        return elapsed

    names = list(models)
    for _ in range(warmup):
        for name in names:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            times[name].append(step(name))
    base = times[baseline]
    return [
        Timing(
            name,
            tuple(times[name]),
            statistics.median(t / b for t, b in zip(times[name], base, strict=True)),
        )
        for name in names
    ]
