"""The ``smallbn`` command line: ``smallbn demo``, ``smallbn record`` (and the jobs later
issues add)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from smallbn.experiments.demo import format_table, run_demo

    torch.set_num_threads(args.threads)
    rows = run_demo(
        tuple(args.methods.split(",")),
        steps=args.steps,
        batch_size=args.batch_size,
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        dataset=args.dataset,
        data_root=args.data_root,
        seed=args.seed,
    )
    title = (
        f"SmallResNet on {args.dataset}: {args.steps} SGD steps at batch {args.batch_size}, "
        f"test error on {args.eval_samples} test images (seed {args.seed})"
    )
    print()
    print(format_table(rows, title))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)`` (argparse type: a bad list is a usage error)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``"2,32"`` → ``(2, 32)``: distinct positive sizes."""
    sizes = _int_list(text)
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"need distinct positive batch sizes, got {text!r}")
    return sizes


def _record(args: argparse.Namespace) -> int:
    from smallbn.experiments.record import run_record

    torch.set_num_threads(args.threads)
    try:
        print(
            run_record(
                args.batch_sizes,
                steps=args.steps,
                layer=args.layer,
                channel=args.channel,
                window=args.window,
                raw_grad=args.raw_grad,
                lr=args.lr,
                train_samples=args.train_samples,
                dataset=args.dataset,
                data_root=args.data_root,
                output_dir=Path(args.output_dir),
                file_format=args.format,
                seed=args.seed,
            )
        )
    except KeyError as error:
        print(f"smallbn record: {error.args[0]}", file=sys.stderr)
        return 2
    return 0


def _add_record_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    record = commands.add_parser(
        "record",
        help="record a norm layer's batch statistics while training at several batch sizes",
    )
    record.add_argument("--steps", type=int, default=300)
    record.add_argument(
        "--batch-sizes", type=_batch_sizes, default=(2, 32), help="comma-separated, e.g. 2,32"
    )
    record.add_argument(
        "--layer", default="stages.0.bn2", help="module name of the norm layer to record"
    )
    record.add_argument(
        "--channel", type=int, default=None, help="plot/summarize one channel (default: mean)"
    )
    record.add_argument(
        "--window",
        type=int,
        default=11,
        help="summary: std of the deviation from a centred moving average of this many "
        "iterations, which removes the drift from training (0: plain std over iterations)",
    )
    record.add_argument(
        "--raw-grad",
        action="store_true",
        help="record g_B, Psi_B of the raw dL/dy instead of scaling it by the batch size",
    )
    record.add_argument("--lr", type=float, default=0.02)
    record.add_argument("--train-samples", type=int, default=6000)
    _add_data_arguments(record, "fashion-mnist")
    record.add_argument("--output-dir", default="runs/record")
    record.add_argument("--format", default="pt", choices=["pt", "npz"])
    record.add_argument("--seed", type=int, default=0)
    record.set_defaults(run=_record)


def _compare(args: argparse.Namespace) -> int:
    from smallbn.experiments.compare import (
        format_tables,
        preset_configs,
        run_sweep,
        setup_distributed,
    )

    torch.set_num_threads(args.threads)
    device = setup_distributed(args.device)
    configs = preset_configs(
        "full" if args.full else args.preset,
        seeds=tuple(args.seeds) if args.seeds else None,
        epochs=args.epochs,
        train_samples=args.train_samples,
        methods=tuple(args.methods.split(",")) if args.methods else None,
        batch_sizes=tuple(args.batch_sizes) if args.batch_sizes else None,
        compositions=tuple(args.compositions.split(",")) if args.compositions else None,
        mode=args.mode,
        dataset=args.dataset,
        sync=args.sync or None,
        lr=args.lr,
    )
    output = Path(args.output_dir)
    rows = run_sweep(
        configs,
        output,
        device=device,
        dataset_root=args.data_root,
        checkpoint_every=args.checkpoint_every,
        jobs=args.jobs,
    )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print()
        print(format_tables(rows))
        print(
            f"results: {output / 'results.jsonl'}  table: {output / 'results.md'}  "
            f"plot: {output / 'error_vs_batch.png'}"
        )
    return 0


def _add_data_arguments(parser: argparse.ArgumentParser, dataset: str | None) -> None:
    """The dataset and thread options every job shares."""
    from smallbn.experiments.data import DATASETS

    parser.add_argument("--dataset", default=dataset, choices=list(DATASETS))
    parser.add_argument("--data-root", default=None, help="folder of --dataset (default: Debian's)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")


def _add_compare_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from smallbn.experiments.compare import PRESETS

    compare = commands.add_parser(
        "compare",
        help="sweep methods x normalization batch sizes x seeds; table and plot of test error",
    )
    compare.add_argument("--preset", default="default", choices=sorted(PRESETS))
    compare.add_argument("--full", action="store_true", help="the complete table (long; GPU)")
    compare.add_argument("--methods", default=None, help="e.g. bn,cbn,mabn (default: preset)")
    compare.add_argument("--batch-sizes", type=_batch_sizes, default=None, help="e.g. 2,4,32")
    compare.add_argument("--compositions", default=None, help="iid,correlated (default both)")
    compare.add_argument("--seeds", type=_int_list, default=None, help="e.g. 0,1,2")
    compare.add_argument("--epochs", type=float, default=None)
    compare.add_argument("--train-samples", type=int, default=None)
    compare.add_argument("--lr", type=float, default=None)
    compare.add_argument(
        "--mode",
        choices=["groups", "sgd"],
        default=None,
        help="groups: normalize groups of b inside SGD batches of 32 (default); sgd: SGD batch b",
    )
    compare.add_argument("--sync", action="store_true", help="pool statistics across processes")
    _add_data_arguments(compare, None)
    compare.add_argument("--device", default="cpu")
    compare.add_argument("--output-dir", default="runs/compare")
    compare.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between run checkpoints"
    )
    compare.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs at once on CPU, one thread each (default 2; 1 = one run with --threads)",
    )
    compare.set_defaults(run=_compare)


def build_parser() -> argparse.ArgumentParser:
    from smallbn.experiments.demo import DEFAULT_METHODS

    parser = argparse.ArgumentParser(prog="smallbn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="convert a small ResNet to each method and train briefly"
    )
    demo.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--train-samples", type=int, default=6000)
    demo.add_argument("--eval-samples", type=int, default=2000)
    _add_data_arguments(demo, "fashion-mnist")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    _add_record_parser(commands)
    _add_compare_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
