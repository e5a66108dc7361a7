"""What every ``smallbn`` command shares: the help formatter that shows each option's default,
the usage error for what is found only after parsing, the check of an output folder, and the
dataset options."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import torch

from smallbn.cli._types import _count, _device


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
    parser.add_argument(
        "--threads", type=_count(1), default=2, help="torch.set_num_threads (default: 2)"
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the runs of a job that trains many (``compare``, ``rethink``) train: the device,
    and how many at once on CPU."""
    parser.add_argument(
        "--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)"
    )
    parser.add_argument(
        "--jobs",
        type=_count(1),
        default=2,
        help="runs at once on CPU, one thread each; 1 = one run at a time with --threads "
        "(default: 2)",
    )


def _sweep_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The keyword arguments the options give a job's sweep (``run_sweep``,
    ``run_studies``): the device, the data folder, the checkpoint interval, the workers."""
    return {
        "device": device,
        "dataset_root": args.data_root,
        "checkpoint_every": args.checkpoint_every,
        "jobs": args.jobs,
    }


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
