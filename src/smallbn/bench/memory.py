"""Memory accounting for the benchmarks: state kept by a layer, activations kept for backward,
and (on CUDA) the peak memory of a training step.

* :func:`state_bytes`: the bytes of a module's parameters and buffers (persistent or not),
  plus tensors it holds in plain attributes (caches, windows kept outside the buffers);
  modules it references outside its tree (Cross-Iteration BN's producer) are not counted.
* :func:`saved_bytes`: the bytes a training forward keeps alive for the backward pass —
  every tensor saved through autograd (``torch.autograd.graph.saved_tensors_hooks`` sees
  what built-in ops and ``ctx.save_for_backward`` save) plus tensors custom autograd
  Functions keep as ``ctx`` attributes — counted once per storage, leaving out the input
  and the model's own parameters and buffers (state, counted by :func:`state_bytes`).  This
  is the activation memory a method adds to a network, measurable on any device.
* :func:`cuda_peak_bytes`: on CUDA, the peak allocated memory during a call, above what was
  allocated before it (``torch.cuda.max_memory_allocated``): saved activations plus the
  temporaries of forward and backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["cuda_peak_bytes", "saved_bytes", "state_bytes", "storage_key"]

#: How deep :func:`_tensors_in` looks into containers and plain objects.
_DEPTH = 3


def storage_key(tensor: Tensor) -> tuple[str, int] | None:
    """``(device, address)`` of the memory a tensor views (``None`` for tensors without a
    plain storage, e.g. sparse ones): two views of one allocation share the key."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return str(tensor.device), storage.data_ptr()


def _storage_nbytes(tensor: Tensor) -> int:
    try:
        return int(tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return tensor.numel() * tensor.element_size()


def _tensors_in(value: Any, depth: int = _DEPTH, seen: set[int] | None = None) -> Iterable[Tensor]:
    """Tensors in ``value``: itself, or inside lists/tuples/sets/dicts, dataclasses and plain
    objects' attributes, up to ``depth`` levels; modules and callables are not entered."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, Tensor):
        yield value
        return
    if depth <= 0 or isinstance(value, nn.Module | str | bytes | type) or callable(value):
        return
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    elif dataclasses.is_dataclass(value):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return
    for item in items:
        yield from _tensors_in(item, depth - 1, seen)


def _module_keys(module: nn.Module) -> set[tuple[str, int]]:
    return {
        key
        for t in (*module.parameters(), *module.buffers())
        if (key := storage_key(t)) is not None
    }


def state_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (persistent and not) and of tensors held
    in plain attributes of it or its submodules, each allocation counted once."""
    counted: dict[tuple[str, int], int] = {}
    tensors: list[Tensor] = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        for name, value in vars(sub).items():
            if name in ("_parameters", "_buffers", "_modules") or name.endswith("_hooks"):
                continue
            tensors.extend(_tensors_in(value))
    for t in tensors:
        key = storage_key(t)
        if key is not None:
            counted[key] = _storage_nbytes(t)
    return sum(counted.values())


def _graph_ctx_tensors(outputs: Iterable[Tensor]) -> list[Tensor]:
    """Tensors held as attributes of custom autograd Functions' ``ctx`` in the graph behind
    ``outputs`` (what ``save_for_backward`` does not cover)."""
    found: list[Tensor] = []
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        attributes = getattr(node, "__dict__", None)
        if attributes:
            found.extend(_tensors_in(attributes))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def saved_bytes(model: nn.Module, *inputs: Tensor) -> int:
    """Bytes kept for the backward pass by one training forward of ``model`` on ``inputs``,
    counted once per allocation; the inputs and ``model``'s parameters and buffers are not
    counted.  Runs the forward and backward once (the model's state advances one step, as in
    training); gradients are left as the backward set them."""
    excluded = _module_keys(model) | {k for t in inputs if (k := storage_key(t)) is not None}
    saved: dict[tuple[str, int], int] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = storage_key(tensor)
        if key is not None and key not in excluded:
            saved[key] = _storage_nbytes(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(*inputs)
    outputs = [t for t in _tensors_in(output) if t.requires_grad]
    for tensor in _graph_ctx_tensors(outputs):
        key = storage_key(tensor)
        if key is not None and key not in excluded:
            saved[key] = _storage_nbytes(tensor)
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    return sum(saved.values())


def cuda_peak_bytes(run: Callable[[], object], device: torch.device | str) -> int:
    """Peak CUDA memory allocated while ``run()`` executes, above what was allocated before."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)
