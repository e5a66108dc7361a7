"""Process-group plumbing for synchronized statistics (part of the core, below the layers).

Only collectives that every torch.distributed backend implements are used (``all_reduce``),
so synchronization works on CPU with gloo as well as on GPU with NCCL, unlike
``torch.nn.SyncBatchNorm`` which refuses CPU tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
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
    "check_same_on_all_ranks",
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


#: Fields a signature may have (:func:`check_same_on_all_ranks`): the collective has a fixed
#: size, so that ranks whose layers differ in kind still exchange buffers of one size.
MAX_SIGNATURE_FIELDS = 15
_TEXT_BYTES = 64  # how much of each value's text the (failure-only) second exchange carries

SignatureValue = int | str | None


def _code(value: SignatureValue) -> int:
    """An int64 code of one signature value: ints as they are (exact), ``None`` as -1, text by
    its CRC-32 (a non-negative 32-bit number; two different texts colliding, for the handful
    of type and dtype names compared here, is a 1-in-4-billion event)."""
    if value is None:
        return -1
    if isinstance(value, str):
        return zlib.crc32(value.encode())
    return int(value)


def check_same_on_all_ranks(
    signature: Mapping[str, SignatureValue],
    group: ProcessGroup,
    device: torch.device,
    who: str,
    fix: str,
) -> None:
    """Raise ``ValueError`` on every rank of ``group`` if the ranks' ``signature`` differ.

    A synchronized layer exchanges buffers whose size and dtype follow from its configuration
    (channels, dtype, groups of samples, ...).  Ranks that disagree would otherwise fail inside
    the backend (gloo aborts one process with "Received data size doesn't match", naming no
    layer) or, where the sizes happen to match, pool unrelated statistics without any error.
    Calling this before the exchange turns both into one clear error on every rank: ``who``
    names the layer, the message lists each field that differs with every rank's value, and
    ``fix`` says what to change.  After the error the ranks' collectives are still aligned
    (every rank raised at the same point), so a caller may catch it and go on.

    ``signature`` maps field names to ints, strings or ``None``; every rank must pass the same
    field names in the same order (at most :data:`MAX_SIGNATURE_FIELDS`).  Only what must agree
    belongs there: batch and spatial sizes may legitimately differ across ranks.

    Cost: one all-reduce of ``2·(1 + MAX_SIGNATURE_FIELDS)`` int64 values (their max and, as the
    max of the negated values, their min in a single call) and one device-to-host read per
    call, i.e. one small collective per synchronized training step and layer.  On CUDA the read
    is a host synchronization (to be revisited when the layers are made sync-free on GPU).  A
    second exchange, only when something differs, gathers every rank's values as text for
    the message.
    """
    names = list(signature)
    if len(names) > MAX_SIGNATURE_FIELDS:
        raise ValueError(
            f"check_same_on_all_ranks: at most {MAX_SIGNATURE_FIELDS} fields, got {len(names)}"
        )
    codes = torch.zeros(1 + MAX_SIGNATURE_FIELDS, dtype=torch.long)
    codes[0] = zlib.crc32("\0".join(names).encode())  # the same fields, in the same order
    codes[1 : 1 + len(names)] = torch.tensor([_code(v) for v in signature.values()])
    both = torch.cat([codes, -codes]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    highest, negated_lowest = both.view(2, -1).tolist()  # the one host read
    if all(h == -n for h, n in zip(highest, negated_lowest, strict=True)):
        return
    # Every rank got the same max and min, so every rank takes this path together.
    raise ValueError(_mismatch_message(signature, group, device, who, fix))


def _mismatch_message(
    signature: Mapping[str, SignatureValue],
    group: ProcessGroup,
    device: torch.device,
    who: str,
    fix: str,
) -> str:
    """Gather every rank's global rank, field names and values (as text) and say which differ."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    texts = [",".join(signature), *(str(v) for v in signature.values())]
    table = torch.zeros(world, 1 + MAX_SIGNATURE_FIELDS + 1, _TEXT_BYTES, dtype=torch.long)
    table[rank, 0, 0] = dist.get_rank()  # global rank, as the user knows the processes
    for i, shown in enumerate(texts, start=1):
        raw = shown.encode()[:_TEXT_BYTES]
        table[rank, i, : len(raw)] = torch.tensor(list(raw), dtype=torch.long)
    gathered = table.to(device)
    dist.all_reduce(gathered, group=group)
    table = gathered.cpu()

    def text(r: int, i: int) -> str:
        return bytes(b for b in table[r, i].tolist() if b).decode(errors="replace")

    ranks = [int(table[r, 0, 0]) for r in range(world)]
    fields = [text(r, 1) for r in range(world)]
    if len(set(fields)) > 1:  # another release of the layer on some rank
        differences = ["the compared fields themselves (different smallbn versions?)"]
    else:
        differences = []
        for i, name in enumerate(signature, start=2):
            by_value: dict[str, list[int]] = {}
            for r in range(world):
                by_value.setdefault(text(r, i), []).append(ranks[r])
            if len(by_value) > 1:
                held = ", ".join(
                    f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))} "
                    f"{'has' if len(rs) == 1 else 'have'} {value}"
                    for value, rs in by_value.items()
                )
                differences.append(f"{name}: {held}")
        if not differences:  # values that differ beyond the text shown
            differences = ["their configuration (values too long to show)"]
    return (
        f"{who}: the processes synchronizing this layer disagree on {'; '.join(differences)}. {fix}"
    )
