"""Shared by the CBN sync tests: train a conv+norm block on each rank's slice of a batch
(gradients summed as DDP would) and compare every rank's step with one process training on
the concatenated batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def sync_data(step: int, total: int) -> tuple[Tensor, Tensor]:
    """Step ``step``'s inputs ``(total, 3, 6, 5)`` and output gradients ``(total, 4, 3, 3)``."""
    gen = torch.Generator().manual_seed(1000 + step)
    u = torch.randn(total, 3, 6, 5, generator=gen, dtype=torch.float64) * (1 + step) + 0.5
    g = torch.randn(total, 4, 3, 3, generator=gen, dtype=torch.float64)
    return u, g


def train_on_slices(
    block: nn.Sequential,
    sizes: Sequence[Sequence[int]],
    rank: int | None,
    *,
    record_state: bool = False,
) -> list[dict[str, Any]]:
    """Train ``block`` on this rank's slices of each step's batch (``sizes[step][rank]``
    samples; ``rank=None``: the whole batches); gradients summed across processes as DDP
    would.  Per step: output, input gradient, parameter gradients (and the norm's state)."""
    opt = torch.optim.SGD(block.parameters(), lr=0.2, momentum=0.9)
    results = []
    for step, per_rank in enumerate(sizes):
        u, g = sync_data(step, sum(per_rank))
        if rank is not None:
            start = sum(per_rank[:rank])
            u, g = u[start : start + per_rank[rank]], g[start : start + per_rank[rank]]
        u = u.clone().requires_grad_()
        y = block(u)
        (y * g).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.parameters()]
        if rank is not None:
            for grad in grads:
                dist.all_reduce(grad)
        for p, grad in zip(block.parameters(), grads, strict=True):
            p.grad = grad
        result: dict[str, Any] = {
            "y": y.detach(),
            "u_grad": u.grad,
            "grads": [gr.clone() for gr in grads],
        }
        if record_state:
            result["state"] = {k: v.clone() for k, v in block[1].state_dict().items()}
        results.append(result)
        opt.step()
        opt.zero_grad()
    return results


def assert_ranks_equal_concatenated(
    ranks: Sequence[list[dict[str, Any]]],
    expected: list[dict[str, Any]],
    sizes: Sequence[Sequence[int]],
    close: Callable[[Tensor | None, Tensor | None, str], None],
) -> None:
    """Every rank's step equals its slice of the one-process step on the concatenated batch."""
    for step, per_rank in enumerate(sizes):
        start = 0
        for rank in range(len(ranks)):
            part = slice(start, start + per_rank[rank])
            start += per_rank[rank]
            got, want = ranks[rank][step], expected[step]
            where = f"step {step}, rank {rank}"
            close(got["y"], want["y"][part], f"output ({where})")
            if per_rank[rank]:
                close(got["u_grad"], want["u_grad"][part], f"input grad ({where})")
            for i, (mine, theirs) in enumerate(zip(got["grads"], want["grads"], strict=True)):
                close(mine, theirs, f"parameter {i} gradient ({where})")
            for key, value in got.get("state", {}).items():
                close(value, want["state"][key], f"state {key} ({where})")
