"""``smallbn import-checkpoint``: an SN, MABN or CBN release checkpoint as a smallbn torchvision
ResNet state_dict (:mod:`smallbn.checkpoints`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def run(args: argparse.Namespace) -> int:
    """Convert the release's checkpoint, write it, and say how to load it."""
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


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """The ``import-checkpoint`` command and its options."""
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
    command.set_defaults(run=run, parser=command)
