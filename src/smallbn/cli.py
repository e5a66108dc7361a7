"""The ``smallbn`` command line: ``smallbn demo`` (and the jobs later issues add)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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
    demo.add_argument(
        "--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits", "idx"]
    )
    demo.add_argument("--data-root", default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
