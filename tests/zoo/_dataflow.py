"""Which norms of a model are fed by a producer that nothing else reads, found by *running*
the model: the ground truth the zoo checks smallbn's producer search against (fold, CBN's
producer binding, MABN's centred convs), independent of torch.fx.

One eval forward is run with forward hooks on every BN-like module and every producer
(``smallbn.graph.PRODUCER_TYPES``, matched by exact type as smallbn matches them) and a
``TorchFunctionMode`` that counts, outside the forwards of those modules, every torch call
that reads a producer's output.  A norm is *foldable* when it was called once, its input was
the output of a producer called once, and nothing but the norm read that output: the
conditions of ``smallbn.graph`` (producer output with a single user), seen on the data flow
instead of a traced graph, so they hold for models fx cannot trace.  Reading only a tensor's
metadata (``.shape``, ``.size()``, ``.dtype``...) is not a use: it does not see the values
folding changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from smallbn.graph import PRODUCER_TYPES
from smallbn.layers import NormBase

# Calls that read metadata, not values.
_METADATA = {
    "__get__",  # attribute getters: .shape, .dtype, .device, .ndim, .requires_grad, ...
    "size",
    "dim",
    "numel",
    "stride",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "__len__",
    "data_ptr",
    "element_size",
    "get_device",
}


def bn_like_types() -> tuple[type[nn.Module], ...]:
    """torch's BatchNorms (timm's BatchNormAct2d is one), smallbn's layers, and the frozen BNs
    of torchvision and timm where those packages are imported."""
    import sys

    kinds: list[type[nn.Module]] = [_BatchNorm, NormBase]
    torchvision_misc = sys.modules.get("torchvision.ops.misc")
    if torchvision_misc is not None:
        kinds.append(torchvision_misc.FrozenBatchNorm2d)
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is not None:
        for name in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
            if hasattr(timm_layers, name):
                kinds.append(getattr(timm_layers, name))
    return tuple(kinds)


def bn_like(model: nn.Module) -> dict[str, nn.Module]:
    kinds = bn_like_types()
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


@dataclass(frozen=True)
class Dataflow:
    """norms: every BN-like module; pairs: foldable norm → its producer; why: the reason for
    every other norm."""

    norms: tuple[str, ...]
    pairs: dict[str, str]
    why: dict[str, str]


class _Reads(TorchFunctionMode):
    def __init__(self, watched: dict[int, str], inside: list[int], reads: Counter[int]) -> None:
        super().__init__()
        self.watched, self.inside, self.reads = watched, inside, reads

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.inside[0] and getattr(func, "__name__", "") not in _METADATA:
            seen = set()
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, Tensor) and id(leaf) in self.watched and id(leaf) not in seen:
                    seen.add(id(leaf))
                    self.reads[id(leaf)] += 1
        return func(*args, **kwargs)


def dataflow(model: nn.Module, inputs: Any) -> Dataflow:
    """Run ``model(inputs)`` once (eval mode, no gradients; the model's modes are restored)
    and find the foldable norm → producer pairs (module docstring)."""
    norms = bn_like(model)
    producers = {n: m for n, m in model.named_modules() if type(m) in PRODUCER_TYPES}
    norm_calls: Counter[str] = Counter()
    producer_calls: Counter[str] = Counter()
    norm_input: dict[str, tuple[int, str | None]] = {}  # id of the input, its producer
    watched: dict[int, str] = {}  # id(output) -> producer name
    keep: list[Tensor] = []  # outputs stay alive, so their ids are not reused
    inside = [0]
    reads: Counter[int] = Counter()
    handles = []

    def enter(_m: nn.Module, _args: Any) -> None:
        inside[0] += 1

    def norm_enter(name: str) -> Any:
        def hook(_m: nn.Module, args: Any) -> None:
            if not inside[0]:
                norm_calls[name] += 1
                x = args[0] if args else None
                if isinstance(x, Tensor):
                    # The producer is looked up now: once an unwatched input is freed, a
                    # later producer output may get its id.
                    norm_input[name] = (id(x), watched.get(id(x)))
                    if id(x) in watched:
                        reads[id(x)] += 1
            inside[0] += 1

        return hook

    def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
        inside[0] -= 1

    def producer_leave(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            inside[0] -= 1
            if not inside[0]:
                producer_calls[name] += 1
                if isinstance(out, Tensor):
                    watched[id(out)] = name
                    keep.append(out)

        return hook

    for name, module in norms.items():
        handles.append(module.register_forward_pre_hook(norm_enter(name)))
        handles.append(module.register_forward_hook(leave))
    for name, module in producers.items():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(producer_leave(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _Reads(watched, inside, reads):
            output = model(inputs)
        for leaf in pytree.tree_leaves(output):  # a producer output returned by the model
            if isinstance(leaf, Tensor) and id(leaf) in watched:
                reads[id(leaf)] += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    pairs: dict[str, str] = {}
    why: dict[str, str] = {}
    for name in norms:
        source, producer = norm_input.get(name, (None, None))
        if norm_calls[name] != 1:
            why[name] = f"called {norm_calls[name]} times"
        elif producer is None:
            why[name] = "input is not a producer's output"
        elif producer_calls[producer] != 1:
            why[name] = f"producer '{producer}' called {producer_calls[producer]} times"
        elif reads[source] != 1:  # type: ignore[index]
            why[name] = f"the output of '{producer}' is read {reads[source]} times"  # type: ignore[index]
        else:
            pairs[name] = producer
    return Dataflow(tuple(norms), pairs, why)
