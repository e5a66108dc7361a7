"""smallbn inside the frameworks people train with: mmengine/mmdet registries
(:mod:`smallbn.integrations.mmengine`), a detectron2-style ``get_norm``
(:mod:`smallbn.integrations.detectron2`) and a Lightning PreciseBN callback
(:mod:`smallbn.integrations.lightning`).

Each submodule imports its framework only when used; smallbn itself needs none of them.
timm needs no adapter: ``timm.create_model(name, norm_layer=smallbn.resolve_norm("cbn"))``
takes smallbn's classes and partials like torch's (README, "In other frameworks").
"""

from __future__ import annotations

#: mmcv/detectron2-style names of smallbn's methods, and the registry names they stand for.
#: Torch's own layers keep the frameworks' names ("BN", "SyncBN", "GN", ...); smallbn's
#: cross-process BN (which also syncs on CPU/gloo) is "SmallbnSyncBN".
FRAMEWORK_NAMES: dict[str, str] = {
    "CBN": "cbn",
    "MABN": "mabn",
    "SN": "sn",
    "BRN": "brn",
    "GhostBN": "ghostbn",
    "FrozenBN": "frozenbn",
    "DomainBN": "domainbn",
    "SmallbnSyncBN": "syncbn",
}

__all__ = ["FRAMEWORK_NAMES"]
