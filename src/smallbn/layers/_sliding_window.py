"""The sliding windows of Moving Average BN (:mod:`smallbn.layers.moving_average`): the last
``B`` per-channel values of ``χ² = E_R[x²]`` (forward) or ``Ψ = E_R[ĝ·z]`` (backward) and
their simple moving averages (docs/methods.md, MABN: ``v_t = mean(χ²_{t−B+1}, …, χ²_t)``,
``Ψ̄ = mean(Ψ_{t−B+1}, …, Ψ_t)``, the mean of the values held while the window fills).

A window is two buffers of the layer, ``values`` ``(B, C)`` (newest last) and ``count`` (valid
rows), plus an optional host copy of the count (:class:`HostCount`): eager steps then decide
on the host how many rows are valid (no device read per step), compiled or synchronized
steps mask the rows on the device.  The operations are plain functions of tensors so that
``torch.compile`` traces them inside the autograd Function's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HostCount", "SlidingWindow"]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the dispatch when it is a no-op (this layer's per-step cost is
    dominated by such small calls)."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(slots=True)
class HostCount:
    """A count kept on the host beside its device copy (a window's valid rows), so that the
    per-step decisions depending on it are Python control flow instead of a device read per
    step (a synchronization on CUDA)."""

    value: int


class SlidingWindow:
    """The last ``size`` values of a per-channel statistic, for simple moving averages.

    ``values`` is ``(size, C)``; the newest value is the last row and the valid rows are the
    last ``count`` (``count`` a 0-dim long tensor, so that the state lives in a
    ``state_dict``).  ``host`` is the host copy of ``count`` (kept up to date by
    :meth:`push`: no device read per step), or ``None``: the valid rows are then selected on
    the device from ``count``, the same numbers with a few more operations and no host
    read (what compiled graphs and synchronized layers use).  ``frozen`` windows ignore
    :meth:`push` (for gradcheck, where backward runs several times on one forward).
    """

    def __init__(
        self, values: Tensor, count: Tensor, frozen: bool = False, host: HostCount | None = None
    ) -> None:
        self.values = values
        self.count = count
        self.frozen = frozen
        self.host = host

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    def means(self, new: Tensor) -> Tensor:
        """Row ``k`` of the result is the mean of the last ``size`` values once
        ``new[0], …, new[k]`` have been appended in order (fewer while the window fills)."""
        return _window_means(self.values, self.count, self.host, new)

    def push(self, new: Tensor, valid: Tensor | None = None) -> None:
        """Append the rows of ``new`` (oldest first), dropping the oldest values; with
        ``valid`` (a 0-dim bool tensor) only where it holds, decided on the device."""
        if not self.frozen:
            _window_push(self.values, self.count, self.host, new, valid)


# The window operations are functions of tensors (not methods): torch.compile traces a
# custom autograd Function's backward only through plain functions and tensors on its ctx.


def _window_means(values: Tensor, count: Tensor, host: HostCount | None, new: Tensor) -> Tensor:
    """:meth:`SlidingWindow.means` of the window ``(values, count)``.

    Sums are exact sums of at most ``size`` terms (a running ``cumsum`` difference would
    cancel in float32): one group adds the stored sum; several sum every window of an
    ``unfold`` view of the stored values (invalid rows replaced by zeros) and the new ones.
    All sums are taken in ``new.dtype`` (the compute dtype), never in a narrower stored
    dtype: ``size`` values that each fit in float16 need not sum to one that does.  With
    ``host`` the valid rows are sliced by the host count; without, masked by the device
    count (the invalid rows enter as exact zeros: the same sums, up to the order in which the
    reduction adds them).
    """
    size, groups = int(values.shape[0]), new.shape[0]
    if host is None:
        kept_t = count.clamp(max=size)
        rows = torch.arange(size, device=values.device)
        stored = torch.where((rows >= size - kept_t).unsqueeze(1), _as(values, new.dtype), 0.0)
        steps = torch.arange(1, groups + 1, device=values.device)
        divisor = (kept_t + steps).clamp(max=size).to(new.dtype).unsqueeze(1)
        if groups == 1:
            return (new + stored[1:].sum(0)) / divisor
        sums = torch.cat([stored, new]).unfold(0, size, 1)[1:].sum(-1)
        return sums / divisor
    kept = min(host.value, size)
    counts = [min(kept + k + 1, size) for k in range(groups)]
    if groups == 1:
        if counts[0] == 1:
            return new
        stored_rows = _as(values[size - counts[0] + 1 :], new.dtype).sum(0)
        return (new + stored_rows).div_(counts[0])
    parts = [_as(values[size - kept :], new.dtype), new]
    if kept < size:
        parts.insert(0, new.new_zeros(size - kept, new.shape[1]))
    sequence = torch.cat(parts)
    # Windows of ``size`` rows ending at row size + k, k = 0 … groups−1, are the unfold's
    # rows 1 … (window w covers rows w … w + size − 1).
    sums = sequence.unfold(0, size, 1)[1:].sum(-1)
    return sums / torch.tensor(counts, dtype=new.dtype, device=new.device).unsqueeze(1)


@torch.no_grad()
def _window_push(
    values: Tensor,
    count: Tensor,
    host: HostCount | None,
    new: Tensor,
    valid: Tensor | None = None,
) -> None:
    """:meth:`SlidingWindow.push` into ``(values, count)``: the host count advances with the
    device one (written only while the window fills: no device op in the steady state);
    without a host count the device count advances on the device, and ``valid`` (a 0-dim
    bool tensor, device mode only) keeps the window as it is where false."""
    assert valid is None or host is None, "a push decided on the device has no host count"
    size, groups = int(values.shape[0]), new.shape[0]
    if groups == 0:
        return
    if groups >= size:
        pushed = _as(new[-size:], values.dtype)
    else:
        pushed = torch.cat([values[groups:], _as(new, values.dtype)])
    values.copy_(pushed if valid is None else torch.where(valid, pushed, values))
    if host is None:
        filled = (count + groups).clamp(max=size)
        count.copy_(filled if valid is None else torch.where(valid, filled, count))
    elif host.value < size:
        host.value = min(host.value + groups, size)
        count.fill_(host.value)
