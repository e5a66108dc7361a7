"""Synchronized batch normalization that works on any device and backend.

Batch normalization (Ioffe & Szegedy, 2015) over the union of all processes' batches:

    μ = Σ_r n_r μ_r / Σ_r n_r,   σ² = Σ_r n_r (σ_r² + (μ_r − μ)²) / Σ_r n_r,
    y = γ (x − μ) / sqrt(σ² + eps) + β,

with gradients flowing through μ and σ² to every process's input, so the result equals BN
over the concatenated batch (a process with an empty batch contributes nothing).
Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU over gloo as well as on GPU over NCCL, and
behaves as plain BN when no process group is initialized.  Running statistics follow
``torch.nn.BatchNorm`` exactly (unbiased variance, ``momentum`` weights the new batch).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(BatchStatsNorm, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """BN with statistics pooled across processes; accepts any input of rank ≥ 2.

    Args mirror ``torch.nn.SyncBatchNorm``; ``sync=False`` turns pooling off (plain BN).
    """

    _input_dim = None
    _family = "SyncBatchNorm"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: _distributed.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        sync: bool = True,
    ) -> None:
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

    def _forward_train(self, x: Tensor, factor: float | None) -> Tensor:
        y, moments = self._batch_norm(x)
        self._update_running(moments.mean, moments.unbiased_var(), factor)
        return y
