"""Training and evaluation loops shared by the jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallbn._optional import tqdm

__all__ = ["TrainResult", "batches", "evaluate", "train_steps"]


@dataclass(frozen=True)
class TrainResult:
    final_loss: float
    seconds_per_step: float


def batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled mini-batches (reshuffled every epoch, last partial batch dropped)."""
    if batch_size > len(x):
        raise ValueError(f"batch size {batch_size} exceeds the {len(x)} training samples")
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]


def train_steps(
    model: nn.Module,
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    *,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    progress: str | None = None,
) -> TrainResult:
    """Plain SGD with a cosine learning-rate schedule for ``steps`` steps."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    model.train()
    loss = torch.zeros(())
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=progress, leave=False, disable=progress is None):
        images, labels = next(data)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    elapsed = time.perf_counter() - start
    return TrainResult(float(loss.detach()), elapsed / max(steps, 1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 128,
    device: torch.device | None = None,
) -> float:
    """Top-1 error (fraction) of ``model`` in eval mode; batches are moved to ``device``.

    Eval-mode norms act on each sample alone, so the batch size changes speed, not the
    result (tests/experiments/test_train.py); 128 keeps the comparison job's small ResNet's
    activations in cache on CPU, where batches of 500 ran slower.
    """
    was_training = model.training
    model.eval()
    wrong = 0
    for start in range(0, len(x), batch_size):
        images, labels = x[start : start + batch_size], y[start : start + batch_size]
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        wrong += int((model(images).argmax(1) != labels).sum())
    model.train(was_training)
    return wrong / max(len(x), 1)
