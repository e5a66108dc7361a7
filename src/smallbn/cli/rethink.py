"""``smallbn rethink``: the studies of Wu & Johnson 2021 (:mod:`smallbn.experiments.rethink`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch

from smallbn.cli._common import (
    _add_data_arguments,
    _add_run_arguments,
    _check_output_dir,
    _sweep_settings,
)
from smallbn.cli._types import (
    _count,
    _counts,
    _floats,
    _names,
    _positive_float,
    _seeds,
)


def run(args: argparse.Namespace) -> int:
    """Plan the studies from the preset and the options, train the runs not yet recorded, and
    print each study's report."""
    from smallbn.experiments.compare import bind_data, setup_distributed
    from smallbn.experiments.rethink import STUDIES, check_data, format_report, plan, run_studies

    torch.set_num_threads(args.threads)
    studies = STUDIES if args.study == "all" else (args.study,)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun
    if world > 1 and studies != ("leakage",):
        args.parser.error(
            f"under torchrun ({world} processes) only --study leakage runs: the other "
            f"studies are single-process"
        )
    try:
        configs = plan(
            studies,
            "long" if args.full else args.preset,
            seeds=args.seeds,
            world_size=world,
            epochs=args.epochs,
            train_samples=args.train_samples,
            precise_samples=args.precise_samples,
            eval_samples=args.eval_samples,
            dataset=args.dataset,
            ema_batch=args.ema_batch,
            ema_lr=args.ema_lr,
            momenta=args.momenta,
            sample_sweep=args.sample_sweep,
            sweep_draws=args.sweep_draws,
            batch_sizes=args.batch_sizes,
            frozen_epochs=args.frozen_epochs,
            lr=args.lr,
            shifts=args.shifts,
            domain_shift=args.domain_shift,
            device_batch=args.device_batch,
        )
    except ValueError as error:  # a combination of options that cannot run as labelled
        args.parser.error(str(error))
    output = _check_output_dir(args)
    device = setup_distributed(args.device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    # a DatasetError, OptionError or CheckpointError ends the command (main)
    configs = bind_data(configs, args.data_root)  # type: ignore[arg-type,assignment]
    check_data(configs)
    results = run_studies(configs, output, **_sweep_settings(args, device))
    for study, rows in results.items():
        if rank != 0:
            continue
        folder = output / study
        print()
        print(format_report(study, rows))
        print(
            f"results: {folder / 'results.jsonl'}  table: {folder / 'results.md'}  "
            f"plot: {folder / f'{study}.png'}"
        )
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``rethink`` command; the defaults its help shows come from the presets."""
    from smallbn.experiments.rethink import PRESETS, SHIFTS, STUDIES, StudyConfig

    default = PRESETS["default"]
    ema, inconsistency, domain, leakage = (default[s] for s in STUDIES)

    def listed(values: Sequence[Any]) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    rethink = commands.add_parser(
        "rethink",
        help="reproduce Wu & Johnson 2021 (Rethinking 'Batch' in BatchNorm) on Fashion-MNIST: "
        "EMA vs PreciseBN, train-test inconsistency, domain shift, information leakage",
        description="Each study's runs are resumable and shared safely between concurrent "
        "invocations; results, a Markdown report (with what the paper found and whether this "
        "run reproduces it) and a plot go to OUTPUT_DIR/<study>/. Options left out take the "
        "--preset's values, given below for the default preset.",
    )
    rethink.add_argument(
        "--study",
        choices=[*STUDIES, "all"],
        default="all",
        help="ema: EMA vs PreciseBN; inconsistency: population vs batch statistics vs "
        "FrozenBN at small normalization batch; domain: domain shift; leakage: per-device BN "
        "vs Ghost BN vs Shuffle BN vs SyncBN on correlated per-device batches, the only study "
        "that also runs under torchrun (default: all)",
    )
    rethink.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default: about 20 minutes on 2 free CPU cores; long: all 60,000 training "
        "images, more epochs, 3 seeds (about 15 hours on 2 cores, estimated); smoke: seconds, "
        "for tests (default: default)",
    )
    rethink.add_argument(
        "--full", action="store_true", help="the long version: --preset long (default: off)"
    )
    rethink.add_argument(
        "--output-dir",
        default="runs/rethink",
        help="folder of the studies' subfolders (default: runs/rethink)",
    )
    rethink.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help=f"one run per seed and setting (default: {listed(default['seeds'])})",
    )
    rethink.add_argument(
        "--epochs",
        type=_count(1),
        default=None,
        help=f"training epochs of every study (default: {ema['epochs']} for ema, "
        f"{inconsistency['epochs']} for inconsistency, {domain['epochs']} for domain, "
        f"{leakage['epochs']} for leakage)",
    )
    rethink.add_argument(
        "--train-samples",
        type=_count(1),
        default=None,
        help=f"training images (the first ones of the training set) of every study (default: "
        f"{ema['train_samples']} for ema, {inconsistency['train_samples']} for inconsistency, "
        f"{domain['train_samples']} for domain, {leakage['train_samples']} for leakage)",
    )
    rethink.add_argument(
        "--precise-samples",
        type=_count(1),
        default=None,
        help="samples of every PreciseBN pass (population statistics) except the sample "
        f"sweep's (default: {StudyConfig.precise_samples})",
    )
    rethink.add_argument(
        "--eval-samples",
        type=_count(1),
        default=None,
        help=f"test images the errors are measured on (default: {StudyConfig.eval_samples}, "
        f"the whole test set)",
    )
    rethink.add_argument(
        "--ema-batch",
        type=_count(2),
        default=None,
        help=f"ema: SGD batch, over which BN normalizes (default: {ema['sgd_batch']})",
    )
    rethink.add_argument(
        "--ema-lr",
        type=_positive_float,
        default=None,
        help=f"ema: peak learning rate, constant after a warm-up of "
        f"{ema['warmup'] * 100:g}%% of the steps (default: {ema['lr']:g})",
    )
    rethink.add_argument(
        "--momenta",
        type=_floats,
        default=None,
        help=f"ema: EMA momenta (weight of the new batch, as torch's BN; 0.1, BN's own, is "
        f"always included) (default: {listed(ema['momenta'])})",
    )
    rethink.add_argument(
        "--sample-sweep",
        type=_counts(1),
        default=None,
        help=f"ema: PreciseBN sample counts whose error on the final weights is measured "
        f"(default: {listed(ema['sample_sweep'])})",
    )
    rethink.add_argument(
        "--sweep-draws",
        type=_count(1),
        default=None,
        help=f"ema: PreciseBN passes (data orders) per sample count (default: "
        f"{ema['sweep_draws']})",
    )
    rethink.add_argument(
        "--batch-sizes",
        type=_counts(2),
        default=None,
        help=f"inconsistency: normalization batches b, each dividing the SGD batch of 32 "
        f"(default: {listed(inconsistency['batch_sizes'])})",
    )
    rethink.add_argument(
        "--frozen-epochs",
        type=_count(1),
        default=None,
        help=f"inconsistency: last epochs trained with FrozenBN, fewer than --epochs "
        f"(default: {inconsistency['frozen_epochs']})",
    )
    rethink.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"inconsistency, domain and leakage: peak learning rate (warm-up, cosine decay) "
        f"of SGD batches of {StudyConfig.sgd_batch} (default: {StudyConfig.lr:g})",
    )
    rethink.add_argument(
        "--device-batch",
        type=_count(2),
        default=None,
        help=f"leakage: samples of one simulated device, all of one class; it divides the SGD "
        f"batch of {StudyConfig.sgd_batch} (default: {leakage['device_batch']})",
    )
    rethink.add_argument(
        "--shifts",
        type=_names(SHIFTS, "shift"),
        default=None,
        help=f"domain (a): shifted test domains (default: {listed(domain['shifts'])})",
    )
    rethink.add_argument(
        "--domain-shift",
        choices=list(SHIFTS),
        default=None,
        help=f"domain (b): the second training domain (default: {domain['domain_shift']})",
    )
    _add_data_arguments(rethink, None)
    _add_run_arguments(rethink)
    rethink.add_argument(
        "--checkpoint-every",
        type=_count(1),
        default=50,
        help="steps between a run's checkpoints (also one at every epoch's end) (default: 50)",
    )
    rethink.set_defaults(run=run, parser=rethink)
