"""What the zoo expects besides success: library defects (strict xfails) and refusals that are
right (the test asserts the error).

Steps: ``convert``, ``train_b1``, ``train_b2``, ``precise_bn``, ``fold``, ``state_dict``,
``back_to_bn``, ``bn_identity``.  Entries match (architectures, methods, steps); ``ANY``
matches everything.

``KNOWN``: defects of smallbn (issue 19).  Each case is ``xfail(strict=True)``: once fixed it
XPASSes, which fails the run, and its entry goes.

``REFUSED``: cases the method cannot run, where smallbn must refuse with a clear error (the
test checks the error's type and message instead of the steps).  The reason is in the data,
not in smallbn: e.g. DeepLabV3's ASPP pooling branch normalizes a 1×1 map, so a batch of one
sample has one value per channel (no batch statistics), and InstanceNorm always has one value
per sample and channel there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

ANY = "*"
Pattern = set[str] | str

#: Batch-statistics methods that need more than one value per channel in a training batch.
_BATCH_STATS = {"bn", "syncbn", "brn", "ghostbn", "domainbn", "cbn"}
_STEPS_THAT_RUN = {"train_b1", "train_b2", "precise_bn", "fold", "state_dict", "back_to_bn"}
_ONE_VALUE = r"value per channel|single value per sample"

KNOWN: list[tuple[Pattern, Pattern, Pattern, str]] = []

REFUSED: list[tuple[Pattern, Pattern, Pattern, type[Exception], str]] = [
    # ASPP pooling (1x1): a batch of one has one value per channel
    (
        {"tv_deeplabv3_mobilenet_v3_large"},
        _BATCH_STATS,
        {"train_b1"},
        ValueError,
        _ONE_VALUE,
    ),
    # Ghost BN of one sample per group: one value per channel at any batch size
    (
        {"tv_deeplabv3_mobilenet_v3_large"},
        {"ghostbn"},
        _STEPS_THAT_RUN - {"fold"},
        ValueError,
        _ONE_VALUE,
    ),
    # InstanceNorm of a 1x1 map: one value per sample and channel, in training and in eval
    (
        {"tv_deeplabv3_mobilenet_v3_large"},
        {"in"},
        _STEPS_THAT_RUN,
        ValueError,
        _ONE_VALUE,
    ),
]


def _matches(pattern: Pattern, value: str) -> bool:
    return pattern == ANY or value in pattern


def known_failure(arch: str, method: str, step: str) -> list[Any]:
    """The xfail marks of (arch, method, step): empty where it is expected to pass."""
    for archs, methods, steps, reason in KNOWN:
        if _matches(archs, arch) and _matches(methods, method) and _matches(steps, step):
            return [pytest.mark.xfail(strict=True, reason=f"issue 19: {reason}")]
    return []


@contextlib.contextmanager
def expected_refusal(arch: str, method: str, step: str) -> Iterator[None]:
    """Around a test's body: asserts the refusal ``REFUSED`` lists for (arch, method, step),
    or nothing where none is listed."""
    for archs, methods, steps, error, message in REFUSED:
        if _matches(archs, arch) and _matches(methods, method) and _matches(steps, step):
            with pytest.raises(error, match=message):
                yield
            return
    yield
