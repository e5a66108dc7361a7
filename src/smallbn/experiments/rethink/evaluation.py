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
from smallbn.layers import GhostBatchNorm
from smallbn.population import batch_stats_eval, precise_bn


@torch.no_grad()
def _predictions(model: nn.Module, x: Tensor, batch: int, device: torch.device) -> Tensor:
    """Class predictions for ``x`` in batches of ``batch``, in the model's current modes."""
    out = [model(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def _error(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    return evaluate(model, x, y, device=device)


def _error_batch_stats(
    model: nn.Module, x: Tensor, y: Tensor, group: int, seed: int, device: torch.device
) -> float:
    """Test error when every batch-statistics layer normalizes each test image with the
    statistics of its random group of ``group`` test images (Ghost BN's groups of b, or the
    whole batch for BN): :func:`smallbn.batch_stats_eval`.  The images are shuffled (groups
    are i.i.d., as in training) and the last group is completed with images from the start,
    which are scored once only."""
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    padded = torch.cat([order, order[: (-n) % group]]) if n % group else order
    # Ghost BN normalizes groups of b inside any batch; any other layer the whole batch
    ghost = any(isinstance(m, GhostBatchNorm) for m in model.modules())
    batch = group * max(1, 128 // group) if ghost else group
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
