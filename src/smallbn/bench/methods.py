"""Which methods the benchmarks measure, with which options, and what each number means.

Every method of the registry runs on a conv block and in the comparison job's ResNet.  Where
a method has a free parameter that changes its cost, the benchmarks fix it here (and record
it with the results): Ghost BN normalizes groups of 2 samples, domain BN keeps 2 domains,
Cross-Iteration BN pools k = 4 iterations with the conv bound as its producer, MABN runs past
its warm-up and clamp start (every path of the layer active) after a weight-centred conv.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn

from smallbn.convert import ConversionWarning, bind_producers
from smallbn.registry import available_norms, build_norm

__all__ = [
    "BASELINE",
    "DEFAULT_METHODS",
    "METHOD_NOTES",
    "METHOD_OPTIONS",
    "bound",
    "check_methods",
    "norm_factory",
]

#: torch's ``nn.BatchNorm2d``: every ratio is to it, measured in the same run.
BASELINE = "bn"

#: Every registered method (all of them work on a conv block and in a ResNet).
DEFAULT_METHODS: tuple[str, ...] = (
    "bn",
    "syncbn",
    "brn",
    "ghostbn",
    "frozenbn",
    "domainbn",
    "sn",
    "mabn",
    "cbn",
    "shufflebn",
    "gn",
    "ln",
    "in",
)

#: Constructor options per method (others: the layer's defaults).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "ghostbn": {"group_size": 2},
    "domainbn": {"num_domains": 2},
    "cbn": {"window": 4},
    "mabn": {"warmup": 0, "clamp_start": 0},
    "shufflebn": {"norm_batch_size": 2},
}

#: What is measured for each method, beside the options.
METHOD_NOTES: dict[str, str] = {
    "bn": "torch.nn.BatchNorm2d, the baseline",
    "syncbn": "one process: nothing to pool, so this is SyncBatchNorm's local path "
    "(cross-process communication is not measured)",
    "brn": "Batch Renorm: batch statistics corrected towards the running ones (r, d)",
    "ghostbn": "statistics per group of 2 samples",
    "frozenbn": "fixed statistics and affine (buffers): no batch statistics, nothing trained",
    "domainbn": "2 statistics sets, the whole batch in domain 0",
    "sn": "IN, LN and BN statistics mixed with learned weights",
    "mabn": "after a weight-centred conv (CenteredConv2d), past warm-up and clamp start",
    "cbn": "k = 4 iterations pooled, Taylor-compensated through the bound conv",
    "shufflebn": "one process: the batch permuted, normalized in groups of 2, un-permuted "
    "(the cross-process exchange is not measured)",
    "gn": "G = 32 groups (fitted to C)",
    "ln": "statistics over C and space per sample",
    "in": "statistics over space per sample and channel",
}


def check_methods(methods: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``methods`` lower-cased, duplicates dropped, the baseline first (added when missing);
    a ``ValueError`` naming the registered methods for an unknown one."""
    known = available_norms()
    names = [m.strip().lower() for m in methods if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(repr(m) for m in unknown)}; registered methods: "
            f"{', '.join(known)}"
        )
    ordered = [BASELINE] + [m for m in dict.fromkeys(names) if m != BASELINE]
    return tuple(ordered)


def _build(method: str, channels: int, **kwargs: Any) -> nn.Module:
    return build_norm(method, channels, **{**kwargs, **METHOD_OPTIONS.get(method, {})})


def norm_factory(method: str) -> functools.partial[nn.Module]:
    """``factory(channels, **kwargs)`` building ``method``'s 2d layer with the benchmark's
    options (the ``norm`` argument of :class:`~smallbn.experiments.models.SmallResNet`)."""
    return functools.partial(_build, method)


def bound(model: nn.Module) -> nn.Module:
    """``model`` with producers bound (Cross-Iteration BN's conv, MABN's centred conv)."""
    with warnings.catch_warnings():  # benchmarks build from scratch: no function to keep
        warnings.filterwarnings("ignore", "MABN centres", ConversionWarning)
        bind_producers(model)
    return model
