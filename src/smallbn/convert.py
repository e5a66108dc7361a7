"""Swap the normalization layers of any model for another method, keeping their state.

:func:`convert` replaces every torch BatchNorm (``_BatchNorm`` subclasses, SyncBatchNorm
included) and every smallbn layer in a model of any nesting by the layer a spec names,
keeping ``eps``/``momentum``/``affine``/``track_running_stats`` unless the spec (a
``functools.partial``) or the keyword arguments set them, the affine parameters (the same
``nn.Parameter`` objects where both sides have parameters of one dtype, device and shape, so
an optimizer built earlier keeps working) and the running statistics.  A BN's ``(C,)`` γ, β
go to every domain of a domain BN built with ``per_domain_affine=True``; its ``(D, C)`` γ, β
go back to a ``(C,)`` layer only for a domain named by ``source_domain``.  ``convert(model, "bn")``
returns to torch's layers.  A layer registered under several names becomes one new layer;
every replacement is built before any is installed, so a failed convert changes nothing.
Forward hooks registered on the old layers do not carry over.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn.graph import trace_producers
from smallbn.layers import BatchStatsNorm, GroupedNorm, NormBase
from smallbn.layers.norm_act import NormActivation, post_ops_of, with_activation
from smallbn.registry import NormSpec, resolve_norm

__all__ = [
    "ConversionWarning",
    "ConvertReport",
    "Converted",
    "Kept",
    "bind_producers",
    "convert",
    "convert_with_report",
    "freeze_norms",
    "is_frozen_batch_norm",
    "is_norm_layer",
    "uses_batch_stats",
]

_TORCH_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
# torch BN classes whose forward is BatchNorm's own: a subclass that overrides it adds
# behaviour (timm's BatchNormAct2d: an activation) that a plain replacement would drop.
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


class ConversionWarning(UserWarning):
    """:func:`convert` changed what a model computes, or could not carry a layer's state over
    (the warning names the layers and says what to do)."""


@dataclass(frozen=True)
class Kept:
    """A norm-like layer :func:`convert` left in place, and why."""

    name: str
    kind: str
    reason: str


class ConvertReport(list["Converted"]):
    """What :func:`convert_with_report` replaced (the list itself, one :class:`Converted` per
    layer), what it kept (:attr:`kept`), and the producer pairing (:attr:`producers`: layer
    name → producer name or ``None``, for the layers that need one)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Kept] = []
        self.producers: dict[str, str | None] = {}

    def summary(self) -> str:
        """One paragraph: counts, then every kept layer and every unpaired one with why."""
        lines = [f"replaced {len(self)} norm layer(s), kept {len(self.kept)}"]
        lines += [f"  kept '{k.name}' ({k.kind}): {k.reason}" for k in self.kept]
        if self.producers:
            paired = sum(p is not None for p in self.producers.values())
            lines.append(f"paired {paired} of {len(self.producers)} with their producer")
            lines += [f"  unpaired '{n}'" for n, p in self.producers.items() if p is None]
        return "\n".join(lines)


@dataclass(frozen=True)
class Converted:
    """One replaced layer: its path in the model, the class names before and after, and
    what the replacement does not carry over (empty when the eval function is kept)."""

    name: str
    source: str
    target: str
    note: str = ""


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (every pretrained detection backbone), detectron2's
    and timm's (``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``): BN's statistics and affine
    held as 1-D buffers, the eval forward BN's, and no Parameters."""
    if isinstance(module, (_BatchNorm, NormBase)) or "FrozenBatchNorm" not in type(module).__name__:
        return False
    names = ("weight", "bias", "running_mean", "running_var")
    buffers = [module._buffers.get(name) for name in names]
    return (
        all(isinstance(b, Tensor) and b.dim() == 1 for b in buffers)
        and len({b.numel() for b in buffers if b is not None}) == 1
        and not module._parameters
    )


def is_norm_layer(module: nn.Module) -> bool:
    """True for the layers :func:`convert` replaces: torch BatchNorms (SyncBatchNorm and
    subclasses included), frozen BNs (:func:`is_frozen_batch_norm`) and smallbn layers."""
    return isinstance(module, (_BatchNorm, NormBase)) or is_frozen_batch_norm(module)


#: Norms that are not BN and that convert keeps, with the reason the report gives.
_KEPT_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.GroupNorm, "a batch-independent norm (torch GroupNorm): no batch statistics to replace"),
    (nn.LayerNorm, "a batch-independent norm (torch LayerNorm): no batch statistics to replace"),
    (
        nn.modules.instancenorm._InstanceNorm,
        "a batch-independent norm (torch InstanceNorm): no batch statistics to replace",
    ),
)


