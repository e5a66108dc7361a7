"""The ``smallbn`` command line: ``smallbn demo``, ``smallbn record``, ``smallbn compare``,
``smallbn rethink``, ``smallbn bench layers|network`` and ``smallbn import-checkpoint``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = ["main"]


#: Seeds are 0 to 2**32 - 1: every job's RNGs take them (the comparison job's batch order
#: seeds torch with 1,000,003 * seed + epoch, which must stay within 64 bits).
_MAX_SEED = 2**32 - 1


def _usage_error(args: argparse.Namespace, option: str, message: str) -> NoReturn:
    """Exit as argparse does for a bad option (usage, ``argument OPTION: message``, code 2),
    for what is found only after parsing: data too small, a folder that cannot be written."""
    parser: argparse.ArgumentParser = args.parser
    parser.error(f"argument {option}: {message}")


def _check_output_dir(args: argparse.Namespace, option: str = "--output-dir") -> Path:
    """The output folder, once a file could be written in it (or, where it does not exist
    yet, in the folder it would be created in): a job must not train for minutes and then
    lose its results to a folder it cannot write.  Creates nothing."""
    path = Path(getattr(args, option.lstrip("-").replace("-", "_")))
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        _usage_error(
            args, option, f"{path}: {existing} is not a folder; pick a folder you can write to"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".smallbn-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        _usage_error(
            args,
            option,
            f"{path}: cannot write in {existing} ({error.strerror or error}); pick a folder "
            f"you can write to",
        )
    return path


def _demo(args: argparse.Namespace) -> int:
    from smallbn.experiments.data import OptionError
    from smallbn.experiments.demo import format_table, run_demo

    torch.set_num_threads(args.threads)
    try:
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
    except OptionError as error:
        _usage_error(args, error.option, str(error))
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


def _seed(text: str) -> int:
    """An argparse type: a seed from 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"need an integer from 0 to {_MAX_SEED}, got {text!r}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``"2,32"`` → ``(2, 32)``: distinct positive sizes."""
    sizes = _int_list(text)
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"need distinct positive batch sizes, got {text!r}")
    return sizes


def _record(args: argparse.Namespace) -> int:
    from smallbn.experiments.data import OptionError
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
    except OptionError as error:
        _usage_error(args, error.option, str(error))
    return 0


def _add_record_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    record.set_defaults(run=_record, parser=record)


