"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, "Differentiable Learning-to-Normalize
via Switchable Normalization", ICLR 2019; arXiv 1806.10779, 2018).

A learned mixture of instance (IN), layer (LN) and batch (BN) statistics.  From the instance
moments μ_in, σ²_in (per sample and channel, over the spatial dims) — one pass over x —

    μ_ln = mean_c μ_in,   σ²_ln = mean_c(σ²_in + μ_in²) − μ_ln²      (per sample)
    μ_bn = mean_n μ_in,   σ²_bn = mean_n(σ²_in + μ_in²) − μ_bn²      (per channel, training)

then with separate softmax weights for mean and variance (logits initialised equal)

    μ = Σ_k softmax(λ)_k μ_k,   σ² = Σ_k softmax(λ')_k σ²_k,   y = γ (x − μ)/sqrt(σ² + eps) + β.

Inference uses BN's running statistics for the batch branch (EMA; ``momentum=None`` gives the
paper's "batch average" alternative, a cumulative average).  A branch whose statistics cannot
be computed — IN on inputs without spatial extent (N×C×1×1, the authors' release returns NaN
there), BN on a single value per channel (batch 1 without spatial dims) — is left out of the
mixture for that call (the remaining weights renormalized), with a one-time warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, checked_norm_batch_size
from smallbn.stats import (
    Moments,
    SampleNormalization,
    all_gather_moments,
    exporting,
    merge_equal_moments,
    merge_moments,
    normalize_from_sample_moments,
)

__all__ = [
    "BRANCHES",
    "SwitchableNorm",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
]

BRANCHES = ("in", "ln", "bn")


class SwitchableNorm(BatchStatsNorm):
    """Switchable Normalization for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    Args:
        branches: the statistics mixed, a subset of ``("in", "ln", "bn")`` in that order;
            ``("in", "ln")`` is the paper's variant without BN (batch 1); a single branch is
            exactly IN, LN (over C and space) or BN.
        last_gamma: initialise γ to 0 (for the last norm of a residual block).
        norm_batch_size: the BN branch uses the statistics of consecutive groups of this
            many samples (a simulated small normalization batch).
        sync: pool the batch branch's statistics across processes.
        unbiased_instance_var: the authors' release computes σ²_in with ``torch.var``'s
            default Bessel correction (divisor M − 1 over the M spatial values, not M), and
            builds LN's and the training BN branch's statistics from it by the formulas
            above.  ``True`` does the same, so that the release's trained models
            (:mod:`smallbn.checkpoints`) give their own outputs; ``False`` (default) uses the
            paper's population moments.  On a single spatial value the corrected variance is
            undefined and the IN branch is left out (the release returns NaN there).  The
            running statistics keep BN's update (momentum, Bessel correction of the batch
            branch's variance) either way: the release's keep-factor convention and estimator
            differ there, which changes training, not the inference of a loaded model.

    State: BN's keys plus ``mean_weight`` and ``var_weight`` (the logits λ, λ'); a BN
    checkpoint without them loads with equal logits.
    """

    _family = "SwitchableNorm"

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
        branches: Sequence[str] = BRANCHES,
        last_gamma: bool = False,
        norm_batch_size: int | None = None,
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
        unbiased_instance_var: bool = False,
    ) -> None:
        chosen = tuple(b.lower() for b in branches)
        if not chosen or any(b not in BRANCHES for b in chosen) or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"{type(self).__name__}: branches must be a non-empty subset of {BRANCHES}, "
                f"got {tuple(branches)}"
            )
        self.branches = tuple(b for b in BRANCHES if b in chosen)
        self.last_gamma = last_gamma
        self.norm_batch_size = checked_norm_batch_size(type(self).__name__, norm_batch_size)
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
        self.unbiased_instance_var = bool(unbiased_instance_var)
        k = len(self.branches)
        self.mean_weight = nn.Parameter(torch.ones(k, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(k, device=device, dtype=dtype))
        self._warned: set[str] = set()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.last_gamma and self.weight is not None:
            with torch.no_grad():
                self.weight.zero_()

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", branches={self.branches}"
        if self.unbiased_instance_var:
            text += ", unbiased_instance_var=True"
        return text

    def mixture(self) -> dict[str, dict[str, float]]:
        """The current softmax weights ``{"mean": {"in": …, …}, "var": {…}}``."""
        mean = torch.softmax(self.mean_weight.detach().float(), 0).tolist()
        var = torch.softmax(self.var_weight.detach().float(), 0).tolist()
        return {
            "mean": dict(zip(self.branches, mean, strict=True)),
            "var": dict(zip(self.branches, var, strict=True)),
        }

    _checkpoint_rules = {
        **BatchStatsNorm._checkpoint_rules,
        "mean_weight": "finite",
        "var_weight": "finite",
    }

    def _checkpoint_mismatch(self, state_dict: dict[str, Any], prefix: str) -> str:
        logits = state_dict.get(prefix + "mean_weight")
        if isinstance(logits, Tensor) and logits.shape != self.mean_weight.shape:
            count = logits.numel()
            hint = {
                1: "a single branch",
                2: "two branches (e.g. ('in', 'ln'), the variant without BN)",
                3: "all three branches ('in', 'ln', 'bn')",
            }.get(count, f"{count} branches")
            return (
                f"The checkpoint mixes {count} branch(es) (mean_weight has {count} logits), "
                f"this layer {len(self.branches)}: {self.branches}. Build it with the "
                f"checkpoint's branches: {hint}."
            )
        return super()._checkpoint_mismatch(state_dict, prefix)

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        # A BN checkpoint has no mixture logits: keep the initial (equal) ones.
        for name in ("mean_weight", "var_weight"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())

    # -- statistics ------------------------------------------------------------------------

    def _warn_once(self, branch: str, why: str) -> None:
        if branch not in self._warned:
            self._warned.add(branch)
            warnings.warn(
                f"{self.describe()}: the {branch.upper()} branch is left out of the mixture "
                f"{why}; the other branches' weights are renormalized",
                RuntimeWarning,
                stacklevel=4,
            )

    def _batch_branch(
        self, instance: Moments, index: Tensor | None = None, num_groups: int | None = None
    ) -> Moments:
        """BN statistics from the instance moments (per group of samples with ``index``),
        pooled across processes if syncing."""
        group = self._sync_group()
        if index is None and group is None and instance.count.numel() > 0:
            mean, var = merge_equal_moments(instance.mean, instance.var, 0)  # equal counts
            batch = Moments(instance.count.sum(), mean[0], var[0])
        else:
            batch = merge_moments(instance, index, num_groups)
        if group is not None:
            batch = merge_moments(all_gather_moments(batch, group))
        self._check_finite(batch)
        return batch

    def _mix(
        self, stats: dict[str, tuple[Tensor, Tensor]], usable: dict[str, bool]
    ) -> tuple[Tensor, Tensor]:
        mean_logits: Tensor = self.mean_weight
        var_logits: Tensor = self.var_weight
        if not all(usable.values()):  # renormalize over the computable branches only
            index = [i for i, b in enumerate(self.branches) if not usable[b]]
            mean_logits = mean_logits.index_fill(
                0, mean_logits.new_tensor(index).long(), float("-inf")
            )
            var_logits = var_logits.index_fill(
                0, var_logits.new_tensor(index).long(), float("-inf")
            )
        # In the statistics' dtype (float32 at least): float16 softmax weights do not sum to 1
        # (a constant input of 3000 came out as 231.6, not β) and the logits' gradient
        # overflowed float16.
        dtype = stats[self.branches[0]][0].dtype
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        mean_w = torch.softmax(mean_logits, 0, dtype=dtype)
        var_w = torch.softmax(var_logits, 0, dtype=dtype)
        # Statistics cast too: a 0-dim weight times float16 running statistics stays float16.
        mean = sum(
            mean_w[i] * stats[b][0].to(dtype) for i, b in enumerate(self.branches) if usable[b]
        )
        var = sum(
            var_w[i] * stats[b][1].to(dtype) for i, b in enumerate(self.branches) if usable[b]
        )
        return mean, var  # type: ignore[return-value]

    def _normalize(self, x: Tensor, factor: float | None, training: bool) -> Tensor:
        def statistics(instance: Moments) -> SampleNormalization:
            mean, var = self._statistics(x, instance, factor, training)
            return mean, var, self.weight, self.bias

        params = (self.weight, self.bias, self.mean_weight, self.var_weight)
        return normalize_from_sample_moments(x, statistics, self.eps, params)

    def _statistics(
        self, x: Tensor, instance: Moments, factor: float | None, training: bool
    ) -> tuple[Tensor, Tensor]:
        """The mixed ``(μ, σ²)``, each ``(N, C)``, from x's instance moments (the one pass
        over x).  In eval mode an exported program (:func:`~smallbn.stats.exporting`) leaves
        the finite checks out: it can read nothing back."""
        check = training or not exporting()
        if check:
            self._check_finite(instance, x)
        n, c = instance.mean.shape
        per_sample = math.prod(x.shape[2:]) if n else 0  # from the shape: no device sync
        if self.unbiased_instance_var and per_sample > 1:  # the release's torch.var default
            instance = Moments(
                instance.count, instance.mean, instance.var * (per_sample / (per_sample - 1))
            )
        stats: dict[str, tuple[Tensor, Tensor]] = {}
        usable: dict[str, bool] = {}
        if "in" in self.branches:
            stats["in"] = (instance.mean, instance.var)
            usable["in"] = per_sample > 1
            if not usable["in"]:
                self._warn_once("in", "for inputs with a single value per sample and channel")
        if "ln" in self.branches:
            stats["ln"] = merge_equal_moments(instance.mean, instance.var, 1)  # (N, 1)
            usable["ln"] = per_sample * c > 1
            if not usable["ln"]:
                self._warn_once("ln", "for inputs with a single value per sample")
        if "bn" in self.branches:
            size = self.norm_batch_size  # synchronized: groups span every rank (see BRN)
            if training and size is not None and (n > size or self._sync_group() is not None):
                index, num_groups = self._sample_groups(x, size)
                groups = self._batch_branch(instance, index, num_groups)
                self._update_running_from_groups(groups, factor)
                stats["bn"] = (groups.mean[index], groups.var[index])
                usable["bn"] = True  # _sample_groups rejected groups of a single value
            elif training:
                batch = self._batch_branch(instance)
                usable["bn"] = bool(batch.count > 1) if self._sync_group() else n * per_sample > 1
                if usable["bn"]:
                    self._update_running(batch.mean, batch.unbiased_var(), factor)
                else:
                    self._warn_once("bn", "for a batch with a single value per channel")
                stats["bn"] = (batch.mean.unsqueeze(0), batch.var.unsqueeze(0))
            else:
                running_mean, running_var = self.running_stats()
                stats["bn"] = (running_mean.unsqueeze(0), running_var.unsqueeze(0))
                usable["bn"] = True
        if not any(usable.values()):
            if not training:
                raise ValueError(
                    f"{self.describe()}: without the 'bn' branch every statistic comes from "
                    f"the sample itself, which needs more than one value per sample and "
                    f"channel (input shape {tuple(x.shape)}). Include 'bn' in branches, or "
                    f"use inputs with spatial dims."
                )
            self._raise_too_small(x, per_sample, "every branch of the mixture")  # undoes the step
        if training and usable.get("bn") is False:
            # No batch statistics were averaged in: not a step of momentum=None's average.
            self._undo_step(factor)
        mean, var = self._mix(stats, usable)
        if not training and check:  # training checked the statistics it computed; here the
            # mixture of a sample's own moments can still overflow (LN's E[x²] at |x| ~1e20)
            self._check_finite(Moments(mean.new_ones(()), mean, var), x)
        return mean.expand(n, c), var.expand(n, c)

    def _forward_train(self, x: Tensor, factor: float | None, *args: Any) -> Tensor:
        return self._normalize(x, factor, training=True)

    def _forward_eval(self, x: Tensor, *args: Any) -> Tensor:
        return self._normalize(x, None, training=False)

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """BN's affine map for a pure-BN mixture; otherwise ``None`` (IN/LN statistics depend
        on the sample, so the eval output is not a fixed per-channel map)."""
        return super().eval_affine() if self.branches == ("bn",) else None

    def lost_on_replacement(self, replacement: nn.Module) -> str:
        if getattr(replacement, "mean_weight", None) is not None:  # another SN keeps λ, λ'
            return ""
        return (
            "its learned mixture of IN/LN/BN statistics (Switchable Norm) is dropped: the eval "
            "output changes"
        )


class SwitchableNorm1d(SwitchableNorm):
    """Switchable Normalization for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class SwitchableNorm2d(SwitchableNorm):
    """Switchable Normalization for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class SwitchableNorm3d(SwitchableNorm):
    """Switchable Normalization for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3
