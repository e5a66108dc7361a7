"""The timing harness: interleaved, paired measurements of training steps and eval forwards.

Variants are interleaved (each repeat runs every variant once, in an order that rotates), so
drift in machine load affects all of them alike; ratios are taken per repeat against the
baseline and summarized by their median.  Thread count and seed are fixed and recorded
(:class:`Settings`, :func:`environment`).  On CUDA the device is synchronized before and
after every timed call, so a time is the work of that call, not of the queue before it.

A *training step* is the forward pass, then the backward pass of ``Σ y·g`` with a fixed
upstream gradient ``g``, with the input requiring a gradient (an interior layer) and the
parameters' gradients set to ``None`` before each step (no optimizer).  An *eval forward* is
one forward pass in eval mode under ``torch.no_grad``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from smallbn.layers import set_finite_check

__all__ = [
    "Settings",
    "Timing",
    "conv_block",
    "cpu_model",
    "environment",
    "eval_forward",
    "fixed_threads",
    "load_average",
    "quartiles",
    "synchronizer",
    "time_eval_forwards",
    "time_steps",
    "time_training_steps",
    "training_step",
]


@dataclass(frozen=True)
class Timing:
    """Per-variant call times (seconds, one per repeat, in repeat order) and the median of
    per-repeat ratios to the baseline (``time / baseline time``: above 1 is slower)."""

    name: str
    seconds: tuple[float, ...]
    ratio: float

    @property
    def median_ms(self) -> float:
        """Median call time in milliseconds."""
        return 1000 * statistics.median(self.seconds)

    @property
    def min_ms(self) -> float:
        """Fastest call in milliseconds (the least disturbed on a shared machine)."""
        return 1000 * min(self.seconds)

    def paired_ratios(self, baseline: Timing) -> list[float]:
        """This variant's time over ``baseline``'s, repeat by repeat (same run)."""
        return [t / b for t, b in zip(self.seconds, baseline.seconds, strict=True)]


@dataclass(frozen=True)
class Settings:
    """What a measurement depends on besides the code: recorded with every result.

    Attributes:
        repeats: timed calls per variant.
        warmup: untimed calls per variant before timing (windows fill, allocators settle).
        threads: ``torch.set_num_threads`` during the measurement.
        seed: ``torch.manual_seed`` before the models and inputs are built.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        finite_check: smallbn's NaN/Inf check of batch statistics in its ``"auto"`` mode
            (:func:`smallbn.set_finite_check`: every step on CPU, deferred on CUDA), or off.
    """

    repeats: int = 50
    warmup: int = 5
    threads: int = 2
    seed: int = 0
    device: str = "cpu"
    finite_check: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError(
                f"need repeats >= 1, warmup >= 0 and threads >= 1, got repeats={self.repeats}, "
                f"warmup={self.warmup}, threads={self.threads}"
            )
        device = torch.device(self.device)  # a malformed name raises here
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device '{self.device}' requested but CUDA is not available to this torch "
                f"({torch.__version__})"
            )

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def record(self) -> dict[str, object]:
        """The settings and the environment, as JSON-ready values."""
        return {**asdict(self), **environment(self.torch_device)}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Thread count and finite check as set here inside the block, restored after."""
        previous = set_finite_check(self.finite_check)
        try:
            with fixed_threads(self.threads):
                yield
        finally:
            set_finite_check(previous)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``values`` (inclusive method: a single value is all three)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :mod:`platform`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, object]:
    """Versions and hardware a timing depends on (recorded beside the settings)."""
    device = torch.device(device)
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "gpu": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (other processes competing for the CPU)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        target = torch.device(device)
        return lambda: torch.cuda.synchronize(target)
    return lambda: None


def conv_block(norm: nn.Module, channels: int) -> nn.Module:
    """``Conv2d(C, C, 3, padding=1, bias=False)`` followed by ``norm``."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm)


def training_step(model: nn.Module, x: Tensor, grad: Tensor | None = None) -> Callable[[], None]:
    """One training step of ``model`` (train mode) on ``x``: forward, backward of ``Σ y·g``
    with ``g = grad`` (drawn once from the first output when ``None``), the input requiring
    a gradient; parameter gradients are set to ``None`` before each step."""
    model.train()
    inp = x.detach().requires_grad_(True)
    params = list(model.parameters())
    upstream: list[Tensor] = [] if grad is None else [grad]

    def run() -> None:
        for p in params:
            p.grad = None
        inp.grad = None
        y = model(inp)
        if not upstream:
            upstream.append(torch.randn_like(y))
        y.backward(upstream[0])

    return run


def eval_forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """One forward pass of ``model`` in eval mode under ``torch.no_grad``."""
    model.eval()
    inp = x.detach()

    def run() -> None:
        with torch.no_grad():
            model(inp)

    return run


def time_steps(
    steps: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    repeats: int = 50,
    warmup: int = 5,
    device: torch.device | str | None = None,
) -> list[Timing]:
    """Time each callable ``repeats`` times, interleaved with the others, after ``warmup``
    untimed calls each; the ratio of a variant is the median over repeats of its time over
    ``baseline``'s time in the same repeat.  ``device``: synchronize it around timed calls."""
    if baseline not in steps:
        raise KeyError(f"baseline '{baseline}' is not among the variants {list(steps)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = synchronizer(device)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        # rotate the order so no variant always runs right after the same other one
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    base = times[baseline]
    return [
        Timing(
            name,
            tuple(times[name]),
            statistics.median(t / b for t, b in zip(times[name], base, strict=True)),
        )
        for name in names
    ]


def _time_models(
    variants: Mapping[str, Callable[[], nn.Module]],
    shape: tuple[int, ...],
    make_step: Callable[[nn.Module, Tensor], Callable[[], None]],
    *,
    baseline: str,
    repeats: int,
    warmup: int,
    threads: int,
    seed: int,
    device: torch.device | str,
) -> list[Timing]:
    with fixed_threads(threads):
        torch.manual_seed(seed)
        x = torch.randn(shape, device=device)
        steps = {name: make_step(make().to(device), x) for name, make in variants.items()}
        return time_steps(steps, baseline=baseline, repeats=repeats, warmup=warmup, device=device)


def time_training_steps(
    variants: Mapping[str, Callable[[], nn.Module]],
    shape: tuple[int, ...],
    *,
    baseline: str,
    repeats: int = 50,
    warmup: int = 5,
    threads: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Timing]:
    """Median time of one training step (:func:`training_step`) of each variant on a
    ``shape`` input, and its ratio to ``baseline``."""
    return _time_models(
        variants,
        shape,
        training_step,
        baseline=baseline,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        seed=seed,
        device=device,
    )


def time_eval_forwards(
    variants: Mapping[str, Callable[[], nn.Module]],
    shape: tuple[int, ...],
    *,
    baseline: str,
    repeats: int = 50,
    warmup: int = 5,
    threads: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[Timing]:
    """Median time of one eval-mode forward (:func:`eval_forward`) of each variant on a
    ``shape`` input, and its ratio to ``baseline``."""
    return _time_models(
        variants,
        shape,
        eval_forward,
        baseline=baseline,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        seed=seed,
        device=device,
    )
