"""The ``smallbn`` command line: ``smallbn demo``, ``smallbn record``, ``smallbn compare``,
``smallbn rethink``, ``smallbn bench layers|network`` and ``smallbn import-checkpoint``.

Each command is a module here (its parser's ``add_parser`` and its ``run``); :mod:`._types`
holds the argparse types and :mod:`._common` what the commands share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from smallbn.cli import bench, checkpoints, compare, demo, record, rethink
from smallbn.cli._common import _usage_error, _with_defaults_help
from smallbn.cli._types import _shapes as _shapes  # benchmarks/bench_cross_iteration.py's

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``smallbn`` parser: one subcommand per module, every option's help ending with its
    default (:class:`~smallbn.cli._common._DefaultsHelp`)."""
    parser = argparse.ArgumentParser(prog="smallbn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (demo, record, compare, rethink, bench, checkpoints):
        command.add_parser(commands)
    _with_defaults_help(parser)
    return parser


#: The jobs that write plots: they check for matplotlib before any work.
_PLOTTING = {"compare", "rethink", "record"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv``); its exit code.

    What a command finds wrong only once it runs ends it here, the same way for every
    command: an option the data cannot satisfy (:class:`OptionError`) as argparse's usage
    error (exit code 2), missing or unreadable data (:class:`DatasetError`) and a checkpoint
    that cannot be resumed (:class:`CheckpointError`) as ``smallbn <command>: error: ...``
    (exit code 1), and so is an optional package that a job needs and that is missing."""
    args = build_parser().parse_args(argv)
    from smallbn._optional import require
    from smallbn.experiments.compare import CheckpointError
    from smallbn.experiments.data import DatasetError, OptionError

    try:
        if args.command in _PLOTTING:
            require("matplotlib", f"smallbn {args.command} (its plots)")
        return int(args.run(args))
    except OptionError as error:
        _usage_error(args, error.option, str(error))
    except (DatasetError, CheckpointError) as error:
        print(f"smallbn {args.command}: error: {error}", file=sys.stderr)
        return 1
    except ImportError as error:
        if "pip install 'smallbn[" not in str(error):
            raise
        print(f"smallbn {args.command}: error: {error}", file=sys.stderr)
        return 1
