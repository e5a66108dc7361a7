"""Batch-independent baselines through torch's ``group_norm``: GroupNorm, LayerNorm and
InstanceNorm over ``(C, *spatial)``.

Group Normalization (Wu & He, ECCV 2018) splits the C channels into G groups and normalizes
each sample's group g with its own statistics over (C/G channels, *spatial):

    y = γ (x − μ_{n,g}) / sqrt(σ²_{n,g} + eps) + β.

G = 1 is layer normalization over (C, *spatial) (Ba et al., 2016) and G = C is instance
normalization (Ulyanov et al., 2016), both with per-channel affine.  These layers keep BN's
``running_mean``/``running_var``/``num_batches_tracked`` buffers in memory only, so that a BN
checkpoint loads into a converted model and converting back to BN restores them; the
computation never reads them, and their ``state_dict`` is ``nn.GroupNorm``'s (``weight``,
``bias``): a GN checkpoint loaded into a BN layer fails on the missing statistics instead of
evaluating with placeholders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from smallbn.layers._base import NormBase
from smallbn.stats import exporting, stats_dtype

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
    _running_stats_in_state_dict = False  # never computed here: see NormBase

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
        num_groups: int | None = None,
        channels_per_group: int | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
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
        weight, bias = self._affine_for(x)
        if torch.jit.is_tracing():
            # The TorchScript tracer (torch.jit.trace, the legacy ONNX exporter): the ONNX
            # exporter knows torch's group_norm, not the native_group_norm kernel below that
            # also returns the statistics to check; a trace keeps no check anyway.
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        y, mean, rstd = self._group_norm(x, weight, bias, self.eps)
        if exporting():
            return y  # an exported program reads nothing back and keeps no flag (stats.exporting)
        now = self._finite_check_now(rstd)
        if now and not bool(_usable(mean, rstd)):  # one host read of (N, G) values
            y = self._recover(x, weight, bias)
        elif now is False:  # deferred: a finite overflow is then reported, not recovered
            self._record_finite(_usable(mean, rstd))
        return y

    def _affine_for(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """γ and β in a dtype torch's kernel takes with ``x``: the input's for float32/float64
        inputs (torch raises "mixed dtype" for a float64 input with float32 parameters, as a
        layer built with the default dtype has), the input's or float32 for half inputs."""
        params = [p for p in (self.weight, self.bias) if p is not None]
        if x.dtype in (torch.float32, torch.float64) or not params:
            dtype = x.dtype
        elif all(p.dtype == x.dtype for p in params):
            dtype = x.dtype
        else:  # torch's mixed kernel: half input, float32 parameters
            dtype = torch.float32
        return tuple(  # type: ignore[return-value]
            p if p is None or p.dtype == dtype else p.to(dtype) for p in (self.weight, self.bias)
        )

    def _group_norm(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """torch's group-norm kernel: the output, and each (sample, group)'s mean and
        ``1/sqrt(σ² + eps)`` (``(N, G)``, to check)."""
        n, c = x.shape[:2]
        if x.device.type == "cpu" and x.dim() > 2 and not x.is_contiguous():
            x = x - self._group_means(x)
            x = x.contiguous(memory_format=_layout(x))
        else:
            x = x.contiguous()
        return torch.native_group_norm(
            x, weight, bias, n, c, math.prod(x.shape[2:]), self.num_groups, eps
        )

    def _recover(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """The output where the kernel's statistics are not usable: an error naming the layer
        for a non-finite input; for a finite one, whose squared deviations overflow the
        kernel's float32 accumulation (|x| above ~1e19: torch returns the bias alone, or NaN
        for channels-last inputs), the same computation in float64, rounded to x's dtype."""
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"{self.describe()}: the input to this layer contains NaN/Inf (input shape "
                f"{tuple(x.shape)}). Find the source with torch.autograd.set_detect_anomaly("
                f"True); usual fixes are a lower learning rate or gradient clipping. "
                f"(smallbn.set_finite_check(False) skips this check.)"
            )
        wide, eps = x.to(torch.float64), self.eps
        if x.dtype == torch.float64:
            # float64 itself overflowed (|x| above ~1e154): normalize x·2^-k with eps·4^-k,
            # the same output (a power of two scales exactly).
            peak = float(wide.detach().abs().amax())
            scale = math.ldexp(1.0, -math.frexp(peak)[1])
            wide, eps = wide * scale, eps * scale * scale
        wide_params = [None if p is None else p.to(torch.float64) for p in (weight, bias)]
        y, mean, rstd = self._group_norm(wide, *wide_params, eps)
        if not bool(_usable(mean, rstd)):
            raise ValueError(
                f"{self.describe()}: a group of the input has no usable statistics (zero "
                f"variance with eps={self.eps}, or a variance beyond float64's range; input "
                f"shape {tuple(x.shape)}). Use eps > 0, or scale the input into a smaller range."
            )
        return y.to(x.dtype)

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
            channel_means = x.mean(dim=tuple(range(2, x.dim())), dtype=stats_dtype(x.dtype))
            groups = channel_means.view(n, self.num_groups, c // self.num_groups)
            means = groups.mean(-1, keepdim=True).expand_as(groups).reshape(n, c)
        return means.to(x.dtype).view(n, c, *([1] * (x.dim() - 2)))


def _layout(x: Tensor) -> torch.memory_format:
    """The channels-last format ``x`` is laid out in, else contiguous (torch's kernel takes
    either, dense)."""
    for rank, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == rank and x.is_contiguous(memory_format=layout):
            return layout
    return torch.contiguous_format


def _usable(mean: Tensor, rstd: Tensor) -> Tensor:
    """Whether every group's mean is finite and ``1/sqrt(σ² + eps)`` finite and positive (0
    where σ² overflowed, NaN for a non-finite input, Inf for zero variance with eps = 0)."""
    return torch.isfinite(mean).all() & torch.isfinite(rstd).all() & (rstd > 0).all()


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