def _kept_reason(module: nn.Module) -> str | None:
    for kind, reason in _KEPT_KINDS:
        if isinstance(module, kind):
            return reason
    if "Norm" in type(module).__name__ and not list(module.children()):
        # e.g. timm's LayerNorm2d subclasses nn.LayerNorm (above); anything else named a norm
        return "not a BatchNorm (convert replaces BN-family layers and smallbn layers only)"
    return None


def _input_dim(module: nn.Module) -> int | None:
    for cls, dim in _TORCH_DIMS.items():
        if isinstance(module, cls):
            return dim
    if is_frozen_batch_norm(module):  # FrozenBatchNorm2d, ...: the rank is in the name
        for dim in (1, 2, 3):
            if f"{dim}d" in type(module).__name__.lower():
                return dim
    return module.input_dim() if isinstance(module, NormBase) else None


def _factory(module: nn.Module) -> dict[str, Any]:
    tensors = [*module.parameters(), *module.buffers()]
    tensor = next((t for t in tensors if t.is_floating_point()), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _statistic(value: Tensor, target_shape: torch.Size, domain: int) -> Tensor:
    """Map a running statistic between BN's ``(C,)`` and domain BN's ``(D, C)`` shapes."""
    if value.shape == target_shape:
        return value
    if value.dim() == 2 and len(target_shape) == 1:
        return value[domain]
    if value.dim() == 1 and len(target_shape) == 2:
        return value.unsqueeze(0).expand(target_shape)
    raise ValueError(
        f"cannot map running statistics of shape {tuple(value.shape)} to "
        f"{tuple(target_shape)}; convert to 'bn' first (source_domain picks the domain whose "
        f"statistics it keeps), then to the new number of domains"
    )


def _affine_parameter(value: Tensor, target_shape: torch.Size, domain: int, chosen: bool) -> Tensor:
    """Map γ or β between BN's ``(C,)`` and the ``(D, C)`` of a domain BN built with
    ``per_domain_affine=True``: ``(C,)`` goes to every domain; ``(D, C)`` to ``(C,)`` only for
    a domain the caller chose (``source_domain``), never the active one silently: one
    domain's γ, β would change what every other domain computes."""
    if value.shape == target_shape:
        return value
    if value.dim() == 1 and len(target_shape) == 2:
        return value.unsqueeze(0).expand(target_shape)
    if value.dim() == 2 and len(target_shape) == 1 and value.shape[1] == target_shape[0]:
        if chosen:
            return value[domain]
        raise ValueError(
            f"it has a separate affine per domain (per_domain_affine=True: γ and β of shape "
            f"{tuple(value.shape)}), and the new layer has one affine of shape "
            f"{tuple(target_shape)}: keeping one domain's would change the output of the "
            f"others. Pass source_domain=d (to smallbn.convert) to keep the statistics and the "
            f"affine of domain d, or convert to 'domainbn' with per_domain_affine=True to keep "
            f"every domain's"
        )
    raise ValueError(
        f"cannot map an affine (γ, β) of shape {tuple(value.shape)} to "
        f"{tuple(target_shape)}; convert to 'bn' first (source_domain picks the domain whose "
        f"statistics and affine it keeps), then to the new number of domains"
    )


def _transfer_state(
    source: nn.Module, target: nn.Module, domain: int, chosen: bool = False
) -> None:
    """Copy ``source``'s affine and running statistics into ``target``, mapping between BN's
    ``(C,)`` and domain BN's ``(D, C)`` shapes; ``domain`` is the domain a domain BN hands
    on to a ``(C,)`` layer, ``chosen`` whether the caller named it (``source_domain``)."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            param, dst = getattr(source, name, None), getattr(target, name, None)
            if param is None or dst is None:
                continue
            same_kind = param.dtype == dst.dtype and param.device == dst.device
            same_kind = same_kind and param.shape == dst.shape  # not per domain on one side
            if isinstance(param, nn.Parameter) and isinstance(dst, nn.Parameter) and same_kind:
                setattr(target, name, param)  # an optimizer built earlier keeps working
            else:  # e.g. convert(..., dtype=torch.float64): the new layer's own parameter
                dst.copy_(_affine_parameter(param, dst.shape, domain, chosen))
        for name in ("running_mean", "running_var"):
            src, dst = getattr(source, name, None), getattr(target, name, None)
            if src is not None and dst is not None:
                dst.copy_(_statistic(src, dst.shape, domain))
        src, dst = (
            getattr(source, "num_batches_tracked", None),
            getattr(target, "num_batches_tracked", None),
        )
        if src is not None and dst is not None:
            dst.copy_(src)


def _post_ops(name: str, module: nn.Module) -> dict[str, nn.Module] | None:
    """The modules a norm applies after normalizing, to be kept around its replacement; an
    error for a BN subclass whose forward adds something smallbn cannot carry over."""
    if isinstance(module, NormActivation) or is_frozen_batch_norm(module):
        return post_ops_of(module)  # timm's FrozenBatchNormAct2d has drop/act
    if isinstance(module, NormBase):  # smallbn's own forward (some are _BatchNorm too)
        return None
    if not isinstance(module, _BatchNorm) or type(module).forward in _BN_FORWARDS:
        return None
    post = post_ops_of(module)
    if post is None:
        raise ValueError(
            f"convert: cannot replace '{name}' ({type(module).__name__}): its class overrides "
            f"BatchNorm's forward, so a replacement would silently drop what that forward "
            f"adds. Leave it as it is with convert(..., where=lambda name, m: name != "
            f"'{name}'), or replace it yourself with a module that keeps its behaviour "
            f"(smallbn keeps the 'drop' and 'act' of timm-style *NormAct* layers)."
        )
    return post


def _lost_on_conversion(source: nn.Module, target: nn.Module) -> str:
    """What the eval function of ``source`` loses in ``target`` (empty if nothing)."""
    lost = source.lost_on_replacement(target) if isinstance(source, NormBase) else ""
    if lost:
        return lost
    has_population = (
        source.holds_population_statistics()
        if isinstance(source, NormBase)
        else uses_batch_stats(source) or is_frozen_batch_norm(source)
    )
    if uses_batch_stats(target) and not has_population:
        return (
            f"{type(source).__name__} keeps no population statistics, so the new layer starts "
            f"from the running statistics it held (0 and 1 unless it replaced a BN): run "
            f"smallbn.precise_bn (or train) before evaluating"
        )
    return ""


def _replacement(
    name: str,
    module: nn.Module,
    spec: NormSpec,
    dim: int | None,
    kwargs: dict[str, Any],
    fallback_factory: dict[str, Any],
) -> nn.Module:
    post = _post_ops(name, module)
    source_dim = _input_dim(module) or dim
    source: Any = module  # a torch BN or a smallbn layer: both have BN's attributes
    inherited: dict[str, Any] = {  # frozen BNs have eps only: BN's defaults for the rest
        "eps": float(getattr(source, "eps", 1e-5)),
        "momentum": getattr(source, "momentum", 0.1),
        "affine": getattr(source, "affine", True),
        "track_running_stats": getattr(source, "track_running_stats", True),
        **(_factory(module) or fallback_factory),
    }
    if inherited["affine"] and getattr(source, "bias", None) is None:
        # nn.BatchNorm2d(C, bias=False): γ without β.  Passed only when set, so targets
        # without the keyword (torch < 2.6's BN) still convert layers that have a bias.
        inherited["bias"] = False
    if isinstance(spec, functools.partial):  # the partial's own options beat the old layer's
        inherited = {k: v for k, v in inherited.items() if k not in spec.keywords}
    options = {**inherited, **kwargs}
    try:
        if (
            isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and source.has_uninitialized_params()
        ):
            raise ValueError(
                "its channel count is not known yet (a lazy layer); run one forward pass "
                "before converting"
            )
        requested = options.pop("source_domain", None)
        domain = _source_domain(module, requested)
        channels = getattr(source, "num_features", None) or source.running_mean.numel()
        target = resolve_norm(spec, source_dim)(channels, **options)
        _transfer_state(module, target, domain, chosen=requested is not None)
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise type(error)(
            f"convert: cannot replace '{name}' ({type(module).__name__}): {error}"
        ) from error
    if post is not None:
        # The new norm inside the same drop/act (timm's BatchNormAct2d: BN, drop, act); the
        # children keep their names, so the state_dict keys are the source's.
        target.__class__ = with_activation(type(target))
        for child_name, child in post.items():
            setattr(target, child_name, child)
    target.train(module.training)
    if isinstance(target, NormBase):
        target.model_path = name
        if target.input_dim() is None:
            target.replaced_input_dim = source_dim
    return target


def _source_domain(module: nn.Module, requested: Any) -> int:
    """The domain whose statistics a domain-specific layer hands on (its active one unless
    ``source_domain`` says otherwise); 0 for other layers."""
    domains = getattr(module, "num_domains", None)
    if requested is None:
        return int(getattr(module, "active_domain", 0))
    domain = int(requested)
    if domains is not None and not 0 <= domain < domains:
        raise ValueError(
            f"source_domain={domain} is out of range for {domains} domains; pass "
            f"0 <= source_domain < {domains}"
        )
    return domain


def convert_with_report(
    model: nn.Module,
    spec: NormSpec,
    *,
    dim: int | None = None,
    where: Callable[[str, nn.Module], bool] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, ConvertReport]:
    """:func:`convert`, also returning a :class:`ConvertReport`: what was replaced (the list),
    what was kept and why, and how the layers that need a producer were paired."""
    fallback_factory = _factory(model)
    replacements: dict[int, nn.Module] = {}  # a layer registered under several names
    report = ConvertReport()
    installs: list[tuple[nn.Module, str, nn.Module]] = []
    released: list[nn.Module] = []  # centred convs of replaced MABN layers, made plain

    def plan(module: nn.Module, prefix: str) -> nn.Module | None:
        """The replacement of ``module`` if it is a selected norm; otherwise recurse."""
        name = prefix or "<root>"
        if is_norm_layer(module) and where is not None and not where(name, module):
            report.kept.append(Kept(name, type(module).__name__, "not selected by where="))
            return None
        if not is_norm_layer(module):
            reason = _kept_reason(module)
            if reason is not None:
                report.kept.append(Kept(name, type(module).__name__, reason))
                return None
        if is_norm_layer(module):
            if id(module) not in replacements:
                new = _replacement(name, module, spec, dim, kwargs, fallback_factory)
                replacements[id(module)] = new
                note = _lost_on_conversion(module, new)
                report.append(Converted(name, type(module).__name__, type(new).__name__, note))
                if isinstance(module, NormBase):
                    installed = module.release_producer(new)
                    if installed is not None:
                        released.append(installed)
            return replacements[id(module)]
        # _modules keeps a child registered under two names twice (named_children would not)
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = plan(child, f"{prefix}.{child_name}" if prefix else child_name)
            if new_child is not None:
                installs.append((module, child_name, new_child))
        return None

    # Every replacement is built before any is installed: an error leaves the model as it was.
    root = plan(model, "")
    plain = _plain_producers(model, released)
    for parent, child_name, new_child in installs:
        setattr(parent, child_name, new_child)
    for producer_name, conv in plain.items():
        _set_submodule(model, producer_name, conv.to_plain(in_place=True))  # type: ignore[operator]
    model = model if root is None else root
    report.producers = bind_producers(model)
    _warn_lost(report)
    if not report:
        excluded = sum(k.reason == "not selected by where=" for k in report.kept)
        kinds = sorted({k.kind for k in report.kept})
        found = f" (norm layers it has: {', '.join(kinds)})" if kinds else ""
        why = (
            f"where= selected none of its {excluded} BatchNorm-family layer(s)"
            if excluded
            else f"it has no BatchNorm-family layer{found}; batch-independent norms "
            f"(GroupNorm, LayerNorm) need no small-batch method"
        )
        warnings.warn(
            f"convert: replaced no layer of {type(model).__name__}: {why}. Check that this "
            f"is the model you meant.",
            ConversionWarning,
            stacklevel=3,
        )
    return model, report


def _plain_producers(model: nn.Module, released: list[nn.Module]) -> dict[str, nn.Module]:
    """Path → centred conv, for the convs released by replaced MABN layers that are still in
    the model (each becomes a plain conv holding its centred weight: the same function)."""
    wanted = {id(m) for m in released}
    return {name: m for name, m in model.named_modules() if name and id(m) in wanted}


def _warn_lost(report: list[Converted]) -> None:
    """One :class:`ConversionWarning` per kind of loss, naming the layers."""
    by_note: dict[str, list[str]] = {}
    for item in report:
        if item.note:
            by_note.setdefault(item.note, []).append(f"'{item.name}' ({item.source})")
    for note, names in by_note.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"convert: for {shown}, {note} (convert_with_report lists every layer).",
            ConversionWarning,
            stacklevel=4,
        )


def bind_producers(model: nn.Module) -> dict[str, str | None]:
    """Give every layer that asks for it (``wants_producer``: Cross-Iteration BN, MABN) the
    conv/linear module producing its input, found by tracing the model
    (:func:`smallbn.graph.trace_producers`); install the replacements layers return (MABN's
    weight-centred convs).  :func:`convert` calls this; call it yourself after building a
    model whose layers come from :func:`smallbn.build_norm`.  Returns layer name → producer
    name (``None`` where none was found)."""
    # A GroupedNorm is traced as one opaque module standing for the layer it wraps (its
    # per-group loop cannot be traced symbolically).
    wrapped = {
        f"{name}.norm": name
        for name, m in model.named_modules()
        if isinstance(m, GroupedNorm) and getattr(m.norm, "wants_producer", False)
    }
    layers = {
        wrapped.get(name, name): model.get_submodule(wrapped.get(name, name))
        for name, m in model.named_modules()
        if getattr(m, "wants_producer", False)
    }
    if not layers:
        return {}
    # Every norm is a target, so that fx keeps each one whole: tracing into another smallbn
    # layer's forward (its input checks) would fail and fall back to the weaker search.
    search = trace_producers(model, lambda m: is_norm_layer(m) or isinstance(m, GroupedNorm))
    modules = dict(model.named_modules())
    current_modules = {id(m) for m in modules.values()}
    bound: dict[str, str | None] = {}
    for name, found in layers.items():
        layer: Any = found.norm if isinstance(found, GroupedNorm) else found
        producer_name = search.producers.get(name)
        producer = modules[producer_name] if producer_name is not None else None
        previous = getattr(layer, "producer", None)
        if producer is None and search.method != "fx" and id(previous) in current_modules:
            # The fallback search sees less than fx did when this layer was bound: keep the
            # binding (and CBN's window of derivatives) rather than drop it.
            bound[name] = next(n for n, m in modules.items() if m is previous)
            continue
        note = None if producer is not None else search.unpaired.get(name, "no producer found")
        replacement = layer.bind_producer(producer, note)
        if replacement is not None and producer_name is not None:
            _set_submodule(model, producer_name, replacement)
        bound[name] = producer_name
    changed = [
        name for name, found in layers.items() if getattr(found, "producer_changed_function", False)
    ]
    if changed:
        shown = ", ".join(f"'{n}'" for n in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        warnings.warn(
            f"MABN centres the weights of the convs before {shown}{more} (weight "
            f"centralization, Yan et al. 2020): each kernel's mean is subtracted in every "
            f"forward, so convs with pretrained weights now compute something else until "
            f"fine-tuned. Expected when training from scratch; to keep a conv as it is, "
            f"convert with center_producer=False. convert(model, 'bn') later gives plain "
            f"convs holding the centred weights.",
            ConversionWarning,
            stacklevel=3,
        )
    return bound


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert(
    model: nn.Module,
    spec: NormSpec,
    *,
    dim: int | None = None,
    where: Callable[[str, nn.Module], bool] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Replace every norm layer of ``model`` (in place) by ``spec``; returns the model.

    Args:
        spec: a registered name, class or ``functools.partial`` (see :mod:`smallbn.registry`).
        dim: input dimensionality for rank-agnostic sources; inferred from the layers.
        where: ``where(name, layer)`` selects the layers to replace (default: every one).
        kwargs: constructor options for the new layers (override the old layers' ``eps``,
            ``momentum``, ...); ``source_domain`` picks the statistics a domain-specific
            layer hands on (default its active domain).

    The root module itself is replaced (and returned) when it is a norm layer.
    """
    return convert_with_report(model, spec, dim=dim, where=where, **kwargs)[0]


def uses_batch_stats(module: nn.Module) -> bool:
    """True for layers that normalize with batch statistics in training and keep running
    statistics: torch's BatchNorm/SyncBatchNorm and smallbn's :class:`BatchStatsNorm`."""
    return (
        (
            isinstance(module, _BatchNorm)
            and not isinstance(module, NormBase)
            or isinstance(module, BatchStatsNorm)
        )  # smallbn's FrozenBN is a _BatchNorm too
        and bool(module.track_running_stats)
        and module.running_mean is not None
    )


def freeze_norms(model: nn.Module) -> nn.Module:
    """Replace every batch-statistics layer whose eval output is BN's per-channel affine map
    (BN, SyncBN, BRN, Ghost, domain BN, CBN, MABN) by a FrozenBatchNorm holding its current
    running statistics and affine, so it computes what the layer computes in eval mode.

    Left alone: batch-independent norms (GN, LN, IN), and Switchable Norm unless it is pure
    BN (its eval output mixes each sample's own IN/LN statistics with the running BN ones,
    which no fixed affine map reproduces).  A domain BN with ``per_domain_affine=True`` is
    refused (a ValueError naming it): a FrozenBN would keep one domain's γ, β; convert it with
    ``source_domain`` to choose the domain."""

    def frozen_equals_eval(layer: nn.Module) -> bool:
        return uses_batch_stats(layer) and (
            not isinstance(layer, NormBase) or layer.eval_affine() is not None
        )

    return convert(model, "frozenbn", where=lambda _, layer: frozen_equals_eval(layer))