def _compare(args: argparse.Namespace) -> int:
    from smallbn.experiments.compare import (
        CheckpointError,
        bind_data,
        check_data,
        format_tables,
        preset_configs,
        run_sweep,
        setup_distributed,
    )
    from smallbn.experiments.data import DatasetError, OptionError

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
    try:
        # before any run is trained: a run whose data make no batch would fail only after
        # the runs before it
        configs = bind_data(configs, args.data_root)
        check_data(configs)
    except DatasetError as error:
        print(f"smallbn compare: error: {error}", file=sys.stderr)
        return 1
    except OptionError as error:
        _usage_error(args, error.option, str(error))
    try:
        rows = run_sweep(
            configs,
            output,
            device=device,
            dataset_root=args.data_root,
            checkpoint_every=args.checkpoint_every,
            jobs=args.jobs,
        )
    except (DatasetError, CheckpointError) as error:
        print(f"smallbn compare: error: {error}", file=sys.stderr)
        return 1
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

    parser.add_argument(
        "--dataset",
        default=dataset,
        choices=list(DATASETS),
        help="fashion-mnist falls back to the scikit-learn digits, labelled so, without "
        "Debian's dataset-fashion-mnist"
        + ("" if dataset else " (default: the preset's, fashion-mnist)"),
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder of --dataset (default: Debian's, for fashion-mnist)",
    )
    parser.add_argument("--threads", type=_count(1), default=2, help="torch.set_num_threads")


def _names(known: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of ``known`` names, repeats dropped (a
    repeat would make the same run twice); an unknown name is a usage error listing them."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"choose from {','.join(known)}"
            )
        return names

    return parse


def _seeds(text: str) -> tuple[int, ...]:
    """``"0,1,0"`` → ``(0, 1)``: at least one seed, each from 0 to 2**32 - 1; a repeated
    seed would make the same run twice.  An empty list is an error, not the preset's seeds:
    the user asked for something, and it was not that."""
    seeds = tuple(dict.fromkeys(_int_list(text)))
    if not seeds or not all(0 <= seed <= _MAX_SEED for seed in seeds):
        raise argparse.ArgumentTypeError(
            f"need a comma-separated list of seeds from 0 to {_MAX_SEED} (e.g. 0,1,2), got {text!r}"
        )
    return seeds


def _positive_float(text: str) -> float:
    """An argparse type: a finite float above 0 (a learning rate of 0 trains nothing, a
    negative one is refused by the optimizer, NaN or inf make every weight NaN)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"need a finite number above 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available here (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
    return text


def _add_compare_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from smallbn.experiments.compare import METHODS, PRESETS, RunConfig
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
        help="default: the README's sweep; full: every method at b = 2..32 (long); smoke: "
        "seconds, for tests",
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
    compare.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    compare.add_argument("--output-dir", default="runs/compare", help="where results go")
    compare.add_argument(
        "--checkpoint-every", type=_count(1), default=100, help="steps between run checkpoints"
    )
    compare.add_argument(
        "--jobs",
        type=_count(1),
        default=2,
        help="runs at once on CPU, one thread each; 1 = one run with --threads",
    )
    compare.set_defaults(run=_compare, parser=compare)


def _rethink(args: argparse.Namespace) -> int:
    from smallbn.experiments.compare import CheckpointError, bind_data, setup_distributed
    from smallbn.experiments.data import DatasetError, OptionError
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
    try:
        configs = bind_data(configs, args.data_root)  # type: ignore[arg-type,assignment]
        check_data(configs)
    except DatasetError as error:
        print(f"smallbn rethink: error: {error}", file=sys.stderr)
        return 1
    except OptionError as error:
        _usage_error(args, error.option, str(error))
    try:
        results = run_studies(
            configs,
            output,
            device=device,
            dataset_root=args.data_root,
            checkpoint_every=args.checkpoint_every,
            jobs=args.jobs,
        )
    except (DatasetError, CheckpointError) as error:
        print(f"smallbn rethink: error: {error}", file=sys.stderr)
        return 1
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


def _floats(text: str) -> tuple[float, ...]:
    """``"0.01,0.1"`` → ``(0.01, 0.1)``: at least one finite number above 0."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"need a comma-separated list of numbers above 0, got {text!r}"
        )
    return tuple(dict.fromkeys(values))


def _counts(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: a comma-separated list of distinct integers of at least ``minimum``."""

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(dict.fromkeys(_int_list(text)))
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(
                f"need a comma-separated list of integers >= {minimum}, got {text!r}"
            )
        return values

    return parse


def _add_rethink_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from smallbn.experiments.data import DATASETS
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
    rethink.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=None,
        help="fashion-mnist falls back to the digits (labelled so) without Debian's "
        "dataset-fashion-mnist (default: fashion-mnist)",
    )
    rethink.add_argument(
        "--data-root",
        default=None,
        help="folder of --dataset (default: none, Debian's /usr/share/datasets/fashion-mnist)",
    )
    rethink.add_argument(
        "--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)"
    )
    rethink.add_argument(
        "--jobs",
        type=_count(1),
        default=2,
        help="runs at once on CPU, one thread each; 1 = one run at a time with --threads "
        "(default: 2)",
    )
    rethink.add_argument(
        "--threads",
        type=_count(1),
        default=2,
        help="torch.set_num_threads with --jobs 1 (default: 2)",
    )
    rethink.add_argument(
        "--checkpoint-every",
        type=_count(1),
        default=50,
        help="steps between a run's checkpoints (also one at every epoch's end) (default: 50)",
    )
    rethink.set_defaults(run=_rethink, parser=rethink)


def _shape(text: str) -> tuple[int, int, int, int]:
    """``"2x64x56x56"`` → ``(2, 64, 56, 56)`` (argparse type: a bad shape is a usage error)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"not an input shape NxCxHxW of positive integers (e.g. 2x64x56x56): {text!r}"
        )
    return values[0], values[1], values[2], values[3]


