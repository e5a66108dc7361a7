"""Training-step cost of Cross-Iteration BN (Yao et al., CVPR 2021) against BN, and its state.

One step is the forward and backward pass (no optimizer) of a 3×3 convolution followed by
the norm, the block's input requiring a gradient (an interior layer).  Variants:

* ``bn``: ``nn.BatchNorm2d`` (torch's fused kernel);
* ``cbn``: :class:`CrossIterationBatchNorm2d` with k = 4, the conv bound as its producer:
  the current moments, three stored iterations compensated to the current weights, and this
  step's derivatives (one weight-gradient convolution, the mean patch, the window's inner
  products);
* ``cbn_naive``: the same without compensation (pooling only), to split the cost;
* ``floor``: BN's step plus one weight-gradient convolution after the backward pass;
* ``floor_fwd``: the same convolution where CBN computes it, in the forward pass between the
  conv and the norm (output gradient the conv's output, as CBN's), plus the one read of the
  window that compensation needs (the product of the current weights with the k stored
  derivatives, k × the conv weight): the work of the analytic method that no implementation
  can skip.

The paper reports 1.0 it/s for CBN against 1.3 for BN (Mask R-CNN, batch 4); the authors'
release, which gets the derivatives from two extra autograd passes per layer and step, was
measured on this machine at 2.9–3.5× BN's step.

Method: every variant is warmed up (the window fills), then each of ``--runs`` runs times
``--repeats`` steps of every variant, interleaved step by step in an order that rotates, so
that drift (thermal, other processes) affects all alike; reported is the median over runs of
the mean step time, and the ratio to BN ("paired": the median over all steps of the ratio
to the BN step next to it in time, robust to bursts of load on a shared machine).  The two
floors add to BN's step the weight-gradient convolution any analytic CBN needs; ``floor_fwd``
places it where this implementation takes it (the forward pass) and adds the window read,
so it is the floor this implementation can approach.  The state column is the CBN layer's
window buffers (BN's own state excluded) against the conv weight.

    python benchmarks/bench_cross_iteration.py --threads 2 --runs 5 --repeats 40
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from smallbn.bench import time_steps
from smallbn.bench.report import write_json
from smallbn.cli import _shapes as parse_shapes
from smallbn.layers.cross_iteration import CrossIterationBatchNorm2d

SHAPES = ((2, 64, 56, 56), (2, 256, 14, 14))  # (N, C, H, W)
WINDOW = 4


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--repeats", type=int, default=40, help="steps per variant and run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=SHAPES,
        help="comma-separated NxCxHxW inputs, as for `smallbn bench layers` (default: "
        "2x64x56x56,2x256x14x14; a tiny one such as 2x8x4x4 shows the per-step overhead)",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args(argv)


def _block(channels: int, norm: str, device: torch.device) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if norm == "bn":
        layer: nn.Module = nn.BatchNorm2d(channels)
    else:
        layer = CrossIterationBatchNorm2d(channels, window=WINDOW, compensate=norm == "cbn")
    block = nn.Sequential(conv, layer).to(device).train()
    if isinstance(layer, CrossIterationBatchNorm2d) and layer.compensate:
        layer.bind_producer(conv)
    return block


def _step(block: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        inp = x.detach().requires_grad_(True)
        block(inp).backward(grad)
        for p in block.parameters():
            p.grad = None

    return run


def _weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The 3×3, padding-1 conv's weight gradient for output gradient ``grad_out``: the one
    extra convolution CBN's second-moment derivative costs."""
    return torch.ops.aten.convolution_backward.default(
        grad_out, x, weight.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip


def _floor_step(block: nn.Sequential, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """BN's step, then the weight gradient of the conv for the output gradient ``grad``."""
    bn_step = _step(block, x, grad)
    weight = block[0].weight
    assert isinstance(weight, Tensor)

    def run() -> None:
        bn_step()
        _weight_grad(grad, x, weight)

    return run


def _floor_forward_step(block: nn.Sequential, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """BN's step with the weight gradient of the conv for output gradient ``conv(x)`` taken
    between the conv and the norm, where CBN takes it, and the product of the current weights
    with ``WINDOW`` stored derivatives of the conv weight's size (CBN's layout)."""
    conv, norm = block[0], block[1]
    weight = conv.weight
    assert isinstance(weight, Tensor)
    channels = weight.shape[0]
    window = torch.randn(channels, WINDOW, weight[0].numel(), device=x.device)

    def run() -> None:
        inp = x.detach().requires_grad_(True)
        out = conv(inp)
        _weight_grad(out.detach(), x, weight)
        torch.bmm(weight.detach().reshape(channels, 1, -1), window.transpose(1, 2))
        norm(out).backward(grad)
        for p in block.parameters():
            p.grad = None

    return run


def _state_bytes(layer: nn.Module) -> int:
    return sum(
        b.numel() * b.element_size()
        for name, b in layer.named_buffers()
        if name.startswith("window_") or name == "iteration"
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    results: list[dict[str, object]] = []
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, device {device}, k = {WINDOW}; median of {args.runs} runs "
        f"x {args.repeats} steps"
    )
    header = (
        f"{'N,C,HxW':>14} {'bn ms':>8} {'cbn ms':>8} {'naive ms':>9} {'cbn/bn':>7} "
        f"{'naive/bn':>8} {'floor/bn':>8} {'fl.fwd/bn':>9} {'paired':>7} {'state MB':>9} "
        f"{'conv W MB':>9} "
        f"{'state/W':>7}"
    )
    print(header)
    for n, c, h, w in args.shapes:
        x = torch.randn(n, c, h, w, device=device)
        grad = torch.randn(n, c, h, w, device=device)
        variants = {name: _block(c, name, device) for name in ("bn", "cbn", "cbn_naive")}
        steps = {name: _step(block, x, grad) for name, block in variants.items()}
        steps["floor"] = _floor_step(_block(c, "bn", device), x, grad)
        steps["floor_fwd"] = _floor_forward_step(_block(c, "bn", device), x, grad)
        names = list(steps)
        per_run: dict[str, list[float]] = {name: [] for name in names}
        paired: dict[str, list[float]] = {name: [] for name in names}
        for run in range(args.runs):
            timings = {
                t.name: t
                for t in time_steps(
                    steps,
                    baseline="bn",
                    repeats=args.repeats,
                    warmup=args.warmup if run == 0 else 0,
                    device=device,
                )
            }
            for name, timing in timings.items():
                paired[name].extend(timing.paired_ratios(timings["bn"]))
                per_run[name].append(statistics.fmean(timing.seconds) * 1e3)
        median = {name: statistics.median(per_run[name]) for name in names}
        cbn_layer = variants["cbn"][1]
        conv_bytes = sum(p.numel() * p.element_size() for p in variants["cbn"][0].parameters())
        state = _state_bytes(cbn_layer)
        row = {
            "config": f"{n},{c},{h}x{w}",
            "ms": median,
            "runs_ms": per_run,
            "cbn_over_bn": median["cbn"] / median["bn"],
            "naive_over_bn": median["cbn_naive"] / median["bn"],
            "floor_over_bn": median["floor"] / median["bn"],
            "floor_forward_over_bn": median["floor_fwd"] / median["bn"],
            # the median over steps of the ratio to the BN step right next to it in time:
            # less sensitive to bursts of load from other processes than the ratio of medians
            "paired_cbn_over_bn": statistics.median(paired["cbn"]),
            "paired_naive_over_bn": statistics.median(paired["cbn_naive"]),
            "state_bytes": state,
            "conv_weight_bytes": conv_bytes,
        }
        results.append(row)
        print(
            f"{row['config']:>14} {median['bn']:8.2f} {median['cbn']:8.2f} "
            f"{median['cbn_naive']:9.2f} {row['cbn_over_bn']:7.2f} {row['naive_over_bn']:8.2f} "
            f"{row['floor_over_bn']:8.2f} {row['floor_forward_over_bn']:9.2f} "
            f"{row['paired_cbn_over_bn']:7.2f} "
            f"{state / 2**20:9.2f} {conv_bytes / 2**20:9.2f} {state / conv_bytes:7.2f}"
        )
    report: dict[str, object] = {
        "torch": torch.__version__,
        "threads": args.threads,
        "device": str(device),
        "window": WINDOW,
        "results": results,
    }
    if args.output is not None:
        write_json(args.output, report)
    return report


if __name__ == "__main__":
    main()
