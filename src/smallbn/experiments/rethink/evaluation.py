"""Test error of a study's network with the statistics it holds (EMA or population), with
the statistics of random groups of test images (:func:`smallbn.batch_stats_eval`), and a copy
with PreciseBN statistics (:func:`smallbn.precise_bn`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from smallbn.experiments.train import evaluate
from smallbn.layers import NormBase
from smallbn.population import batch_stats_eval, batch_stats_layers, precise_bn


@torch.no_grad()
def _predictions(model: nn.Module, x: Tensor, batch: int, device: torch.device) -> Tensor:
    """Class predictions for ``x`` in batches of ``batch``, in the model's current modes."""
    out = [model(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def _error(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    return evaluate(model, x, y, device=device)


def _images_per_forward(model: nn.Module, group: int) -> int:
    """Test images per forward such that every batch-statistics layer normalizes each image
    with the statistics of its group of ``group``: several groups at once where every such
    layer splits its batch into groups of ``group`` (Ghost BN, ``norm_batch_size``), one
    group where any normalizes its whole batch.  A layer that splits into groups of another
    size would report another statistic than the study's: an error naming it."""
    sizes = {
        name: m.normalization_batch() if isinstance(m, NormBase) else None
        for name, m in batch_stats_layers(model)
    }
    other = {name: b for name, b in sizes.items() if b is not None and b != group}
    if other:
        raise ValueError(
            f"batch-statistics evaluation in groups of {group} test images: the layers "
            f"{other} normalize groups of another size; build them with groups of {group}"
        )
    if sizes and all(b == group for b in sizes.values()):
        return group * max(1, 128 // group)
    return group


def _error_batch_stats(
    model: nn.Module, x: Tensor, y: Tensor, group: int, seed: int, device: torch.device
) -> float:
    """Test error when every batch-statistics layer normalizes each test image with the
    statistics of its random group of ``group`` test images: :func:`smallbn.batch_stats_eval`.
    The images are shuffled (groups are i.i.d., as in training) and the last group is
    completed with images from the start, which are scored once only."""
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    padded = torch.cat([order, order[: (-n) % group]]) if n % group else order
    batch = _images_per_forward(model, group)
    with batch_stats_eval(model):
        predictions = _predictions(model, x[padded], batch, device)[:n]
    return float((predictions != y[order]).float().mean())


def _precise(
    model: nn.Module,
    batches: Iterable[Any],
    samples: int,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    size: Callable[[Any], int] | None = None,
) -> nn.Module:
    """A copy of ``model`` with PreciseBN statistics (``model`` is left as it is)."""
    clone = copy.deepcopy(model)
    precise_bn(clone, batches, samples, forward=forward, batch_size=size, progress=False)
    return clone
