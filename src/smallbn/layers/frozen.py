"""Frozen batch normalization: BN with fixed statistics and affine.

    y = γ (x − μ) / sqrt(σ² + eps) + β   with μ, σ², γ, β all constants (buffers),

as used in detection backbones (Detectron, Wu & Johnson 2021 §"FrozenBN") and for the last
epochs of training to remove the train/test inconsistency of batch statistics.  The state
dict is BN's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so a BN checkpoint loads in and back out unchanged.  Gradients
flow to the input only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn.layers._base import NormBase
from smallbn.stats import normalize_with_population

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class FrozenBatchNorm(NormBase, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """Frozen BN for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    ``momentum`` and ``track_running_stats`` are accepted for BN-compatible construction;
    the statistics never change.
    """

    _family = "FrozenBatchNorm"
    _affine_as_buffers = True

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
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: a frozen BN normalizes with stored statistics and "
                f"needs track_running_stats=True; for batch statistics use 'bn' or 'syncbn'"
            )
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return normalize_with_population(x, *self.running_stats(), self.eps, self.weight, self.bias)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BN for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BN for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BN for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3
