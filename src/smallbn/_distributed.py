"""Process-group plumbing for synchronized statistics (part of the core, below the layers).

Only collectives that every torch.distributed backend implements are used (``all_reduce``),
so synchronization works on CPU with gloo as well as on GPU with NCCL, unlike
``torch.nn.SyncBatchNorm`` which refuses CPU tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = (
    Any  # torch.distributed.ProcessGroup; Any keeps builds without distributed importable
)

__all__ = [
    "ProcessGroup",
    "active_group",
    "all_gather_sizes",
    "all_gather_with_grad",
    "rank_offset",
]


def active_group(sync: bool, process_group: ProcessGroup | None) -> ProcessGroup | None:
    """The group to synchronize over, or ``None`` when there is nothing to synchronize.

    ``None`` is returned when syncing is off, torch.distributed is unavailable or not
    initialized, or the group has a single member (then synchronized statistics are the
    local ones and no collective is needed).
    """
    if not (sync or process_group is not None):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllGatherWithGrad(torch.autograd.Function):
    """``out[r] = t_r`` on every rank; backward: ``∂L/∂t_r = Σ_ranks ∂L_rank/∂out[r]``.

    Implemented with one ``all_reduce`` each way (every backend has it; gloo lacks
    ``reduce_scatter``).  The payload is a few statistics per channel, so the zero padding of
    the all-reduce-as-gather costs nothing measurable.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: ProcessGroup) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        out = tensor.new_zeros((world, *tensor.shape))
        out[rank] = tensor
        dist.all_reduce(out, group=group)
        ctx.group, ctx.rank = group, rank
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_with_grad(tensor: Tensor, group: ProcessGroup | None) -> Tensor:
    """Stack ``tensor`` from every rank of ``group`` along a new dim 0, differentiably.

    With ``group=None`` (no synchronization) the result is ``tensor.unsqueeze(0)``.
    """
    if group is None:
        return tensor.unsqueeze(0)
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_sizes(size: int, group: ProcessGroup, device: torch.device) -> list[int]:
    """Every rank's local batch size, in rank order (a host sync: used only where needed)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[rank] = size
    dist.all_reduce(sizes, group=group)
    return [int(s) for s in sizes.tolist()]


def rank_offset(size: int, group: ProcessGroup, device: torch.device) -> tuple[int, int]:
    """``(offset, total)``: where this rank's samples start in the concatenation of all ranks'
    batches (rank order), and the total batch size."""
    sizes = all_gather_sizes(size, group, device)
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)
