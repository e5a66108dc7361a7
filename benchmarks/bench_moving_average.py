"""Training-step time of a 3×3 convolution followed by Moving Average Batch Normalization,
against the same convolution followed by ``torch.nn.BatchNorm2d``.

MABN (Yan et al., ICLR 2020) replaces BN's batch statistics by moving averages in forward and
backward; its cost over BN should be a few small ``(groups, C)`` operations per step, so a
conv + MABN step should stay within 1.2× of conv + BN.  Timed per shape (default: ResNet-like
``N=2, C=64, 56×56`` and ``N=2, C=256, 14×14``, the small-batch regime MABN is for):

* ``conv+bn``: ``Conv2d(C, C, 3, padding=1, bias=False)`` + ``nn.BatchNorm2d``;
* ``conv+mabn``: the same conv + ``MovingAverageBatchNorm2d`` past warm-up and clamp start
  (every path of the layer active);
* ``cconv+mabn``: the full MABN recipe, a weight-centred conv + MABN;
* ``conv+mabn(b=1)``: simulated normalization batches of 1 sample (two SMA steps per call);
* ``bn``, ``mabn`` alone: the norm layer's own forward + backward (no conv).

One step is forward, then backward of ``Σ y·g`` with a fixed upstream ``g`` (gradients set
to ``None`` before each step, as ``optimizer.zero_grad()`` does).  Every variant is warmed
up, then the variants are interleaved within each repeat in an order that rotates from repeat
to repeat, so that drift and other processes on the machine affect all alike.  Reported: the
median, interquartile range and minimum per variant, and the ratios to ``conv+bn`` / ``bn``
as the median of the per-repeat ratios (paired within a repeat, robust to load changes between
repeats) and as the ratio of the minima (the least disturbed steps: on a machine shared with
other jobs, where 2 threads are often descheduled for whole time slices, the minimum is the
closest to the unloaded cost).

    python benchmarks/bench_moving_average.py --threads 2 --repeats 200
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from smallbn.bench import time_steps
from smallbn.bench.harness import quartiles
from smallbn.bench.report import write_json
from smallbn.layers.centered_conv import CenteredConv2d
from smallbn.layers.moving_average import MovingAverageBatchNorm2d

SHAPES = ((2, 64, 56, 56), (2, 256, 14, 14))
# Paired ratios reported: (variant, baseline).
RATIOS = (
    ("conv+mabn", "conv+bn"),
    ("cconv+mabn", "conv+bn"),
    ("conv+mabn(b=1)", "conv+bn"),
    ("mabn", "bn"),
)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per variant")
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="N,C,H,W",
        help="input shape (repeatable; default: 2,64,56,56 and 2,256,14,14)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args(argv)


def _mabn(channels: int, norm_batch_size: int | None = None) -> MovingAverageBatchNorm2d:
    # warm-up and clamp start at 0: the timed steps use the SMAs and the clamped r, as every
    # step after the first few hundred of a real run does.
    return MovingAverageBatchNorm2d(
        channels, warmup=0, clamp_start=0, norm_batch_size=norm_batch_size
    )


def _variants(channels: int) -> dict[str, nn.Module]:
    def conv() -> nn.Conv2d:
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    return {
        "conv+bn": nn.Sequential(conv(), nn.BatchNorm2d(channels)),
        "conv+mabn": nn.Sequential(conv(), _mabn(channels)),
        "cconv+mabn": nn.Sequential(
            CenteredConv2d(channels, channels, 3, padding=1, bias=False), _mabn(channels)
        ),
        "conv+mabn(b=1)": nn.Sequential(conv(), _mabn(channels, norm_batch_size=1)),
        "bn": nn.BatchNorm2d(channels),
        "mabn": _mabn(channels),
    }


def _step(model: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        model(x).backward(grad)

    return run


def _bench_shape(
    shape: tuple[int, ...], repeats: int, warmup: int, seed: int
) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape)
    grad = torch.randn(shape)
    steps: dict[str, Callable[[], None]] = {}
    for name, model in _variants(c).items():
        model.train()
        # the norm-only variants get a leaf input that needs a gradient, as after a conv
        inp = x.clone().requires_grad_(True) if name in ("bn", "mabn") else x
        steps[name] = _step(model, inp, grad)
    timings = time_steps(steps, baseline="conv+bn", repeats=repeats, warmup=warmup)
    return {t.name: list(t.seconds) for t in timings}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, {args.repeats} repeats (after {args.warmup} warm-up), "
        f"load average before: {load}"
    )
    results: dict[str, object] = {"threads": args.threads, "repeats": args.repeats, "load": load}
    shapes = SHAPES if not args.shape else [tuple(int(v) for v in s.split(",")) for s in args.shape]
    for shape in shapes:
        times = _bench_shape(shape, args.repeats, args.warmup, args.seed)
        label = "N={},C={},{}x{}".format(*shape)
        print(f"\n{label}: forward + backward per step, ms: median [q1, q3], min")
        row: dict[str, object] = {}
        for name, values in times.items():
            q1, median, q3 = quartiles(values)
            low = min(values)
            print(
                f"  {name:<16} {1e3 * median:8.3f}  [{1e3 * q1:.3f}, {1e3 * q3:.3f}]  "
                f"{1e3 * low:8.3f}"
            )
            row[name] = {
                "median_ms": 1e3 * median,
                "q1_ms": 1e3 * q1,
                "q3_ms": 1e3 * q3,
                "min_ms": 1e3 * low,
            }
        print("  ratios: paired median [q1, q3], ratio of minima")
        for variant, base in RATIOS:
            paired = [a / b for a, b in zip(times[variant], times[base], strict=True)]
            q1, median, q3 = quartiles(paired)
            of_minima = min(times[variant]) / min(times[base])
            print(
                f"  {variant + ' / ' + base:<28} {median:.3f}  [{q1:.3f}, {q3:.3f}]  "
                f"{of_minima:.3f}"
            )
            row[f"{variant} / {base}"] = {
                "median": median,
                "q1": q1,
                "q3": q3,
                "of_minima": of_minima,
            }
        results[label] = row
    results["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average after: {results['load_after']}")
    if args.output is not None:
        write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
