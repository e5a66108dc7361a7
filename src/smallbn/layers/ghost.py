"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, "Train longer, generalize better",
NeurIPS 2017; discussed as a remedy for information leakage in Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021).

The batch is split into consecutive groups of ``group_size`` samples (the last group may be
smaller) and each group g is normalized with its own statistics:

    y_n = γ (x_n − μ_g) / sqrt(σ²_g + eps) + β   for every sample n of group g.

Running statistics average the statistics the groups were normalized with (count-weighted
group means and Bessel-corrected group variances), so that inference matches what training
normalized with — not the variance of the whole batch, which also contains the spread
between groups.  With ``sync=True`` groups are formed over the concatenation of all
processes' batches in rank order, so N processes behave as one process with the
concatenated batch; a group may span two processes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class GhostBatchNorm(BatchStatsNorm, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """Ghost BN for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    Args:
        group_size: samples per normalization group (≥ 1); ``group_size ≥ batch`` is BN.
    """

    _family = "GhostBatchNorm"

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
        bias: bool = True,
        group_size: int = 32,
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
    ) -> None:
        if int(group_size) < 1:
            raise ValueError(f"{type(self).__name__}: group_size must be >= 1, got {group_size}")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            sync=sync,
            process_group=process_group,
        )
        self.group_size = int(group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def normalization_batch(self) -> int:
        return self.group_size

    def _forward_train(self, x: Tensor, factor: float | None) -> Tensor:
        return self._normalize_groups(x, self.group_size, factor)


class GhostBatchNorm1d(GhostBatchNorm):
    """Ghost BN for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class GhostBatchNorm2d(GhostBatchNorm):
    """Ghost BN for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class GhostBatchNorm3d(GhostBatchNorm):
    """Ghost BN for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3
