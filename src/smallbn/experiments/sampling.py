"""Batch composition for the comparison job: i.i.d. batches, or batches made of
normalization groups that each come from a single class (groups in random order) — the
situation of detection heads, whose RoIs in a group come from one image, and of the
non-i.i.d. experiment of Batch Renormalization (Ioffe, 2017, §4.3).

Orders are a pure function of ``(seed, epoch)``, so a run resumed at step s regenerates
exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["COMPOSITIONS", "batch_indices", "steps_per_epoch"]

COMPOSITIONS = ("iid", "correlated")


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + epoch)


def _epoch_order(
    labels: Tensor, batch_size: int, group_size: int, composition: str, seed: int, epoch: int
) -> Tensor:
    """The sample indices of one epoch, in batch order (a whole number of batches)."""
    generator = _generator(seed, epoch)
    if composition == "iid":
        order = torch.randperm(len(labels), generator=generator)
    elif composition == "correlated":
        groups = []
        for cls in torch.unique(labels):
            members = torch.nonzero(labels == cls).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            usable = len(members) - len(members) % group_size
            groups.append(members[:usable].reshape(-1, group_size))
        stacked = torch.cat(groups)
        order = stacked[torch.randperm(len(stacked), generator=generator)].flatten()
    else:
        raise ValueError(f"unknown batch composition '{composition}' (one of {COMPOSITIONS})")
    usable = len(order) - len(order) % batch_size
    return order[:usable]


def steps_per_epoch(labels: Tensor, batch_size: int, group_size: int, composition: str) -> int:
    """Number of batches per epoch."""
    return len(_epoch_order(labels, batch_size, group_size, composition, 0, 0)) // batch_size


def batch_indices(
    labels: Tensor,
    batch_size: int,
    group_size: int,
    composition: str,
    seed: int,
    start_step: int = 0,
) -> Iterator[Tensor]:
    """Endless batches of ``batch_size`` sample indices, starting at step ``start_step``.

    With ``composition="correlated"`` every run of ``group_size`` consecutive samples in a
    batch comes from one class; ``group_size`` must divide ``batch_size``.
    """
    if composition == "correlated" and batch_size % group_size:
        raise ValueError(
            f"correlated batches need group_size ({group_size}) to divide batch_size ({batch_size})"
        )
    per_epoch = steps_per_epoch(labels, batch_size, group_size, composition)
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {len(labels)} training samples")
    epoch, step = divmod(start_step, per_epoch)
    while True:
        order = _epoch_order(labels, batch_size, group_size, composition, seed, epoch)
        for index in range(step, per_epoch):
            yield order[index * batch_size : (index + 1) * batch_size]
        epoch, step = epoch + 1, 0
