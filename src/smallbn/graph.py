"""Which module produced a layer's input: the dataflow question behind norm folding and
Cross-Iteration BN.

Folding an eval-mode norm ``y = a ⊙ z + b`` into the convolution ``z = W x + c`` that feeds
it (at inference BN "is simply a linear transform", Ioffe & Szegedy, ICML 2015, §3.1; Jacob
et al., CVPR 2018, §3.2 fold it into the weights) rewrites that convolution, so it is only
correct when nothing else reads ``z``.  Cross-Iteration BN (Yao et al., CVPR 2021) needs the
same pairing: its Taylor compensation differentiates the statistics with respect to the
weights of the layer that produced the norm's input.

:func:`trace_producers` answers, for every *target* module (a norm), whether its input is the
output of a *producer* (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear``) that has no
other consumer, and if not, why:

* **fx** (primary): :mod:`torch.fx` symbolic tracing with targets and producers as leaves.
  A target qualifies when it is called once, with its input as the only argument, and that
  input is the output of a single call of a producer whose output has exactly one user.
  This sees every consumer in the traced ``forward`` (residual branches, returned values).
* **fx, per submodule** (when the whole forward cannot be traced, e.g. data-dependent control
  flow such as ``if x.sum() > 0`` at the top of a detection or segmentation model): each
  child of an untraceable module is traced on its own, recursively, so every norm whose
  producer sits in the same traceable submodule is paired as the whole-model trace would
  pair it (a producer output that leaves the submodule counts as used elsewhere).  An
  untraceable module is traced once more with each of its children kept whole (one opaque
  call each): it is often untraceable only because of a child, e.g. timm's ``Conv2dSame``
  pads by the input's shape, and its own dataflow still pairs the norms it calls directly.
  Norms directly inside a module whose own forward cannot be traced stay unpaired, with the
  reason.  This assumes that
  a submodule is run through its ``forward``: a parent that calls a submodule's children one
  by one, bypassing that forward, can make a pair wrong, which no trace of the parent can
  show (callers warn that the result comes from submodules).

Modules that are called more than once, or registered under several names (shared), are
excluded in both methods: rewriting one would change every place that uses it.

This module is part of the core: it imports only torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch.fx
from torch import nn

__all__ = [
    "PRODUCER_TYPES",
    "ProducerSearch",
    "find_producers",
    "trace_producers",
]

#: The layers whose output is a per-output-channel linear map ``W x + c`` of their input.
#: Matched by exact type: a subclass may transform its weight in ``forward`` (weight
#: standardization, parametrizations), which a rewrite of the stored weight would not survive.
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

Method = Literal["fx", "submodules"]


@dataclass(frozen=True)
class ProducerSearch:
    """The result of :func:`trace_producers`.

    Attributes:
        producers: target name → producer name, for every target that has a foldable producer.
        unpaired: target name → why it has none (for reports), for every other target.
        method: ``"fx"`` when the whole forward was traced; ``"submodules"`` when it could
            not be and its traceable submodules were traced one by one (callers warn).
        trace_error: the first tracing error (of the whole model), else ``None``.
        untraced: the modules whose forward could not be traced (``"<root>"`` for the
            model), with the first line of each error.
    """

    producers: dict[str, str]
    unpaired: dict[str, str] = field(default_factory=dict)
    method: Method = "fx"
    trace_error: str | None = None
    untraced: dict[str, str] = field(default_factory=dict)


def _is_producer(module: nn.Module, producer_types: tuple[type[nn.Module], ...]) -> bool:
    return type(module) in producer_types


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(module)`` → every name it is registered under (several for a shared module)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _targets(model: nn.Module, is_target: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    # The root is excluded: nothing inside the model can produce the root's input.
    return {name: m for name, m in model.named_modules() if name and is_target(m)}


class _LeafTracer(torch.fx.Tracer):
    """An fx tracer that records targets and producers as single ``call_module`` nodes
    instead of tracing into them (a norm's forward has checks a Proxy cannot pass, and a
    producer must stay one node to be recognized)."""

    def __init__(
        self,
        is_target: Callable[[nn.Module], bool],
        producer_types: tuple[type[nn.Module], ...],
        leaves: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__()
        self._is_target = is_target
        self._producer_types = producer_types
        self._leaves = leaves  # ids of further modules to keep whole

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            self._is_target(m)
            or _is_producer(m, self._producer_types)
            or id(m) in self._leaves
            or super().is_leaf_module(m, module_qualified_name)
        )


def _several_names(name: str, aliases: list[str]) -> str:
    others = ", ".join(f"'{a}'" for a in aliases if a != name)
    return f"registered under several names (shared with {others})"


def _pair_fx(
    model: nn.Module,
    graph: torch.fx.Graph,
    targets: dict[str, nn.Module],
    producer_types: tuple[type[nn.Module], ...],
    aliases: dict[int, list[str]] | None = None,
) -> ProducerSearch:
    """Pairs within ``model`` traced as ``graph`` (names relative to ``model``); ``aliases``:
    every name of each module in the whole model, where ``model`` is a submodule of it."""
    modules = dict(model.named_modules())
    aliases = _aliases(model) if aliases is None else aliases
    calls: Counter[str] = Counter(
        str(node.target) for node in graph.nodes if node.op == "call_module"
    )
    producers: dict[str, str] = {}
    unpaired: dict[str, str] = {}
    target_nodes = {
        str(node.target): node
        for node in graph.nodes
        if node.op == "call_module" and str(node.target) in targets
    }
    for name, module in targets.items():
        node = target_nodes.get(name)
        if len(aliases[id(module)]) > 1:
            unpaired[name] = _several_names(name, aliases[id(module)])
        elif node is None:
            # never called, or called inside a module fx keeps whole (torch.nn's own modules)
            unpaired[name] = "not called by the traced forward (or only inside a leaf module)"
        elif calls[name] > 1:
            unpaired[name] = f"called {calls[name]} times in forward (shared)"
        elif len(node.args) != 1 or node.kwargs:
            # e.g. a domain id: the map it applies may depend on the extra arguments
            unpaired[name] = "called with arguments besides its input"
        else:
            source = node.args[0]
            reason = _producer_problem(source, modules, aliases, calls, producer_types)
            if reason is None:
                assert isinstance(source, torch.fx.Node)
                producers[name] = str(source.target)
            else:
                unpaired[name] = reason
    return ProducerSearch(producers, unpaired, "fx", None)


def _producer_problem(
    source: object,
    modules: dict[str, nn.Module],
    aliases: dict[int, list[str]],
    calls: Counter[str],
    producer_types: tuple[type[nn.Module], ...],
) -> str | None:
    """Why the node ``source`` is not a foldable producer output, or ``None`` if it is."""
    kinds = "/".join(t.__name__ for t in producer_types)
    if isinstance(source, torch.fx.Node) and source.op == "call_module":
        module = modules[str(source.target)]
        if (
            isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()
        ):
            return (
                f"input comes from the lazy module '{source.target}' "
                f"({type(module).__name__}), whose weights are not materialized yet: run one "
                f"forward pass first, then pair again (smallbn.bind_producers(model))"
            )
    if isinstance(source, torch.fx.Node) and source.op == "call_module":
        module = modules[str(source.target)]
        if isinstance(module, producer_types) and not _is_producer(module, producer_types):
            return (
                f"input comes from '{source.target}' ({type(module).__name__}), a subclass of "
                f"{type(module).__mro__[1].__name__} that may "
                f"transform its input or weight in its own forward (padding, weight "
                f"standardization), which a rewrite of its stored weight would not survive"
            )
    if not (
        isinstance(source, torch.fx.Node)
        and source.op == "call_module"
        and _is_producer(modules[str(source.target)], producer_types)
    ):
        what = source.format_node() if isinstance(source, torch.fx.Node) else repr(source)
        return f"input is not the output of a {kinds} module (it is: {what})"
    producer_name = str(source.target)
    producer = modules[producer_name]
    if len(aliases[id(producer)]) > 1:
        return f"producer '{producer_name}' is " + _several_names(
            producer_name, aliases[id(producer)]
        )
    if calls[producer_name] > 1:
        return f"producer '{producer_name}' is called {calls[producer_name]} times (shared)"
    if len(source.users) != 1:
        others = ", ".join(sorted(user.name for user in source.users))
        return f"output of producer '{producer_name}' is also used elsewhere (users: {others})"
    return None


def _trace_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _called_children(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The children ``module``'s forward can call: its children, with the contents of
    ``ModuleList``/``ModuleDict`` containers (which have no forward) in their place."""
    found: list[tuple[str, nn.Module]] = []
    for name, child in module._modules.items():
        if child is None:
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            found += _called_children(child, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", child))
    return found


def _trace_with_children_whole(
    module: nn.Module,
    is_target: Callable[[nn.Module], bool],
    producer_types: tuple[type[nn.Module], ...],
) -> torch.fx.Graph | None:
    """``module``'s own forward traced with each of its children as one opaque call, or
    ``None`` if even that fails.  A module is often untraceable only because of a child
    (timm's ``Conv2dSame`` pads by the input's shape); its own dataflow still pairs the norms
    it calls directly with the plain convs it calls directly."""
    children = frozenset(id(child) for _, child in _called_children(module))
    try:
        return _LeafTracer(is_target, producer_types, children).trace(module)
    except Exception:  # its own forward is untraceable too
        return None


def _pair_submodules(
    model: nn.Module,
    is_target: Callable[[nn.Module], bool],
    producer_types: tuple[type[nn.Module], ...],
    error: str,
) -> ProducerSearch:
    """Trace each child of an untraceable module on its own, recursively (module docstring)."""
    aliases = _aliases(model)
    producers: dict[str, str] = {}
    unpaired: dict[str, str] = {}
    untraced: dict[str, str] = {"<root>": error}
    tracer = _LeafTracer(is_target, producer_types)

    def pair_direct_calls(module: nn.Module, name: str) -> None:
        """For an untraceable ``module``: its dataflow between children, when that can be
        traced, pairs the norms it calls directly; those inside its children come from their
        own traces."""
        own = _trace_with_children_whole(module, is_target, producer_types)
        if own is None:
            return
        called = dict(_called_children(module))
        direct = {n: m for n, m in called.items() if is_target(m)}
        found = _pair_fx(module, own, direct, producer_types, aliases)
        prefix = f"{name}." if name else ""
        producers.update({f"{prefix}{t}": f"{prefix}{p}" for t, p in found.producers.items()})
        unpaired.update({f"{prefix}{t}": why for t, why in found.unpaired.items()})

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            if is_target(child) or _is_producer(child, producer_types):
                continue  # a leaf: paired, or not, by its parent's trace
            inner = {n: m for n, m in child.named_modules() if n and is_target(m)}
            if not inner:
                continue
            if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
                visit(child, f"{name}.")  # containers without a forward: their parent calls
                continue
            try:
                graph = tracer.trace(child)
            except Exception as child_error:  # as in trace_producers: untraceable user code
                untraced[name] = _trace_error(child_error)
                pair_direct_calls(child, name)
                visit(child, f"{name}.")
                continue
            found = _pair_fx(child, graph, inner, producer_types, aliases)
            producers.update({f"{name}.{t}": f"{name}.{p}" for t, p in found.producers.items()})
            unpaired.update({f"{name}.{t}": why for t, why in found.unpaired.items()})

    pair_direct_calls(model, "")
    visit(model, "")
    for name, module in _targets(model, is_target).items():
        if name in producers or name in unpaired:
            continue
        if len(aliases[id(module)]) > 1:
            unpaired[name] = _several_names(name, aliases[id(module)])
            continue
        parent = name.rpartition(".")[0] or "<root>"
        unpaired[name] = (
            f"the forward of '{parent}', which calls it, cannot be traced by torch.fx "
            f"({untraced.get(parent, error)})"
        )
    return ProducerSearch(producers, unpaired, "submodules", error, untraced)


def trace_producers(
    model: nn.Module,
    is_target: Callable[[nn.Module], bool],
    *,
    producer_types: tuple[type[nn.Module], ...] = PRODUCER_TYPES,
) -> ProducerSearch:
    """Pair every target module of ``model`` with the producer whose output is its input.

    Args:
        model: any module (``DataParallel``/``DistributedDataParallel`` wrappers are seen
            through); it is traced, never run.
        is_target: selects the modules to pair (e.g. :func:`smallbn.convert.is_norm_layer`).
        producer_types: the producer classes, matched by exact type.

    Returns:
        A :class:`ProducerSearch`: the pairs, the reason for each target left unpaired, and
        the method used (``"fx"``, or ``"submodules"`` when the whole model could not be
        traced).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        # Their forward cannot be traced; the wrapped module's can, under the prefix "module."
        inner = trace_producers(model.module, is_target, producer_types=producer_types)
        return ProducerSearch(
            {f"module.{t}": f"module.{p}" for t, p in inner.producers.items()},
            {f"module.{t}": why for t, why in inner.unpaired.items()},
            inner.method,
            inner.trace_error,
            {f"module.{n}" if n != "<root>" else n: why for n, why in inner.untraced.items()},
        )
    targets = _targets(model, is_target)
    tracer = _LeafTracer(is_target, producer_types)
    try:
        graph = tracer.trace(model)
    except Exception as error:
        # fx raises TraceError, TypeError, RuntimeError, ... from user code: all mean that
        # this forward cannot be traced symbolically, not that the model is broken.
        return _pair_submodules(model, is_target, producer_types, _trace_error(error))
    return _pair_fx(model, graph, targets, producer_types)


def find_producers(
    model: nn.Module,
    is_target: Callable[[nn.Module], bool],
    *,
    producer_types: tuple[type[nn.Module], ...] = PRODUCER_TYPES,
) -> dict[str, str]:
    """Target name → name of the producer module whose output is its only input and is used
    nowhere else (see :func:`trace_producers`, which also says how it was found and why
    other targets were not paired)."""
    return trace_producers(model, is_target, producer_types=producer_types).producers
