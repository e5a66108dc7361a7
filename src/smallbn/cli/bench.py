"""``smallbn bench layers|network``: speed and memory of every method against torch's BN."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from smallbn.cli._common import _check_output_dir
from smallbn.cli._types import _count, _methods, _seed, _shapes


def _bench_settings(args: argparse.Namespace) -> Any:
    from smallbn.bench.harness import Settings

    return Settings(
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        device=args.device,
        finite_check=not args.no_finite_check,
    )


def run(args: argparse.Namespace) -> int:
    """Time the methods per layer or per network and write the report."""
    from smallbn.bench.report import format_table, write_report

    try:
        settings = _bench_settings(args)
    except (ValueError, RuntimeError) as error:
        print(f"smallbn bench {args.bench}: {error}", file=sys.stderr)
        return 2
    output = _check_output_dir(args)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report: Any
    if args.bench == "layers":
        from smallbn.bench.layers import run_layers

        report = run_layers(
            args.methods, args.shapes, settings, control=not args.no_control, progress=progress
        )
    else:
        from smallbn.bench.network import run_network

        report = run_network(args.methods, args.batch_size, settings, progress=progress)
    print(format_table(report))
    json_path, md_path = write_report(report, output)
    print(f"results: {json_path}  table: {md_path}")
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``bench layers`` and ``bench network`` commands and their options."""
    from smallbn.bench.layers import DEFAULT_SHAPES
    from smallbn.bench.methods import DEFAULT_METHODS

    bench = commands.add_parser(
        "bench", help="speed and memory of every method against torch's BN, per layer or network"
    )
    kinds = bench.add_subparsers(dest="bench", required=True)
    layers = kinds.add_parser(
        "layers",
        help="training step and eval forward of conv+norm blocks, ratios to conv+BatchNorm2d",
    )
    network = kinds.add_parser(
        "network", help="train/eval throughput of the comparison job's ResNet, unfolded and folded"
    )
    for parser, repeats, warmup in ((layers, 50, 5), (network, 20, 3)):
        parser.add_argument(
            "--methods",
            type=_methods,
            default=DEFAULT_METHODS,
            help=f"comma-separated registered names (default: {','.join(DEFAULT_METHODS)}); "
            f"bn, the baseline, is always measured",
        )
        parser.add_argument(
            "--repeats", type=_count(1), default=repeats, help="timed calls per method"
        )
        parser.add_argument(
            "--warmup", type=_count(0), default=warmup, help="untimed calls per method first"
        )
        parser.add_argument("--threads", type=_count(1), default=2, help="torch.set_num_threads")
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        parser.add_argument("--seed", type=_seed, default=0, help="seed of inputs and weights")
        parser.add_argument(
            "--no-finite-check",
            action="store_true",
            help="turn smallbn's NaN/Inf check of batch statistics off (default: its 'auto' "
            "mode, every step on CPU and deferred, with no host read, on CUDA; see "
            "smallbn.set_finite_check)",
        )
        parser.add_argument(
            "--output-dir", default="runs/bench", help="where <layers|network>.json/.md go"
        )
        parser.set_defaults(run=run, parser=parser)
    default_shapes = ",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES)
    layers.add_argument(
        "--shapes",
        type=_shapes,
        default=DEFAULT_SHAPES,
        help=f"comma-separated NxCxHxW inputs (default: {default_shapes})",
    )
    layers.add_argument(
        "--no-control",
        action="store_true",
        help="skip the second conv+BN block whose ratio to BN shows the run's noise",
    )
    network.add_argument(
        "--batch-size", type=_count(1), default=32, help="images per training step"
    )
