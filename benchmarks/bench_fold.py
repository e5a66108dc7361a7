"""Eval-mode inference time of a SmallResNet with BN folded into its convolutions, against the
same network without norms, with BN unfolded, and with batch-independent norms (GN, LN, IN).

Folding (:func:`smallbn.fold.fold`) turns every eval-mode BN into part of the convolution
before it, so a folded BN net should cost what the bare convolutions cost, while GroupNorm /
LayerNorm / InstanceNorm compute statistics per sample at inference and cannot fold (the MABN
paper, Yan et al., ICLR 2020, Table 6, reports BN/MABN 237.9 it/s against GN 99.4, IN 105.6,
LN 125.4 on GPU for ResNet-50).

Method: every variant is warmed up, then timed one forward pass at a time under
``torch.inference_mode``; the variants are interleaved within each repeat, in an order that
rotates from repeat to repeat, so that drift (thermal, other processes) affects all alike.
Reported: the median and interquartile range per variant, ratios to the conv-only network and
folded BN / GN.

    python benchmarks/bench_fold.py --threads 2 --repeats 300 --output results/bench_fold.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
from pathlib import Path

import torch
from torch import Tensor, nn

import smallbn
from smallbn.bench import time_steps
from smallbn.bench.harness import quartiles
from smallbn.bench.report import write_json
from smallbn.experiments.models import SmallResNet
from smallbn.fold import fold_with_report

WIDTHS = (16, 32, 64)
BLOCKS = 2


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=300, help="timed passes per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed passes per variant")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args(argv)


def _bn_model(batch_size: int) -> SmallResNet:
    """A BN SmallResNet with non-trivial running statistics and affine parameters, in eval mode
    (the values do not change the cost; they make the folding check below meaningful)."""
    model = SmallResNet(num_classes=10, in_channels=1, widths=WIDTHS, blocks=BLOCKS, norm="bn")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(batch_size, 1, 28, 28) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _without_norms(model: nn.Module) -> nn.Module:
    """The same network with every norm replaced by ``nn.Identity``: the cost floor."""
    bare = copy.deepcopy(model)
    names = [name for name, m in bare.named_modules() if smallbn.is_norm_layer(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(bare.get_submodule(parent_name), child, nn.Identity())
    return bare.eval()


def _variants(batch_size: int) -> dict[str, nn.Module]:
    bn = _bn_model(batch_size)
    folded, report = fold_with_report(bn)
    if report.kept:
        raise RuntimeError(f"expected every BN to fold, kept: {report.kept}")
    variants: dict[str, nn.Module] = {
        "conv-only": _without_norms(bn),
        "bn": bn,
        "bn-folded": folded,
    }
    for name in ("gn", "ln", "in"):
        variants[name] = smallbn.convert(copy.deepcopy(bn), name).eval()
    return variants


def _measure(
    variants: dict[str, nn.Module], x: Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Per-variant forward times (seconds), interleaved by :func:`smallbn.bench.time_steps`."""
    steps = {name: functools.partial(model, x) for name, model in variants.items()}
    with torch.inference_mode():
        timings = time_steps(steps, baseline="conv-only", repeats=repeats, warmup=warmup)
    return {t.name: list(t.seconds) for t in timings}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    variants = _variants(args.batch_size)
    x = torch.randn(args.batch_size, 1, 28, 28)
    with torch.inference_mode():
        reference = variants["bn"](x)
        error = float((variants["bn-folded"](x) - reference).abs().max() / reference.abs().max())
    # other processes on the machine skew every variant; the load average makes that visible
    load_before = os.getloadavg()[0]
    times = _measure(variants, x, args.repeats, args.warmup)
    load_after = os.getloadavg()[0]

    stats = {name: quartiles(values) for name, values in times.items()}
    floor = stats["conv-only"][1]
    print(
        f"SmallResNet(widths={WIDTHS}, blocks={BLOCKS}), batch {args.batch_size}x1x28x28, eval, "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats "
        f"(median, interquartile range)"
    )
    print(f"{'variant':<10} {'median ms':>10} {'IQR ms':>16} {'/ conv-only':>12}")
    for name, (q1, median, q3) in stats.items():
        iqr = f"{q1 * 1e3:.3f}-{q3 * 1e3:.3f}"
        print(f"{name:<10} {median * 1e3:>10.3f} {iqr:>16} {median / floor:>12.3f}")
    ratios = {
        "bn-folded / gn": stats["bn-folded"][1] / stats["gn"][1],
        "bn-folded / bn": stats["bn-folded"][1] / stats["bn"][1],
    }
    for label, value in ratios.items():
        print(f"{label}: {value:.3f}")
    print(f"folded vs unfolded BN output: max relative difference {error:.2e}")
    # about --threads on an otherwise idle machine; more means other processes competed
    print(
        f"1-minute load average before/after timing: {load_before:.2f}/{load_after:.2f} "
        f"on {os.cpu_count()} CPUs"
    )

    result: dict[str, object] = {
        "config": {
            "widths": list(WIDTHS),
            "blocks": BLOCKS,
            "batch_size": args.batch_size,
            "input": [1, 28, 28],
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "seconds": {
            name: {"median": m, "q1": q1, "q3": q3, "min": min(times[name])}
            for name, (q1, m, q3) in stats.items()
        },
        "ratio_to_conv_only": {name: s[1] / floor for name, s in stats.items()},
        "ratios": ratios,
        "folded_max_relative_difference": error,
        "load_average": [load_before, load_after],
    }
    if args.output is not None:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
