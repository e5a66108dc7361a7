"""Process-group plumbing for synchronized statistics (part of the core, below the layers).

Only collectives that every torch.distributed backend implements are used (``all_reduce``),
so synchronization works on CPU with gloo as well as on GPU with NCCL, unlike
``torch.nn.SyncBatchNorm`` which refuses CPU tensors.  The exchange of samples between
processes (:func:`shuffle_rows`, Shuffle BN) uses ``all_to_all_single`` where the backend has it
(gloo on CPU and CUDA, NCCL, MPI, UCC) and an ``all_gather`` otherwise.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = (
    Any  # torch.distributed.ProcessGroup; Any keeps builds without distributed importable
)

__all__ = [
    "Exchange",
    "ProcessGroup",
    "ShufflePlan",
    "active_group",
    "all_gather_ints",
    "all_gather_sizes",
    "all_gather_with_grad",
    "all_to_all_rows",
    "check_same_on_all_ranks",
    "rank_offset",
    "shuffle_permutation",
    "shuffle_plan",
    "shuffle_rows",
    "unshuffle_rows",
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


# -- exchanging samples between processes (Shuffle BN) ------------------------------------------


def all_gather_ints(
    values: Sequence[int], group: ProcessGroup, device: torch.device
) -> list[list[int]]:
    """Every rank's row of ``values`` (the same length on every rank), in group rank order.

    One ``all_reduce`` of ``world × len(values)`` int64 and one device-to-host read (a host
    synchronization on CUDA): the read that sizing an exchange of samples cannot avoid.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.zeros(world, len(values), dtype=torch.long)
    table[rank] = torch.tensor([int(v) for v in values], dtype=torch.long)
    table = table.to(device)
    dist.all_reduce(table, group=group)
    return [[int(v) for v in row] for row in table.tolist()]


_MASK64 = (1 << 64) - 1


def _mix(seed: int, step: int) -> int:
    """SplitMix64 of ``(seed, step)``: a 64-bit generator seed per step, so that consecutive
    steps' generators are unrelated (``manual_seed(seed + step)`` would give neighbouring
    layers with seeds s and s + 1 the same permutations one step apart)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def shuffle_permutation(seed: int, step: int, total: int) -> Tensor:
    """The permutation of a global batch of ``total`` samples at ``step`` (a CPU int64 tensor).

    ``perm[p]`` is the index, in the concatenation of the ranks' batches in rank order, of the
    sample placed at position ``p`` of the shuffled batch.  It is
    ``torch.randperm(total, generator=g)`` with ``g`` a CPU ``torch.Generator`` seeded with
    ``_mix(seed, step)`` (SplitMix64): a deterministic function of its arguments, the same in
    every process, computed on the host without communication and without touching torch's
    global random state.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_mix(seed, step))
    return torch.randperm(int(total), generator=generator)


@dataclass(frozen=True)
class ShufflePlan:
    """Who sends which samples where, for one rank (:func:`shuffle_plan`).

    Attributes:
        counts: ``counts[s][d]``: samples rank ``s`` sends to rank ``d`` (every rank's row, so
            that each rank knows the whole exchange; rank d receives ``Σ_s counts[s][d]``,
            which equals what it sent).
        send_order: ``(n,)`` this rank's samples in sending order: by destination rank, then
            by position in the shuffled batch.
        restore: ``(n,)`` the inverse of ``send_order``: outputs that came back in sending
            order, put back in this rank's original order.
        to_shuffled: ``(n,)`` the received samples (grouped by source rank) reordered to their
            positions in the shuffled batch; ``None`` where that order is already the
            received one (one process).
        from_shuffled: the inverse of ``to_shuffled``.
        rank: this rank (in the group).
    """

    counts: tuple[tuple[int, ...], ...]
    send_order: Tensor
    restore: Tensor
    to_shuffled: Tensor | None
    from_shuffled: Tensor | None
    rank: int


def _inverse(order: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size, dtype=order.dtype)
    return inverse


