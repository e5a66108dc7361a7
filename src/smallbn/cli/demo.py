"""``smallbn demo``: convert a small ResNet to each method and train it briefly."""

from __future__ import annotations

import argparse

import torch

from smallbn.cli._common import _add_data_arguments
from smallbn.cli._types import _count, _seed


def run(args: argparse.Namespace) -> int:
    """Train a small ResNet briefly with each method and print their test errors."""
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


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``demo`` command and its options."""
    from smallbn.experiments.demo import DEFAULT_METHODS

    demo = commands.add_parser(
        "demo", help="convert a small ResNet to each method and train briefly"
    )
    demo.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated registered names"
    )
    demo.add_argument("--steps", type=_count(1), default=300, help="training steps per method")
    demo.add_argument("--batch-size", type=_count(1), default=8, help="SGD batch size")
    demo.add_argument(
        "--train-samples", type=_count(1), default=6000, help="training images (the first ones)"
    )
    demo.add_argument("--eval-samples", type=_count(1), default=2000, help="test images scored")
    _add_data_arguments(demo, "fashion-mnist")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the weights and batches")
    demo.set_defaults(run=run, parser=demo)
