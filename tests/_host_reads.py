"""Counting host reads on CPU: what would synchronize with the device on CUDA.

A host read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, a data-dependent shape
such as ``nonzero``) waits for the device on CUDA.  On CPU the same reads are visible as
dispatcher calls (``aten._local_scalar_dense`` and the data-dependent ops below), and
``Tensor.tolist``, which bypasses the dispatcher, is patched while counting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_READS", "count_host_reads"]

#: Ops whose result the host must wait for.
HOST_READS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.unique_consecutive.default",
        "aten._unique2.default",
        "aten.equal.default",
        "aten.is_nonzero.default",
    }
)


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if str(func) in HOST_READS:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def count_host_reads(step: Callable[[], Any]) -> list[str]:
    """The host reads ``step()`` makes, in order (forward and, on CPU, backward too: the
    autograd engine runs CPU backward in the calling thread, under the same mode)."""
    found: list[str] = []
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> Any:
        found.append("Tensor.tolist")
        return tolist(self)

    torch.Tensor.tolist = counted  # type: ignore[method-assign]
    try:
        with _HostReads() as mode:
            step()
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    return found + mode.found
