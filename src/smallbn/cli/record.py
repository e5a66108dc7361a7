"""``smallbn record``: a norm layer's batch statistics while training at several batch sizes."""

from __future__ import annotations

import argparse
import sys

import torch

from smallbn.cli._common import _add_data_arguments, _check_output_dir
from smallbn.cli._types import _batch_sizes, _count, _positive_float, _seed


def run(args: argparse.Namespace) -> int:
    """Record the layer's batch statistics at each batch size and print the summary."""
    from smallbn.experiments.record import run_record

    torch.set_num_threads(args.threads)
    output = _check_output_dir(args)
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
                output_dir=output,
                file_format=args.format,
                seed=args.seed,
            )
        )
    except KeyError as error:
        print(f"smallbn record: {error.args[0]}", file=sys.stderr)
        return 2
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``record`` command and its options."""
    record = commands.add_parser(
        "record",
        help="record a norm layer's batch statistics while training at several batch sizes",
    )
    record.add_argument(
        "--steps", type=_count(2), default=300, help="training steps per batch size (at least 2)"
    )
    record.add_argument(
        "--batch-sizes", type=_batch_sizes, default=(2, 32), help="comma-separated, e.g. 2,32"
    )
    record.add_argument(
        "--layer", default="stages.0.bn2", help="module name of the norm layer to record"
    )
    record.add_argument(
        "--channel", type=_count(0), default=None, help="plot/summarize one channel (default: mean)"
    )
    record.add_argument(
        "--window",
        type=_count(0),
        default=11,
        help="summary: std of the deviation from a centred moving average of this many "
        "iterations, which removes the drift from training (0: plain std over iterations)",
    )
    record.add_argument(
        "--raw-grad",
        action="store_true",
        help="record g_B, Psi_B of the raw dL/dy instead of scaling it by the batch size",
    )
    record.add_argument("--lr", type=_positive_float, default=0.02, help="SGD learning rate")
    record.add_argument(
        "--train-samples", type=_count(1), default=6000, help="training images (the first ones)"
    )
    _add_data_arguments(record, "fashion-mnist")
    record.add_argument("--output-dir", default="runs/record", help="where the recordings go")
    record.add_argument(
        "--format", default="pt", choices=["pt", "npz"], help="file format of the recordings"
    )
    record.add_argument("--seed", type=_seed, default=0, help="seed of the weights and batches")
    record.set_defaults(run=run, parser=record)
