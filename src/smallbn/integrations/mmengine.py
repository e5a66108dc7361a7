"""smallbn's layers in mmengine's (and so mmdet's, mmseg's) model registry.

>>> from mmengine.registry import MODELS
>>> smallbn.integrations.mmengine.register()            # once, before building
>>> norm = MODELS.build(dict(type="CBN", num_features=64))
>>> model = MODELS.build(cfg.model)                      # norm_cfg=dict(type="MABN") anywhere
>>> smallbn.bind_producers(model)                        # CBN/MABN find their convs

The registered classes are the rank-agnostic ones (any input rank ≥ 2), constructed as
``cls(num_features, **options)`` as mmcv's ``build_norm_layer`` does; each gets mmcv's
``_abbr_`` (the name prefix ``build_norm_layer`` gives the layer).  CBN and MABN need the conv
that feeds them: after the config-built model exists, :func:`smallbn.bind_producers` pairs
them (one call).
"""

from __future__ import annotations

from typing import Any

from smallbn.integrations import FRAMEWORK_NAMES
from smallbn.registry import resolve_norm

__all__ = ["register"]


def register(registry: Any = None, *, force: bool = False) -> dict[str, type]:
    """Register every smallbn method under its mmcv-style name (:data:`FRAMEWORK_NAMES`:
    ``"CBN"``, ``"MABN"``, ``"SN"``, ``"BRN"``, ``"GhostBN"``, ``"FrozenBN"``,
    ``"DomainBN"``, ``"SmallbnSyncBN"``) in ``registry`` (default: mmengine's ``MODELS``).

    Returns name → class.  A name already taken by another class is an error unless
    ``force`` (registering the same classes again is a no-op, so repeated calls are safe).
    """
    if registry is None:
        from mmengine.registry import MODELS

        registry = MODELS
    registered: dict[str, type] = {}
    for name, method in FRAMEWORK_NAMES.items():
        cls = resolve_norm(method, None)
        assert isinstance(cls, type)
        if getattr(cls, "_abbr_", None) is None:
            cls._abbr_ = "bn" if method != "sn" else "sn"  # type: ignore[attr-defined]
        taken = registry.get(name) if name in registry.module_dict else None
        if taken is not None and taken is not cls and not force:
            raise KeyError(
                f"smallbn.integrations.mmengine.register: {registry.name!r} already has "
                f"{name!r} ({taken.__module__}.{taken.__qualname__}); pass force=True to "
                f"replace it with smallbn's {cls.__name__}, or register into another registry"
            )
        if taken is not cls:
            registry.register_module(name=name, module=cls, force=force or taken is not None)
        registered[name] = cls
    return registered
