"""The argparse types of the ``smallbn`` commands: each parses one option's text or raises
:class:`argparse.ArgumentTypeError`, which argparse turns into a usage error naming the option
(exit code 2) before any work."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch

#: Seeds are 0 to 2**32 - 1: every job's RNGs take them (the comparison job's batch order
#: seeds torch with 1,000,003 * seed + epoch, which must stay within 64 bits).
_MAX_SEED = 2**32 - 1


def _int_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)`` (argparse type: a bad list is a usage error)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


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


def _seed(text: str) -> int:
    """An argparse type: a seed from 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"need an integer from 0 to {_MAX_SEED}, got {text!r}")
    return value


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


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``"2,32"`` → ``(2, 32)``: distinct positive sizes."""
    sizes = _int_list(text)
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"need distinct positive batch sizes, got {text!r}")
    return sizes


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


def _methods(text: str) -> tuple[str, ...]:
    """``"bn,cbn"`` → registered method names (argparse type: an unknown one is a usage
    error naming the registered methods)."""
    from smallbn.bench.methods import check_methods

    try:
        return check_methods(text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
