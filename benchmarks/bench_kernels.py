"""The CPU kernel choices behind smallbn's hot paths, each timed against its alternative in the
same run (interleaved, median of per-repeat ratios; :func:`smallbn.bench.time_steps`):

* ``affine``: ``scale_shift`` (product, then in-place sum; used by every normalization) against
  torch's out-of-place ``addcmul`` with broadcast coefficients, per sample and per channel.
* ``grad_sums``: :func:`smallbn.stats.sample_grad_sums` (per-sample Σg(x−μ), Σg) on contiguous
  inputs (one BN-backward kernel pass), on channels-last inputs (Σgx − μΣg), and on
  channels-last inputs copied to contiguous first (what grouped CBN used to do).
* ``weight_grad``: the conv weight-gradient CBN's second-moment derivative costs, at the
  benchmark shapes: torch's ``convolution_backward`` in NCHW (what CBN uses) against
  channels-last, an explicit im2col (``unfold``) and batched matmul, and the same sum written
  as a forward convolution of the padded input by the output (batch and channel dims swapped).
* ``resnet``: the comparison job's SmallResNet (BN, batch 32 training step; 500-image eval
  forward), contiguous against channels-last, with the job's one thread per run.

    python benchmarks/bench_kernels.py --output results/bench_kernels.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from smallbn.bench import time_steps
from smallbn.bench.harness import environment, fixed_threads
from smallbn.bench.report import write_json
from smallbn.experiments.models import SmallResNet
from smallbn.stats import sample_grad_sums, scale_shift

CL = torch.channels_last


def _affine(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    x = torch.randn(shape)
    per_sample = torch.randn(shape[0], shape[1], 1, 1), torch.randn(shape[0], shape[1], 1, 1)
    per_channel = torch.randn(1, shape[1], 1, 1), torch.randn(1, shape[1], 1, 1)
    return {
        "scale_shift per-sample": lambda: scale_shift(x, *per_sample),
        "addcmul per-sample": lambda: torch.addcmul(per_sample[1], x, per_sample[0]),
        "scale_shift per-channel": lambda: scale_shift(x, *per_channel),
        "addcmul per-channel": lambda: torch.addcmul(per_channel[1], x, per_channel[0]),
    }


def _grad_sums(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    x, g, mean = torch.randn(shape), torch.randn(shape), torch.randn(shape[:2])
    xc, gc = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    return {
        "contiguous": lambda: sample_grad_sums(g, x, mean),
        "channels-last": lambda: sample_grad_sums(gc, xc, mean),
        "channels-last copied": lambda: sample_grad_sums(gc.contiguous(), xc.contiguous(), mean),
    }


def _weight_grad(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    channels = shape[1]
    u, weight = torch.randn(shape), torch.randn(channels, channels, 3, 3)
    y = F.conv2d(u, weight, padding=1)
    layouts = {"NCHW": (u, y, weight)}
    layouts["channels-last"] = tuple(t.contiguous(memory_format=CL) for t in (u, y, weight))

    def grad(inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        u, y, w = inputs
        return lambda: torch.ops.aten.convolution_backward.default(
            y, u, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
        )

    steps = {name: grad(inputs) for name, inputs in layouts.items()}
    n = shape[0]
    steps["unfold+bmm"] = lambda: torch.bmm(
        y.reshape(n, channels, -1), F.unfold(u, 3, padding=1).transpose(1, 2)
    ).sum(0)
    padded = F.pad(u, (1, 1, 1, 1))
    steps["as forward conv"] = lambda: F.conv2d(
        padded.transpose(0, 1), y.transpose(0, 1)
    ).transpose(0, 1)
    return steps


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _eval_forward(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], object]:
    model.eval()
    return lambda: torch.no_grad()(model)(images)


def _resnet(train: bool) -> dict[str, Callable[[], object]]:
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    images = torch.randn(500, 1, 28, 28)
    steps: dict[str, Callable[[], object]] = {}
    for name, layout in (("contiguous", torch.contiguous_format), ("channels-last", CL)):
        torch.manual_seed(0)
        model = SmallResNet(10, 1, (16, 32, 64), 1, norm="bn").to(memory_format=layout)
        steps[name] = _train_step(model, x, y) if train else _eval_forward(model, images)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="for all but resnet (1 thread)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    cases = [
        ("affine 2x64x56x56", args.threads, _affine((2, 64, 56, 56)), "addcmul per-sample"),
        ("grad_sums 32x16x28x28", args.threads, _grad_sums((32, 16, 28, 28)), "contiguous"),
        ("weight_grad 2x64x56x56", args.threads, _weight_grad((2, 64, 56, 56)), "NCHW"),
        ("weight_grad 2x256x14x14", args.threads, _weight_grad((2, 256, 14, 14)), "NCHW"),
        ("resnet train batch 32", 1, _resnet(train=True), "contiguous"),
        ("resnet eval 500 images", 1, _resnet(train=False), "contiguous"),
    ]
    results: dict[str, list[dict[str, object]]] = {}
    for case, threads, steps, baseline in cases:
        with fixed_threads(threads):
            timings = time_steps(steps, baseline=baseline, repeats=args.repeats, warmup=args.warmup)
        print(f"{case} ({threads} thread(s); ×{baseline})")
        for t in timings:
            print(f"  {t.name:24s} {t.median_ms:8.3f} ms  ×{t.ratio:.2f}")
        results[case] = [
            {"variant": t.name, "median_ms": t.median_ms, "ratio": t.ratio} for t in timings
        ]
    if args.output is not None:
        write_json(args.output, {"environment": environment(), "results": results})


if __name__ == "__main__":
    main()
