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
* **sequential** (fallback, when tracing fails, e.g. on data-dependent control flow such as
  ``if x.sum() > 0``): consecutive children of ``nn.Sequential`` containers, producer
  immediately followed by target.  Inside ``nn.Sequential.forward`` a child's output goes to
  the next child only, but a forward that cannot be traced may still call the producer
  elsewhere; the fallback cannot see such uses, so it is restricted to ``nn.Sequential``
  containers, where they would be unusual.

Modules that are called more than once, or registered under several names (shared), are
excluded in both methods: rewriting one would change every place that uses it.

This module is part of the core: it imports only torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
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

Method = Literal["fx", "sequential"]


@dataclass(frozen=True)
class ProducerSearch:
    """The result of :func:`trace_producers`.

    Attributes:
        producers: target name → producer name, for every target that has a foldable producer.
        unpaired: target name → why it has none (for reports), for every other target.
        method: ``"fx"`` when the whole forward was traced; ``"sequential"`` when tracing
            failed and only ``nn.Sequential`` neighbours were paired (callers may warn that
            targets inside other modules were not examined).
        trace_error: the tracing error that triggered the fallback, else ``None``.
    """

    producers: dict[str, str]
    unpaired: dict[str, str] = field(default_factory=dict)
    method: Method = "fx"
    trace_error: str | None = None


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
    ) -> None:
        super().__init__()
        self._is_target = is_target
        self._producer_types = producer_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            self._is_target(m)
            or _is_producer(m, self._producer_types)
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
) -> ProducerSearch:
    modules = dict(model.named_modules())
    aliases = _aliases(model)
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


def _sequential_children(model: nn.Module) -> Iterable[tuple[str, list[tuple[str, nn.Module]]]]:
    for name, module in model.named_modules():
        # A subclass that overrides forward may route children's outputs anywhere.
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            prefix = f"{name}." if name else ""
            # _modules, not named_children(): a module placed twice in the sequence (a shared
            # activation) must stay between its neighbours, or they would look adjacent.
            children = [(prefix + c, m) for c, m in module._modules.items() if m is not None]
            yield name, children


def _pair_sequential(
    model: nn.Module,
    targets: dict[str, nn.Module],
    producer_types: tuple[type[nn.Module], ...],
    error: str,
) -> ProducerSearch:
    aliases = _aliases(model)
    producers: dict[str, str] = {}
    for _, children in _sequential_children(model):
        for (producer_name, producer), (target_name, target) in zip(
            children, children[1:], strict=False
        ):
            if (
                target_name in targets
                and _is_producer(producer, producer_types)
                and len(aliases[id(producer)]) == 1
                and len(aliases[id(target)]) == 1
            ):
                producers[target_name] = producer_name
    unpaired: dict[str, str] = {}
    for name, module in targets.items():
        if name in producers:
            continue
        if len(aliases[id(module)]) > 1:
            unpaired[name] = _several_names(name, aliases[id(module)])
        else:
            unpaired[name] = (
                "fx tracing failed and it does not directly follow an unshared producer "
                "in an nn.Sequential"
            )
    return ProducerSearch(producers, unpaired, "sequential", error)


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
        the method used (``"fx"``, or ``"sequential"`` when tracing failed).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        # Their forward cannot be traced; the wrapped module's can, under the prefix "module."
        inner = trace_producers(model.module, is_target, producer_types=producer_types)
        return ProducerSearch(
            {f"module.{t}": f"module.{p}" for t, p in inner.producers.items()},
            {f"module.{t}": why for t, why in inner.unpaired.items()},
            inner.method,
            inner.trace_error,
        )
    targets = _targets(model, is_target)
    tracer = _LeafTracer(is_target, producer_types)
    try:
        graph = tracer.trace(model)
    except Exception as error:
        # fx raises TraceError, TypeError, RuntimeError, ... from user code: all mean that
        # this forward cannot be traced symbolically, not that the model is broken.
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return _pair_sequential(model, targets, producer_types, message)
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
