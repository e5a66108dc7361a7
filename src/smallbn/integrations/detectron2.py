"""A detectron2-style ``get_norm``: detectron2's names plus smallbn's methods.

detectron2 builds every norm through ``detectron2.layers.get_norm(norm, out_channels)``, where
``norm`` is a name from the config (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ...) or a
callable.  Passing :func:`get_norm` as that callable, or patching the name map, brings
smallbn's methods into a detectron2 model::

    from detectron2.modeling.backbone import resnet
    import smallbn.integrations.detectron2 as sbn_d2

    cfg.MODEL.RESNETS.NORM = lambda channels: sbn_d2.get_norm("CBN", channels)
    model = build_model(cfg)
    smallbn.bind_producers(model)       # CBN/MABN find their convs

detectron2 cannot be installed here; this module does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from smallbn.integrations import FRAMEWORK_NAMES
from smallbn.registry import build_norm

__all__ = ["NAMES", "get_norm"]

#: detectron2's own names → (smallbn method, fixed options), then smallbn's (FRAMEWORK_NAMES).
NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "BN": ("bn", {}),
    "SyncBN": ("syncbn", {"sync": True}),
    "naiveSyncBN": ("syncbn", {"sync": True}),
    "nnSyncBN": ("syncbn", {"sync": True}),
    "FrozenBN": ("frozenbn", {}),
    "GN": ("gn", {"num_groups": 32}),
    **{name: (method, {}) for name, method in FRAMEWORK_NAMES.items() if name != "FrozenBN"},
}


def get_norm(norm: str | Callable[[int], nn.Module] | None, out_channels: int) -> nn.Module | None:
    """The norm layer ``norm`` names for ``out_channels`` channels (2d inputs), as
    detectron2's ``get_norm``: ``None`` or ``""`` give ``None`` (no norm), a callable is
    called with the channel count."""
    if norm is None or norm == "":
        return None
    if callable(norm):
        return norm(out_channels)
    if norm not in NAMES:
        raise KeyError(
            f"get_norm: unknown norm {norm!r}; known: {', '.join(sorted(NAMES))} (or pass a "
            f"callable channels -> module)"
        )
    method, options = NAMES[norm]
    return build_norm(method, out_channels, dim=2, **options)