def _to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[Tensor]:
    """Host int64 arrays as tensors on ``device``, in one host-to-device copy (pinned and
    asynchronous off CPU: no synchronization with the device)."""
    sizes = [a.size for a in arrays]
    flat = torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False))
    if device.type != "cpu":
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
    return list(flat.split(sizes))


def shuffle_plan(
    permutation: Tensor, sizes: Sequence[int], rank: int, device: torch.device | None = None
) -> ShufflePlan:
    """The exchange that gives every rank its share of the shuffled global batch.

    The global batch is the concatenation of the ranks' batches in rank order (``sizes[r]``
    samples from rank r).  Its samples are placed in the order ``permutation`` gives
    (:func:`shuffle_permutation`), and that shuffled batch is cut into consecutive parts of
    the same sizes: rank r receives positions ``[Σ_{q<r} sizes[q], Σ_{q≤r} sizes[q])``, as
    many samples as it holds.  Computed on the host from the host permutation (no device
    read); the index tensors are copied to ``device`` (default CPU).
    """
    sizes = [int(s) for s in sizes]
    world, total = len(sizes), sum(sizes)
    perm = permutation.detach().cpu().numpy().astype(np.int64, copy=False)
    if perm.shape != (total,):
        raise ValueError(
            f"shuffle_plan: the permutation has shape {tuple(perm.shape)}, but the ranks' "
            f"batches hold {total} samples in all (sizes {sizes})"
        )
    owner = np.repeat(np.arange(world, dtype=np.int64), sizes)  # rank holding index/position i
    position = _inverse(perm)  # position[g]: where global sample g goes in the shuffled batch
    counts = np.zeros((world, world), dtype=np.int64)
    np.add.at(counts, (owner, owner[position]), 1)
    start = int(sum(sizes[:rank]))
    stop = start + sizes[rank]
    send_order = np.argsort(position[start:stop], kind="stable")
    # Received samples come grouped by source rank (in rank order), each group in shuffled
    # order (the senders sorted by position): a stable sort by source of this rank's positions.
    received = np.argsort(owner[perm[start:stop]], kind="stable")
    arrays = [send_order, _inverse(send_order)]
    if world > 1:
        arrays += [_inverse(received), received]
    tensors = _to_device(arrays, device or torch.device("cpu"))
    return ShufflePlan(
        counts=tuple(tuple(int(c) for c in row) for row in counts.tolist()),
        send_order=tensors[0],
        restore=tensors[1],
        to_shuffled=tensors[2] if world > 1 else None,
        from_shuffled=tensors[3] if world > 1 else None,
        rank=int(rank),
    )


Exchange = Literal["auto", "all_to_all", "all_gather"]

#: Backends whose ``all_to_all_single`` takes uneven splits (gloo on CPU and CUDA: checked on
#: torch 2.13 CPU; NCCL, MPI, UCC).  Others get the ``all_gather`` exchange.
_ALL_TO_ALL_BACKENDS = frozenset({"gloo", "nccl", "mpi", "ucc"})


def _uses_all_to_all(group: ProcessGroup, exchange: Exchange) -> bool:
    if exchange == "all_to_all":
        return True
    if exchange == "all_gather":
        return False
    if exchange != "auto":
        raise ValueError(f"exchange must be 'auto', 'all_to_all' or 'all_gather', got {exchange!r}")
    try:
        backend = str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return False
    return backend in _ALL_TO_ALL_BACKENDS


