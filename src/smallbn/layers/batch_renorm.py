"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", NeurIPS 2017).

Training, with batch statistics μ_B, σ_B = sqrt(σ²_B + eps) and running μ, σ = sqrt(var + eps):

    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)   (no gradient)
    x̂ = (x − μ_B) / σ_B · r + d,          y = γ x̂ + β.

Since r and d are constants for backprop, this is BN with affine ``(γ r, β + γ d)``, which is
how it is computed.  Inference is BN's: ``y = γ (x − μ) / σ + β``.  ``r_max`` and ``d_max``
start at 1 and 0 (plain BN) and are relaxed linearly, as in the paper: r_max = 1, d_max = 0 for
the first ``warmup_steps`` (paper: 5k) steps, then r_max reaches its final value at
``r_max_ramp_end`` (40k) and d_max at ``d_max_ramp_end`` (25k).  The step is
``num_batches_tracked``, so the state_dict is exactly BN's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, checked_norm_batch_size
from smallbn.stats import Moments, SampleNormalization, normalize_from_sample_moments

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _ramp(step: Tensor, start: int, end: int) -> Tensor:
    """0 before ``start``, 1 from ``end`` on, linear in between."""
    if end <= start:
        return (step >= start).to(torch.float32)
    return ((step.to(torch.float32) - start) / (end - start)).clamp(0.0, 1.0)


def _clip(value: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``clamp(value, low, high)`` (same numbers), written as two reductions over a stack.

    Why not ``torch.clamp``: under ``torch.compile`` the AOT min-cut partitioner may recompute
    cheap pointwise values in the backward instead of saving them, and r and d are pointwise
    reads of the running statistics, which this step then updates in place; the backward
    read the updated buffers ("modified by an inplace operation", or silently other r, d;
    pytorch/pytorch#197039).  The partitioner never recomputes reductions, so r and d are
    saved as computed.
    """
    low, high = low.expand_as(value), high.expand_as(value)
    return torch.stack([torch.stack([value, low]).amax(0), high]).amin(0)


class BatchRenorm(BatchStatsNorm, _BatchNorm):  # _BatchNorm: found by type (NormBase)
    """Batch Renormalization for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    Args:
        r_max, d_max: final clipping bounds (paper: 3 and 5).
        warmup_steps: steps of plain BN before the bounds are relaxed.
        r_max_ramp_end, d_max_ramp_end: step at which each bound reaches its final value.
        momentum: weight of the new batch in the running averages (paper: 0.01).
        norm_batch_size: normalize consecutive groups of this many samples, each with its
            own statistics, r and d (a simulated small normalization batch; running statistics
            average the groups').
    """

    _family = "BatchRenorm"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_end: int = 40000,
        d_max_ramp_end: int = 25000,
        norm_batch_size: int | None = None,
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
    ) -> None:
        if not (math.isfinite(r_max) and math.isfinite(d_max)) or r_max < 1 or d_max < 0:
            raise ValueError(
                f"{type(self).__name__}: need finite r_max >= 1 and d_max >= 0, got "
                f"r_max={r_max}, d_max={d_max} (r_max=1, d_max=0 is plain BN; for clipping "
                f"that never binds pass large finite limits, e.g. r_max=1e6, d_max=1e6)"
            )
        checked_norm_batch_size(type(self).__name__, norm_batch_size)
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
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.r_max_ramp_end, self.d_max_ramp_end = int(r_max_ramp_end), int(d_max_ramp_end)
        self.norm_batch_size = None if norm_batch_size is None else int(norm_batch_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"
        )

    def current_limits(self, step: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` in force at ``step`` (default: the next training step)."""
        if step is None:
            step = self.num_batches_tracked if self.num_batches_tracked is not None else 0
        step = torch.as_tensor(step)
        r_max = 1.0 + (self.r_max - 1.0) * _ramp(step, self.warmup_steps, self.r_max_ramp_end)
        d_max = self.d_max * _ramp(step, self.warmup_steps, self.d_max_ramp_end)
        return r_max, d_max

    def _renorm_affine(self, moments: Moments) -> tuple[Tensor | None, Tensor | None]:
        """BN's affine with r and d folded in: ``(γ r, β + γ d)``; r, d without gradient,
        computed from the running statistics before this step's update (paper, Alg. 1)."""
        if not self.track_running_stats:
            return self.weight, self.bias
        assert self.num_batches_tracked is not None
        running_mean, running_var = self.running_stats()
        with torch.no_grad():
            r_max, d_max = self.current_limits(self.num_batches_tracked - 1)
            r_max, d_max = r_max.to(moments.var), d_max.to(moments.var)
            running_std = torch.sqrt(running_var.to(moments.var) + self.eps)
            batch_std = torch.sqrt(moments.var + self.eps)
            r = _clip(batch_std / running_std, 1.0 / r_max, r_max)
            d = _clip((moments.mean - running_mean.to(moments.mean)) / running_std, -d_max, d_max)
        gamma = self.weight if self.weight is not None else torch.ones_like(r)
        beta = self.bias if self.bias is not None else torch.zeros_like(d)
        return gamma * r, beta + gamma * d

    def _forward_train(self, x: Tensor, factor: float | None) -> Tensor:
        # Synchronized, the groups span every process's batch: every rank must take this
        # path (a local size test could differ between ranks and mismatch their collectives).
        size = self.norm_batch_size
        if size is not None and (x.shape[0] > size or self._sync_group() is not None):
            index, num_groups = self._sample_groups(x, size)

            def statistics(instance: Moments) -> SampleNormalization:
                groups = self._merge_groups(instance, index, num_groups, x)
                weight, bias = self._renorm_affine(groups.detach())  # (G, C): r, d per group
                self._update_running_from_groups(groups, factor)
                return (
                    groups.mean[index],
                    groups.var[index],
                    None if weight is None else (weight[index] if weight.dim() == 2 else weight),
                    None if bias is None else (bias[index] if bias.dim() == 2 else bias),
                )

            return normalize_from_sample_moments(x, statistics, self.eps, (self.weight, self.bias))
        y, moments = self._batch_norm(x, self._renorm_affine)
        self._update_running(moments.mean, moments.unbiased_var(), factor)
        return y


class BatchRenorm1d(BatchRenorm):
    """Batch Renormalization for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class BatchRenorm2d(BatchRenorm):
    """Batch Renormalization for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class BatchRenorm3d(BatchRenorm):
    """Batch Renormalization for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3
