"""Names → normalization layers, and :func:`build_norm` (timm's factory idea).

A *spec* is a registered name (``"bn"``, ``"syncbn"``, ``"brn"``, ``"ghostbn"``,
``"frozenbn"``, ``"domainbn"``, ``"gn"``, ``"ln"``, ``"in"``, ``"sn"``, ``"mabn"``,
``"cbn"``, ``"shufflebn"``), a layer class, or a ``functools.partial`` of one.  Every layer
takes the channel count first, then BN's ``eps, momentum, affine, track_running_stats`` and
``device``/``dtype`` keywords.  A name maps to a *family*: a class per input
dimensionality (1, 2, 3) and, where the method has one, a class for any rank (key ``None``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from smallbn import layers

__all__ = ["NormSpec", "available_norms", "build_norm", "register_norm", "resolve_norm"]

NormSpec = str | type | functools.partial | Callable[..., nn.Module]
Family = Mapping[int | None, Callable[..., nn.Module]]

_FAMILIES: dict[str, Family] = {}
_ALIASES: dict[str, str] = {}


def _family(agnostic: Callable[..., nn.Module] | None, *by_dim: Callable[..., nn.Module]) -> Family:
    family: dict[int | None, Callable[..., nn.Module]] = dict(zip((1, 2, 3), by_dim, strict=False))
    if agnostic is not None:
        family[None] = agnostic
    return family


def register_norm(
    name: str,
    family: Family | Callable[..., nn.Module],
    *,
    aliases: tuple[str, ...] = (),
    overwrite: bool = False,
) -> None:
    """Register ``name`` (and ``aliases``) for a layer family or a single rank-agnostic layer."""
    key = name.lower()
    taken = [n for n in (key, *(a.lower() for a in aliases)) if n in _FAMILIES or n in _ALIASES]
    if taken and not overwrite:
        raise ValueError(
            f"register_norm: {', '.join(repr(n) for n in taken)} already registered (a name "
            f"or an alias); pick other names or pass overwrite=True"
        )
    for taken_name in taken:  # overwrite: a taken name or alias now means this layer
        _ALIASES.pop(taken_name, None)
        if taken_name != key and _FAMILIES.pop(taken_name, None) is not None:
            for alias in [a for a, target in _ALIASES.items() if target == taken_name]:
                del _ALIASES[alias]
    _FAMILIES[key] = family if isinstance(family, Mapping) else {None: family}
    for alias in aliases:
        _ALIASES[alias.lower()] = key


def available_norms() -> list[str]:
    """The registered names (aliases excluded), sorted."""
    return sorted(_FAMILIES)


def _canonical(name: str) -> str:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _FAMILIES:
        raise KeyError(
            f"unknown normalization '{name}'; registered names: {', '.join(available_norms())} "
            f"(or pass a layer class or functools.partial)"
        )
    return key


def resolve_norm(spec: NormSpec, dim: int | None = 2) -> Callable[..., nn.Module]:
    """The constructor ``spec`` names for inputs with ``dim`` spatial ranks (1, 2, 3, or
    None for "any rank", when the method has such a class)."""
    if isinstance(spec, nn.Module):
        raise TypeError(
            f"a norm spec is a name, a class or a functools.partial, got the layer instance "
            f"{spec!r}; pass its class ({type(spec).__name__}) or a functools.partial of it"
        )
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise TypeError(f"a norm spec is a name, a class or a functools.partial, got {spec!r}")
    key = _canonical(spec)
    family = _FAMILIES[key]
    if dim in family:
        return family[dim]
    if None in family:
        return family[None]
    wanted = "any rank" if dim is None else f"{dim}d inputs"
    raise ValueError(
        f"normalization '{spec}' has no layer for {wanted}; it has "
        f"{sorted(d for d in family if d is not None)}d layers: pass dim=1, 2 or 3"
    )


def build_norm(
    spec: NormSpec, num_features: int, *, dim: int | None = 2, **kwargs: Any
) -> nn.Module:
    """Build the norm layer ``spec`` for ``num_features`` channels.

    ``kwargs`` go to the constructor (``eps``, ``momentum``, ``affine``, ``device``,
    ``dtype``, and method options such as ``group_size`` or ``sync``).

    >>> build_norm("brn", 64, r_max=2.0)
    BatchRenorm2d(64, eps=1e-05, momentum=0.01, ...)
    """
    return resolve_norm(spec, dim)(num_features, **kwargs)


register_norm(
    "bn", _family(None, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), aliases=("batchnorm",)
)
register_norm("syncbn", {None: layers.SyncBatchNorm}, aliases=("sync_bn", "syncbatchnorm"))
register_norm(
    "brn",
    _family(layers.BatchRenorm, layers.BatchRenorm1d, layers.BatchRenorm2d, layers.BatchRenorm3d),
    aliases=("batchrenorm", "batch_renorm"),
)
register_norm(
    "ghostbn",
    _family(
        layers.GhostBatchNorm,
        layers.GhostBatchNorm1d,
        layers.GhostBatchNorm2d,
        layers.GhostBatchNorm3d,
    ),
    aliases=("ghost", "ghost_bn"),
)
register_norm(
    "frozenbn",
    _family(
        layers.FrozenBatchNorm,
        layers.FrozenBatchNorm1d,
        layers.FrozenBatchNorm2d,
        layers.FrozenBatchNorm3d,
    ),
    aliases=("frozen", "frozen_bn"),
)
register_norm(
    "domainbn",
    _family(
        layers.DomainBatchNorm,
        layers.DomainBatchNorm1d,
        layers.DomainBatchNorm2d,
        layers.DomainBatchNorm3d,
    ),
    aliases=("domain", "dsbn", "domain_bn"),
)
register_norm(
    "sn",
    _family(
        layers.SwitchableNorm,
        layers.SwitchableNorm1d,
        layers.SwitchableNorm2d,
        layers.SwitchableNorm3d,
    ),
    aliases=("switchable", "switchablenorm"),
)
register_norm(
    "mabn",
    _family(
        layers.MovingAverageBatchNorm,
        layers.MovingAverageBatchNorm1d,
        layers.MovingAverageBatchNorm2d,
        layers.MovingAverageBatchNorm3d,
    ),
    aliases=("moving_average_bn", "movingaveragebatchnorm"),
)
register_norm(
    "cbn",
    _family(
        layers.CrossIterationBatchNorm,
        layers.CrossIterationBatchNorm1d,
        layers.CrossIterationBatchNorm2d,
        layers.CrossIterationBatchNorm3d,
    ),
    aliases=("crossiteration", "cross_iteration", "crossiterationbatchnorm"),
)
register_norm(
    "shufflebn",
    _family(
        layers.ShuffleBatchNorm,
        layers.ShuffleBatchNorm1d,
        layers.ShuffleBatchNorm2d,
        layers.ShuffleBatchNorm3d,
    ),
    aliases=("shuffle", "shuffle_bn", "shufflebatchnorm"),
)
register_norm("gn", {None: layers.GroupNorm}, aliases=("groupnorm",))
register_norm("ln", {None: layers.LayerNorm}, aliases=("layernorm",))
register_norm("in", {None: layers.InstanceNorm}, aliases=("instancenorm",))
