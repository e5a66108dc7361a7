"""``smallbn compare``: the sweep of methods × normalization batch sizes × compositions × seeds
(:mod:`smallbn.experiments.compare`)."""

from __future__ import annotations

import argparse

import torch

from smallbn.cli._common import (
    _add_data_arguments,
    _add_run_arguments,
    _check_output_dir,
    _sweep_settings,
)
from smallbn.cli._types import (
    _batch_sizes,
    _count,
    _names,
    _positive_float,
    _seeds,
)


def run(args: argparse.Namespace) -> int:
    """Plan the sweep from the preset and the options, train the runs not yet recorded in
    ``--output-dir``, and print the tables."""
    from smallbn.experiments.compare import (
        bind_data,
        check_data,
        format_tables,
        preset_configs,
        run_sweep,
        setup_distributed,
    )

    torch.set_num_threads(args.threads)
    device = setup_distributed(args.device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    try:
        configs = preset_configs(
            "full" if args.full else args.preset,
            seeds=args.seeds or None,
            epochs=args.epochs,
            train_samples=args.train_samples,
            methods=args.methods,
            batch_sizes=args.batch_sizes,
            compositions=args.compositions,
            mode=args.mode,
            dataset=args.dataset,
            sync=args.sync or None,
            lr=args.lr,
            world_size=world,  # torchrun: the batch must split over the processes
        )
    except ValueError as error:  # a combination of options that cannot run as labelled
        args.parser.error(str(error))
    output = _check_output_dir(args)
    # before any run is trained: a run whose data make no batch would fail only after the
    # runs before it (a DatasetError, OptionError or CheckpointError ends the command: main)
    configs = bind_data(configs, args.data_root)
    check_data(configs)
    rows = run_sweep(configs, output, **_sweep_settings(args, device))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print()
        print(format_tables(rows))
        print(
            f"results: {output / 'results.jsonl'}  table: {output / 'results.md'}  "
            f"plot: {output / 'error_vs_batch.png'}"
        )
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``compare`` command; the defaults its help shows come from the presets."""
    from smallbn.experiments.compare import METHODS, PRESETS, RunConfig, preset_configs
    from smallbn.experiments.sampling import COMPOSITIONS

    default = PRESETS["default"][1]  # the help's defaults, from the preset itself

    compare = commands.add_parser(
        "compare",
        help="sweep methods x normalization batch sizes x seeds; table and plot of test error",
    )
    compare.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help=f"default: the README's figure, each method over several normalization batch "
        f"sizes ({len(preset_configs('default'))} runs, 9-16 minutes on 2 CPU cores); full: "
        f"every method at b = 2..32 (long); smoke: seconds, for tests",
    )
    compare.add_argument(
        "--full", action="store_true", help="the complete table (long; GPU): --preset full"
    )
    compare.add_argument(
        "--methods",
        type=_names(tuple(METHODS), "method"),
        default=None,
        help=f"e.g. bn,cbn,mabn (default: preset; any of {','.join(METHODS)})",
    )
    compare.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=None,
        help="normalization batch sizes, e.g. 2,4,32 (default: the preset's per method)",
    )
    compare.add_argument(
        "--compositions",
        type=_names(COMPOSITIONS, "composition"),
        default=None,
        help="iid,correlated (default: both)",
    )
    compare.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help=f"e.g. 0,1,2 (default: the preset's, {','.join(map(str, default['seeds']))})",
    )
    compare.add_argument(
        "--epochs",
        type=_positive_float,
        default=None,
        help=f"training epochs, fractions allowed (default: the preset's, {default['epochs']:g})",
    )
    compare.add_argument(
        "--train-samples",
        type=_count(1),
        default=None,
        help=f"training images, the first ones (default: the preset's, {default['train_samples']})",
    )
    compare.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"peak learning rate (default: {RunConfig.lr:g})",
    )
    compare.add_argument(
        "--mode",
        choices=["groups", "sgd"],
        default=None,
        help=f"groups: normalize groups of b inside SGD batches of {RunConfig.sgd_batch}; sgd: "
        f"SGD batch b (default: {RunConfig.mode})",
    )
    compare.add_argument("--sync", action="store_true", help="pool statistics across processes")
    _add_data_arguments(compare, None)
    _add_run_arguments(compare)
    compare.add_argument("--output-dir", default="runs/compare", help="where results go")
    compare.add_argument(
        "--checkpoint-every", type=_count(1), default=100, help="steps between run checkpoints"
    )
    compare.set_defaults(run=run, parser=compare)
