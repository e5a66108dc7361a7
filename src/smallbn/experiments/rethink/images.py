"""The images a study run trains and tests on: its subsets of the dataset (:class:`_Data`),
the shifted copies of the domain study (:func:`shift_images`, :data:`~.config.SHIFTS`) and
endless i.i.d. batches (:func:`_stream`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from smallbn.experiments.data import Dataset
from smallbn.experiments.rethink.config import SHIFTS, StudyConfig
from smallbn.experiments.sampling import batch_indices


def _pixel_range(data: Dataset) -> tuple[float, float]:
    """The standardized values of the darkest and brightest pixel of the training images: the
    affine map back to the [0, 1] pixel scale on which the shifts are defined."""
    return float(data.train_x.min()), float(data.train_x.max())


def shift_images(x: Tensor, shift: str, bounds: tuple[float, float], seed: int = 0) -> Tensor:
    """``x`` (standardized images) under ``shift`` (one of :data:`SHIFTS`), standardized as the
    training images were: ``invert`` maps a pixel u on the [0, 1] scale (``bounds``: the
    standardized values of 0 and 1) to 1 − u, ``contrast`` to 0.3 + 0.4 u, ``noise`` adds
    Gaussian noise of σ = 0.25 (drawn from ``seed``, the same for every run) and clips to
    [0, 1]."""
    low, high = bounds
    u = (x - low) / (high - low)
    if shift == "invert":
        u = 1 - u
    elif shift == "contrast":
        u = 0.3 + 0.4 * u
    elif shift == "noise":
        generator = torch.Generator().manual_seed(seed)
        u = (u + 0.25 * torch.randn(u.shape, generator=generator)).clamp(0, 1)
    else:
        raise ValueError(f"unknown shift '{shift}' (one of {', '.join(SHIFTS)})")
    return low + u * (high - low)


@dataclass
class _Data:
    """One run's view of the dataset: its training subset and its test subset."""

    dataset: Dataset
    config: StudyConfig
    train_x: Tensor = dataclasses.field(init=False)
    train_y: Tensor = dataclasses.field(init=False)
    test_x: Tensor = dataclasses.field(init=False)
    test_y: Tensor = dataclasses.field(init=False)
    bounds: tuple[float, float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        n, m = self.config.train_samples, self.config.eval_samples
        self.train_x, self.train_y = self.dataset.train_x[:n], self.dataset.train_y[:n]
        self.test_x, self.test_y = self.dataset.test_x[:m], self.dataset.test_y[:m]
        self.bounds = _pixel_range(self.dataset)

    def unlabelled_target(self, shift: str) -> Tensor:
        """Unlabelled images of the shifted domain for PreciseBN on the target: shifted
        training images that the run did not train on (up to 4 × ``precise_samples`` of them)
        where the dataset has enough (``precise_samples``), else the training images
        themselves."""
        rest = self.dataset.train_x[self.config.train_samples :][: 4 * self.config.precise_samples]
        pool = rest if len(rest) >= self.config.precise_samples else self.dataset.train_x
        return shift_images(pool, shift, self.bounds, seed=2)

    def shifted_test(self, shift: str) -> Tensor:
        return shift_images(self.test_x, shift, self.bounds, seed=1)

    def shifted_train(self, shift: str) -> Tensor:
        return shift_images(self.train_x, shift, self.bounds, seed=3)


def _stream(
    x: Tensor, y: Tensor | None, batch: int, seed: int, device: torch.device
) -> Iterator[Tensor]:
    """Endless i.i.d. batches of ``x`` (on ``device``), in an order drawn from ``seed``."""
    labels = y if y is not None else torch.zeros(len(x), dtype=torch.long)
    for index in batch_indices(labels, min(batch, len(x)), 1, "iid", seed):
        yield x[index].to(device)