def _exchange_rows(
    x: Tensor, counts: tuple[tuple[int, ...], ...], group: ProcessGroup, exchange: Exchange
) -> Tensor:
    """Rows of ``x`` (dim 0) sent as ``counts`` says: this rank sends ``counts[rank][d]``
    consecutive rows to rank d (in rank order) and returns what it receives, grouped by source
    rank in rank order."""
    rank = dist.get_rank(group)
    world = len(counts)
    send = list(counts[rank])
    recv = [counts[s][rank] for s in range(world)]
    if x.shape[0] != sum(send):
        raise ValueError(f"exchange: {x.shape[0]} rows to send, the plan sends {sum(send)}")
    out_shape = (sum(recv), *x.shape[1:])
    if not any(any(row) for row in counts):  # nothing moves anywhere: every rank skips it
        return x.new_empty(out_shape)
    x = x.contiguous()
    if _uses_all_to_all(group, exchange):
        out = x.new_empty(out_shape)
        dist.all_to_all_single(out, x, recv, send, group=group)
        return out
    # all_gather fallback: every rank's rows padded to the largest send, gathered everywhere;
    # each rank keeps the slices addressed to it (every rank knows every rank's counts).
    longest = max(sum(row) for row in counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    parts = []
    for s in range(world):
        begin = sum(counts[s][:rank])
        parts.append(gathered[s][begin : begin + counts[s][rank]])
    return torch.cat(parts) if parts else x.new_empty(out_shape)


class _ExchangeRows(torch.autograd.Function):
    """:func:`_exchange_rows`; backward: the gradients take the reverse route (the same
    exchange with the counts transposed), itself differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        counts: tuple[tuple[int, ...], ...],
        group: ProcessGroup,
        exchange: Exchange,
    ) -> Tensor:
        ctx.counts, ctx.group, ctx.exchange = counts, group, exchange
        return _exchange_rows(x, counts, group, exchange)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        transposed = tuple(zip(*ctx.counts, strict=True))
        return _ExchangeRows.apply(grad, transposed, ctx.group, ctx.exchange), None, None, None


@torch.compiler.disable  # eager under torch.compile: collectives with host-side split sizes
def all_to_all_rows(
    x: Tensor,
    counts: Sequence[Sequence[int]],
    group: ProcessGroup,
    exchange: Exchange = "auto",
) -> Tensor:
    """Send ``counts[rank][d]`` consecutive rows of ``x`` to each rank d; return the rows this
    rank receives, grouped by source rank in rank order, differentiably (the backward sends
    the gradients back the same way: one more exchange).  Every rank must pass the same
    ``counts`` (``world × world``, rows may be empty: a rank with no samples sends and
    receives nothing but still takes part).  ``exchange``: ``"auto"`` (``all_to_all_single``
    where the backend has it, else ``all_gather``), or either one explicitly."""
    plan = tuple(tuple(int(c) for c in row) for row in counts)
    return _ExchangeRows.apply(x, plan, group, exchange)


def shuffle_rows(
    x: Tensor,
    plan: ShufflePlan,
    group: ProcessGroup | None,
    exchange: Exchange = "auto",
    *,
    shuffled_order: bool = True,
) -> Tensor:
    """This rank's part of the shuffled global batch (:func:`shuffle_plan`), differentiably:
    one exchange forward, one backward.  ``shuffled_order=False`` leaves the received samples
    grouped by source rank (the same set in another order: enough for statistics over the
    part, and one index pass cheaper).  ``group=None``: one process, ``x[permutation]``."""
    sent = x.index_select(0, plan.send_order)
    if group is None:
        return sent
    received = all_to_all_rows(sent, plan.counts, group, exchange)
    if shuffled_order and plan.to_shuffled is not None:
        received = received.index_select(0, plan.to_shuffled)
    return received


def unshuffle_rows(
    y: Tensor,
    plan: ShufflePlan,
    group: ProcessGroup | None,
    exchange: Exchange = "auto",
    *,
    shuffled_order: bool = True,
) -> Tensor:
    """The inverse of :func:`shuffle_rows` (same ``shuffled_order``): every row of this rank's
    part goes back to the rank that sent it, in that rank's original order."""
    if group is not None:
        if shuffled_order and plan.from_shuffled is not None:
            y = y.index_select(0, plan.from_shuffled)
        transposed = tuple(zip(*plan.counts, strict=True))
        y = all_to_all_rows(y, transposed, group, exchange)
    return y.index_select(0, plan.restore)
