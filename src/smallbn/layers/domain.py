"""Domain-specific batch normalization (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021, §"domain-specific BN"; Chang et al., "Domain-Specific Batch Normalization", CVPR 2019).

One set of statistics per domain d (e.g. per FPN level, per dataset), one shared affine:

    y_n = γ (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β.

In training μ_d, σ²_d are the batch statistics of the samples of domain d; in evaluation the
running statistics of domain d.  ``running_mean``/``running_var`` have shape
``(num_domains, C)`` under BN's names; a BN checkpoint (shape ``(C,)``) loads by copying its
statistics to every domain.  The domain is chosen per call (``layer(x, domain=1)``), per
sample (a LongTensor of N domain ids), or for a whole model with :func:`use_domain`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, _affine_from_stats
from smallbn.stats import (
    Moments,
    SampleNormalization,
    merge_moments,
    normalize,
    normalize_from_sample_moments,
    normalize_with_population,
    sample_moments,
)

__all__ = [
    "DomainBatchNorm",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
    "use_domain",
]


class DomainBatchNorm(BatchStatsNorm):
    """Domain-specific BN for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    Args:
        num_domains: number of statistics sets.
        momentum: as BN; a cumulative average (``None``) is not supported, because the
            step counter ``num_batches_tracked`` is shared by the domains.
    """

    _family = "DomainBatchNorm"

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
        num_domains: int = 2,
        sync: bool = False,
        process_group: _distributed.ProcessGroup | None = None,
    ) -> None:
        if int(num_domains) < 1:
            raise ValueError(f"{type(self).__name__}: num_domains must be >= 1, got {num_domains}")
        if momentum is None:
            raise ValueError(
                f"{type(self).__name__}: momentum=None (cumulative average) is not supported "
                f"because the domains share one step counter; pass a momentum such as 0.1"
            )
        self.num_domains = int(num_domains)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            sync=sync,
            process_group=process_group,
        )
        self.active_domain = 0

    def _stats_shape(self) -> tuple[int, ...]:
        return (self.num_domains, self.num_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_domains={self.num_domains}"

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        for name in ("running_mean", "running_var"):
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and value.shape == (self.num_features,):
                state_dict[prefix + name] = value.unsqueeze(0).repeat(self.num_domains, 1)

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """The eval affine map of ``active_domain`` (fold a model per domain)."""
        if not self.track_running_stats:
            return None
        running_mean, running_var = self.running_stats()
        d = self.active_domain
        return _affine_from_stats(running_mean[d], running_var[d], self.eps, self.weight, self.bias)

    def population_moments(self, x: Tensor, *args: Any) -> Moments:
        """Per-domain moments ``(num_domains, C)`` of one batch."""
        index = self._domain_index(x, args[0] if args else None)
        return merge_moments(sample_moments(x.detach()), index, self.num_domains)

    @torch.no_grad()
    def set_population_stats(self, population: Moments) -> None:
        """Set each domain seen in the data; domains without samples keep their statistics."""
        running_mean, running_var = self.running_stats()
        seen = (population.count > 0).unsqueeze(-1)
        running_mean.copy_(torch.where(seen, population.mean.to(running_mean), running_mean))
        running_var.copy_(torch.where(seen, population.var.to(running_var), running_var))

    def _domain_index(self, x: Tensor, domain: int | Tensor | None) -> Tensor:
        domain = self.active_domain if domain is None else domain
        if isinstance(domain, Tensor):
            index = domain.to(device=x.device, dtype=torch.long).reshape(-1)
            if index.numel() != x.shape[0]:
                raise ValueError(
                    f"{self.describe()}: got {index.numel()} domain ids for a batch of "
                    f"{x.shape[0]} samples; pass one id per sample or a single int"
                )
            bad = (
                bool(((index < 0) | (index >= self.num_domains)).any()) if index.numel() else False
            )
        else:
            bad = not 0 <= int(domain) < self.num_domains
            index = torch.full((x.shape[0],), int(domain), dtype=torch.long, device=x.device)
        if bad:
            raise ValueError(
                f"{self.describe()}: domain ids must lie in [0, {self.num_domains}), got "
                f"{domain}; build the layer with a larger num_domains"
            )
        return index

    def forward(self, x: Tensor, domain: int | Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Normalize ``x`` with the statistics of ``domain`` (an int, or one id per sample;
        default: ``active_domain``)."""
        return super().forward(x, domain)

    def _forward_eval(self, x: Tensor, *args: Any) -> Tensor:
        domain = self.active_domain if args[0] is None else args[0]
        if not isinstance(domain, Tensor) and 0 <= int(domain) < self.num_domains:
            # one domain for the whole batch: BN's inference with that domain's statistics
            running_mean, running_var = self.running_stats()
            return normalize_with_population(
                x, running_mean[int(domain)], running_var[int(domain)], self.eps, self.weight,
                self.bias,
            )  # fmt: skip
        index = self._domain_index(x, args[0])
        running_mean, running_var = self.running_stats()
        return normalize(
            x, running_mean[index], running_var[index], self.eps, self.weight, self.bias
        )

    def _forward_train(self, x: Tensor, factor: float | None, *args: Any) -> Tensor:
        index = self._domain_index(x, args[0])

        def statistics(instance: Moments) -> SampleNormalization:
            domains = self._merge_groups(instance, index, self.num_domains)
            present = domains.count > 0
            too_small = present & (domains.count <= 1)
            if bool(too_small.any()):
                which = torch.nonzero(too_small).flatten().tolist()
                self._raise_too_small(x, 1, f"domain {which}")
            if factor is not None:
                # Only the domains present in the batch move.
                running_mean, running_var = self.running_stats()
                with torch.no_grad():
                    weight = (factor * present.to(running_mean.dtype)).unsqueeze(-1)
                    running_mean.lerp_(domains.mean.to(running_mean), weight)
                    running_var.lerp_(domains.unbiased_var().to(running_var), weight)
            return domains.mean[index], domains.var[index], self.weight, self.bias

        return normalize_from_sample_moments(x, statistics, self.eps, (self.weight, self.bias))


class DomainBatchNorm1d(DomainBatchNorm):
    """Domain-specific BN for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_dim = 1


class DomainBatchNorm2d(DomainBatchNorm):
    """Domain-specific BN for ``(N, C, H, W)`` inputs."""

    _input_dim = 2


class DomainBatchNorm3d(DomainBatchNorm):
    """Domain-specific BN for ``(N, C, D, H, W)`` inputs."""

    _input_dim = 3


@contextmanager
def use_domain(model: nn.Module, domain: int) -> Iterator[nn.Module]:
    """Within the block every :class:`DomainBatchNorm` of ``model`` uses ``domain``."""
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm)]
    previous = [m.active_domain for m in layers]
    for m in layers:  # every layer is checked before any is switched
        if not 0 <= domain < m.num_domains:
            raise ValueError(
                f"{m.describe()}: domain {domain} not in [0, {m.num_domains}); pass a domain "
                f"every DomainBatchNorm of the model has"
            )
    for m in layers:
        m.active_domain = domain
    try:
        yield model
    finally:
        for m, d in zip(layers, previous, strict=True):
            m.active_domain = d
