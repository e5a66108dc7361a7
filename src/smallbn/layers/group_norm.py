"""Batch-independent baselines through torch's ``group_norm``: GroupNorm, LayerNorm and
InstanceNorm over ``(C, *spatial)``.

Group Normalization (Wu & He, ECCV 2018) splits the C channels into G groups and normalizes
each sample's group g with its own statistics over (C/G channels, *spatial):

    y = γ (x − μ_{n,g}) / sqrt(σ²_{n,g} + eps) + β.

G = 1 is layer normalization over (C, *spatial) (Ba et al., 2016) and G = C is instance
normalization (Ulyanov et al., 2016), both with per-channel affine.  These layers keep BN's
``running_mean``/``running_var``/``num_batches_tracked`` buffers untouched, only so that a BN
checkpoint loads into a converted model and converting back to BN restores them; the
computation never reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from smallbn.layers._base import NormBase

__all__ = ["GroupNorm", "InstanceNorm", "LayerNorm", "fit_num_groups"]


def fit_num_groups(num_features: int, num_groups: int) -> int:
    """The largest divisor of ``num_features`` not above ``num_groups`` (G = 32 in the paper
    assumes C divisible by 32; smaller nets get the nearest valid grouping)."""
    for groups in range(min(num_groups, num_features), 0, -1):
        if num_features % groups == 0:
            return groups
    return 1


class GroupNorm(NormBase):
    """Group normalization with a BN-style constructor; accepts inputs of rank ≥ 2.

    Args:
        num_groups: requested number of groups (paper: 32); reduced to the largest divisor
            of ``num_features`` not above it.
        channels_per_group: alternatively, the number of channels per group (the paper's
            other parametrization); G = C / channels_per_group, fitted likewise.
    """

    _family = "GroupNorm"
    _default_groups = 32

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_groups: int | None = None,
        channels_per_group: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if num_groups is not None and channels_per_group is not None:
            raise ValueError(f"{type(self).__name__}: give num_groups or channels_per_group")
        for option, value in (
            ("num_groups", num_groups),
            ("channels_per_group", channels_per_group),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(
                    f"{type(self).__name__}: {option} must be >= 1, got {value} (num_groups=1 "
                    f"is LayerNorm, channels_per_group=1 InstanceNorm)"
                )
        requested = self._requested_groups() if num_groups is None else num_groups
        if channels_per_group is not None:  # narrow nets: a fixed group width (Wu & He, Table 3)
            requested = max(self.num_features // int(channels_per_group), 1)
        self.num_groups = fit_num_groups(self.num_features, requested)

    def _requested_groups(self) -> int:
        return self._default_groups

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )

    def eval_affine(self) -> None:
        """Not a per-channel affine map: statistics come from each sample."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if (self.num_features // self.num_groups) * math.prod(x.shape[2:]) <= 1:
            # torch raises only for a batch of one ("... when training", even in eval mode)
            # and otherwise returns the bias alone
            raise ValueError(
                f"{self.describe()}: each of its {self.num_groups} groups holds a single value "
                f"per sample (input shape {tuple(x.shape)}), so the output would be the bias "
                f"alone. Use fewer groups (LayerNorm, or a smaller num_groups), or an input "
                f"with spatial dims."
            )
        if x.device.type == "cpu" and x.dim() > 2 and not x.is_contiguous():
            x = x - self._group_means(x)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def _group_means(self, x: Tensor) -> Tensor:
        """Each (sample, group)'s mean, broadcast to its channels, without gradient.

        torch's CPU kernel for channels-last inputs loses accuracy as (μ/σ)² grows (at
        |μ|/σ = 100 about 1e-2 of the output; its contiguous kernel does not).  Subtracting
        each group's mean first changes neither the output nor the gradient (a group's
        normalized values do not depend on a shift of the whole group) and restores
        float32's accuracy, for one small reduction and one elementwise pass: cheaper than
        the contiguous kernel on a copy, or than a second reduction to decide whether the
        shift is needed.
        """
        n, c = x.shape[:2]
        with torch.no_grad():
            channel_means = x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32)
            groups = channel_means.view(n, self.num_groups, c // self.num_groups)
            means = groups.mean(-1, keepdim=True).expand_as(groups).reshape(n, c)
        return means.to(x.dtype).view(n, c, *([1] * (x.dim() - 2)))


class LayerNorm(GroupNorm):
    """Layer normalization over ``(C, *spatial)`` with per-channel affine (GroupNorm, G = 1)."""

    _family = "LayerNorm"

    def _requested_groups(self) -> int:
        return 1


class InstanceNorm(GroupNorm):
    """Instance normalization with per-channel affine (GroupNorm, G = C)."""

    _family = "InstanceNorm"

    def _requested_groups(self) -> int:
        return self.num_features
