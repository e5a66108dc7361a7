"""Switchable Normalization: a conv3x3+SN training step against conv3x3+nn.BatchNorm2d,
measured in the same run (issue target: within 1.3x at N=2, C=64, 56x56 and N=8, C=64, 32x32).

    .venv/bin/python benchmarks/bench_switchable.py --threads 2 --repeats 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import smallbn
from smallbn.bench import conv_block, time_training_steps
from smallbn.bench.report import write_json

SHAPES = [(2, 64, 56, 56), (8, 64, 32, 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats")
    print("| N, C, H×W | conv+BN ms | conv+SN ms | SN / BN | conv+GN / BN |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        c = shape[1]
        timings = time_training_steps(
            {
                "bn": lambda c=c: conv_block(nn.BatchNorm2d(c), c),
                "sn": lambda c=c: conv_block(smallbn.SwitchableNorm2d(c), c),
                "gn": lambda c=c: conv_block(smallbn.GroupNorm(c), c),
            },
            shape,
            baseline="bn",
            repeats=args.repeats,
            warmup=args.warmup,
            threads=args.threads,
        )
        by = {t.name: t for t in timings}
        print(
            f"| {shape[0]}, {c}, {shape[2]}×{shape[3]} | {by['bn'].median_ms:.2f} | "
            f"{by['sn'].median_ms:.2f} | {by['sn'].ratio:.2f} | {by['gn'].ratio:.2f} |"
        )
        rows.append(
            {"shape": shape, **{t.name: {"ms": t.median_ms, "ratio": t.ratio} for t in timings}}
        )
    if args.output:
        write_json(args.output, {"threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
