"""A simulated small normalization batch for any norm layer (Yan et al., ICLR 2020, §5: the
authors normalize groups of b samples inside a larger SGD batch to study normalization batch
size independently of the SGD batch).

In training, the batch is split into consecutive groups of ``group_size`` samples (the last
may be smaller) and the wrapped layer is called on each group in turn, so every method sees
normalization batches of ``group_size`` and cross-iteration methods (CBN, MABN) see the groups
as consecutive steps.  Layers that need to know which samples of their producer's output a
group holds (Cross-Iteration BN reads the producer's input) declare
``accepts_sample_slice = True`` and get ``sample_slice`` set for each call.  In eval mode the
layer is called once on the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smallbn.stats import group_sizes

__all__ = ["GroupedNorm"]


class GroupedNorm(nn.Module):
    """Call ``norm`` on consecutive groups of ``group_size`` samples in training mode."""

    def __init__(self, norm: nn.Module, group_size: int) -> None:
        super().__init__()
        if int(group_size) < 1:
            raise ValueError(f"GroupedNorm: group_size must be >= 1, got {group_size}")
        self.norm = norm
        self.group_size = int(group_size)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] <= self.group_size:
            return self.norm(x)
        declares = getattr(self.norm, "accepts_sample_slice", False)
        outputs = []
        try:
            start = 0
            for size in group_sizes(x.shape[0], self.group_size):
                stop = start + size
                if declares:
                    setattr(self.norm, "sample_slice", slice(start, stop))  # noqa: B010
                outputs.append(self.norm(x[start:stop]))
                start = stop
        finally:
            if declares:
                setattr(self.norm, "sample_slice", None)  # noqa: B010
        return torch.cat(outputs)
