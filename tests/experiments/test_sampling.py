"""Batch composition: i.i.d. batches and class-correlated normalization groups."""

from __future__ import annotations

import itertools

import pytest
import torch

from smallbn.experiments.sampling import batch_indices, steps_per_epoch

LABELS = torch.arange(60) % 5  # 5 classes, 12 samples each


@pytest.mark.parametrize("group", [1, 2, 4])
def test_correlated_groups_come_from_one_class(group):
    batches = list(itertools.islice(batch_indices(LABELS, 8, group, "correlated", seed=0), 20))
    for batch in batches:
        assert len(batch) == 8
        for g in batch.reshape(-1, group):
            assert len(set(LABELS[g].tolist())) == 1


def test_correlated_groups_are_in_random_class_order():
    batch = next(batch_indices(LABELS, 24, 2, "correlated", seed=0))
    classes = LABELS[batch].reshape(-1, 2)[:, 0].tolist()
    assert len(set(classes)) > 1  # not all groups of one class in a row


def test_iid_batches_cover_each_epoch_without_repeats():
    per_epoch = steps_per_epoch(LABELS, 8, 8, "iid")
    epoch = torch.cat(list(itertools.islice(batch_indices(LABELS, 8, 8, "iid", 3), per_epoch)))
    assert len(set(epoch.tolist())) == len(epoch) == per_epoch * 8


def test_resuming_at_a_step_regenerates_the_same_batches():
    full = list(itertools.islice(batch_indices(LABELS, 8, 2, "correlated", seed=5), 17))
    resumed = list(itertools.islice(batch_indices(LABELS, 8, 2, "correlated", 5, 11), 6))
    for a, b in zip(full[11:], resumed, strict=True):
        assert torch.equal(a, b)


def test_seeds_differ_and_bad_arguments_raise():
    a = next(batch_indices(LABELS, 8, 2, "iid", seed=0))
    b = next(batch_indices(LABELS, 8, 2, "iid", seed=1))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="divide batch_size"):
        next(batch_indices(LABELS, 8, 3, "correlated", 0))
    with pytest.raises(ValueError, match="unknown batch composition"):
        next(batch_indices(LABELS, 8, 2, "sorted", 0))
