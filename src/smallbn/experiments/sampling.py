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

__all__ = [
    "COMPOSITIONS",
    "batch_indices",
    "samples_for_one_batch",
    "shortfall",
    "steps_per_epoch",
]

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


def _usable(labels: Tensor, group_size: int, composition: str) -> int:
    """How many of ``labels`` an epoch can put in batches (before whole batches are cut):
    all of them i.i.d.; in correlated batches whole runs of ``group_size`` samples of one
    class, so the ``n % group_size`` leftover samples of each class do not count."""
    if composition != "correlated" or len(labels) == 0:
        return len(labels)
    counts = torch.bincount(labels)
    return int((counts - counts % group_size).sum())


def shortfall(
    labels: Tensor, train_samples: int, batch_size: int, group_size: int, composition: str
) -> str:
    """Why the first ``train_samples`` of ``labels`` make no batch of ``batch_size``, or
    ``""`` when they make one (:func:`steps_per_epoch` is then at least 1)."""
    used = labels[:train_samples]
    count = (
        f"the {len(used)} training samples"
        if len(used) == train_samples
        else f"the {len(used)} training samples (all there are, of the {train_samples} asked for)"
    )
    usable = _usable(used, group_size, composition)
    if usable >= batch_size:
        return ""
    if composition != "correlated":
        return f"batch size {batch_size} exceeds {count}"
    return (
        f"a correlated batch of {batch_size} is {batch_size // group_size} runs of "
        f"{group_size} samples of one class, and {count} hold only {usable // group_size} "
        f"such runs ({usable} samples: the samples a class has beyond its last whole run of "
        f"{group_size} are left out)"
    )


def samples_for_one_batch(
    labels: Tensor, batch_size: int, group_size: int, composition: str
) -> int | None:
    """The least ``train_samples`` whose first samples of ``labels`` make one batch, or None
    when all of ``labels`` make none."""
    if composition != "correlated":
        return batch_size if len(labels) >= batch_size else None
    counts: dict[int, int] = {}
    usable = 0
    for number, label in enumerate(labels.tolist(), 1):
        counts[label] = counts.get(label, 0) + 1
        if counts[label] % group_size == 0:
            usable += group_size
            if usable >= batch_size:
                return number
    return None


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
        raise ValueError(shortfall(labels, len(labels), batch_size, group_size, composition))
    epoch, step = divmod(start_step, per_epoch)
    while True:
        order = _epoch_order(labels, batch_size, group_size, composition, seed, epoch)
        for index in range(step, per_epoch):
            yield order[index * batch_size : (index + 1) * batch_size]
        epoch, step = epoch + 1, 0
