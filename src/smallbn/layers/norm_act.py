"""Norm layers with the dropout and activation that follow them inside one module.

timm's ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, CSPNet and the timm encoders of
segmentation_models_pytorch) is a ``BatchNorm2d`` subclass whose forward is

    y = act(drop(BN(x))),

with ``drop`` and ``act`` child modules, so that its ``state_dict`` keeps BN's keys.  Replacing
it by a plain norm would silently drop the activation.  :func:`with_activation` gives, for any
norm class, the subclass that does the same around that norm's own forward; its instances hold
``drop`` and ``act`` as children under the same names, so a ``state_dict`` moves between the
timm layer and any converted one (``strict=True``) in both directions.

The classes are made on demand (one per norm class) and live in this module, so models that
contain them pickle and unpickle (:func:`__getattr__` rebuilds one in a fresh process).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

__all__ = ["NormActivation", "post_ops_of", "with_activation"]


class NormActivation:
    """Mixin: the norm's output goes through ``self.drop``, then ``self.act``."""

    drop: nn.Module
    act: nn.Module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return self.act(self.drop(y))

    def post_ops(self) -> nn.Module:
        """What follows the normalization: ``drop`` then ``act`` (what :func:`smallbn.fold`
        leaves in place of a folded norm)."""
        return nn.Sequential(self.drop, self.act)


_CLASSES: dict[type, type] = {}


def with_activation(norm_class: type) -> type:
    """The subclass of ``norm_class`` whose forward is ``act(drop(norm(x)))``."""
    if issubclass(norm_class, NormActivation):
        return norm_class
    cls = _CLASSES.get(norm_class)
    if cls is None:
        name = f"{norm_class.__name__}Act"
        cls = type(
            name,
            (NormActivation, norm_class),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{norm_class.__name__} followed by ``drop`` and ``act`` "
                f"(as timm's BatchNormAct2d).",
            },
        )
        _CLASSES[norm_class] = cls
        module = sys.modules[__name__]
        if not hasattr(module, name):
            setattr(module, name, cls)  # found by pickle under smallbn.layers.norm_act.<name>
    return cls


def __getattr__(name: str) -> type:
    """Rebuild ``<Norm>Act`` on first use in a fresh process (unpickling a model)."""
    if name.endswith("Act") and not name.startswith("_"):
        import torch.nn

        import smallbn.layers

        base = getattr(smallbn.layers, name[:-3], None) or getattr(torch.nn, name[:-3], None)
        if isinstance(base, type) and issubclass(base, nn.Module):
            return with_activation(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def post_ops_of(module: nn.Module) -> dict[str, nn.Module] | None:
    """``{"drop": …, "act": …}`` of a norm that applies them after normalizing (a
    :class:`NormActivation`, or timm's ``*NormAct*`` layers: a norm subclass with ``drop``
    and ``act`` child modules), else ``None``."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return {"drop": drop, "act": act}
    return None