def _shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """``"2x64x56x56,8x64x32x32"`` → the shapes (at least one)."""
    shapes = tuple(_shape(part.strip()) for part in text.split(",") if part.strip())
    if not shapes:
        raise argparse.ArgumentTypeError(f"need at least one shape NxCxHxW, got {text!r}")
    return shapes


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"need an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _methods(text: str) -> tuple[str, ...]:
    """``"bn,cbn"`` → registered method names (argparse type: an unknown one is a usage
    error naming the registered methods)."""
    from smallbn.bench.methods import check_methods

    try:
        return check_methods(text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def _bench(args: argparse.Namespace) -> int:
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


def _add_bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        parser.set_defaults(run=_bench, parser=parser)
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


def _import_checkpoint(args: argparse.Namespace) -> int:
    from smallbn._io import atomic_write
    from smallbn.checkpoints import ReleaseLayoutError, release_state_dict

    out = Path(args.out)
    if not out.parent.is_dir():  # before reading the file
        print(f"smallbn import-checkpoint: error: {out.parent} is not a folder", file=sys.stderr)
        return 1
    try:
        state, report = release_state_dict(args.release, args.file, args.arch, part=args.part)
    except (ReleaseLayoutError, FileNotFoundError) as error:
        print(f"smallbn import-checkpoint: error: {error}", file=sys.stderr)
        return 1
    atomic_write(out, lambda handle: torch.save(state, handle))
    print(report.summary())
    if args.part == "backbone":
        options = "".join(f", {k}={v!r}" for k, v in report.norm_options.items())
        build = f"torchvision.models.{args.arch}()"
        if report.norm != "bn":
            build = f"smallbn.convert({build}, {report.norm!r}{options})"
        steps = [f"load it into {build}"]
        if report.stride_in_1x1:
            steps.append("stride every downsampling block on its conv1, not conv2")
        if "fc.weight" not in state:
            steps.append("load_state_dict(state, strict=False): the file has no classifier")
        print("; ".join(steps) + " (smallbn.checkpoints.load_release does all of it)")
    print(f"written: {out}")
    return 0


def _add_import_checkpoint_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    from smallbn.checkpoints import ARCHS, RELEASES

    command = commands.add_parser(
        "import-checkpoint",
        help="convert an SN, MABN or CBN release checkpoint to a smallbn torchvision ResNet "
        "state_dict",
        description="Reads a checkpoint of the authors' release (SN: Switchable-Normalization "
        "ResNet v1 or SwitchNorm_Detection; MABN: cls/ or maskrcnn-benchmark; CBN: "
        "mmdetection R-50-FPN), maps it onto torchvision's ResNet with smallbn's layers and "
        "writes the state_dict; prints what was mapped, dropped and added.",
    )
    command.add_argument(
        "--from",
        dest="release",
        choices=list(RELEASES),
        required=True,
        help="the release the file comes from (required)",
    )
    command.add_argument(
        "--arch", choices=list(ARCHS), default="resnet50", help="(default: resnet50)"
    )
    command.add_argument(
        "--part",
        choices=["backbone", "detector"],
        default="backbone",
        help="cbn: the torchvision backbone, or every key under mmdetection's names "
        "(default: backbone)",
    )
    command.add_argument("file", help="the release's checkpoint file")
    command.add_argument("out", help="where to write the converted state_dict (torch.save)")
    command.set_defaults(run=_import_checkpoint, parser=command)


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's help ends with its default: the value (lists as typed on the command
    line), ``off`` for a flag, or the help's own ``(default: …)`` where the default is not a
    value (a preset's, Debian's folder)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.required or "(default: " in text:
            return text
        default = action.default
        if default is argparse.SUPPRESS:
            return text
        if isinstance(default, bool):
            shown = "on" if default else "off"
        elif default is None:
            shown = "none"
        elif isinstance(default, tuple | list):
            shown = ",".join(str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown})".strip()


def _with_defaults_help(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every subcommand's parser the :class:`_DefaultsHelp` formatter."""
    parser.formatter_class = _DefaultsHelp
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_defaults_help(sub)


def build_parser() -> argparse.ArgumentParser:
    from smallbn.experiments.demo import DEFAULT_METHODS

    parser = argparse.ArgumentParser(prog="smallbn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
    demo.set_defaults(run=_demo, parser=demo)
    _add_record_parser(commands)
    _add_compare_parser(commands)
    _add_rethink_parser(commands)
    _add_bench_parser(commands)
    _add_import_checkpoint_parser(commands)
    _with_defaults_help(parser)
    return parser


#: The jobs that write plots: they check for matplotlib before any work.
_PLOTTING = {"compare", "rethink", "record"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from smallbn._optional import require

    try:
        if args.command in _PLOTTING:
            require("matplotlib", f"smallbn {args.command} (its plots)")
        return int(args.run(args))
    except ImportError as error:
        if "pip install 'smallbn[" not in str(error):
            raise
        print(f"smallbn {args.command}: error: {error}", file=sys.stderr)
        return 1
