"""Domain-specific batch normalization (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021, §"domain-specific BN"; Chang et al., "Domain-Specific Batch Normalization", CVPR 2019).

One set of statistics per domain d (e.g. per FPN level, per dataset), one shared affine:

    y_n = γ (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β,

or, with ``per_domain_affine=True``, one affine per domain as well (Chang et al.'s DSBN gives
each domain its own γ, β; Wu & Johnson, Table 5, compare sharing the affine layer of a
RetinaNet head's per-level BN across the FPN levels or not):

    y_n = γ_{d(n)} (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β_{d(n)}.

In training μ_d, σ²_d are the batch statistics of the samples of domain d; in evaluation the
running statistics of domain d.  ``running_mean``/``running_var`` have shape
``(num_domains, C)`` under BN's names, and so do ``weight``/``bias`` with
``per_domain_affine=True`` (``(C,)`` otherwise, as BN's).  A BN checkpoint (shape ``(C,)``)
loads by copying its statistics, and with ``per_domain_affine=True`` its γ and β, to every
domain; γ_d and β_d get gradient from the samples of domain d only.  The domain is chosen
per call (``layer(x, domain=1)``), per sample (a LongTensor of N domain ids), or for a whole
model with :func:`use_domain`.

Structural checks and host reads.  Training needs more than one value per channel in every
domain present, and ids must lie in ``[0, num_domains)``.  With an ``int`` domain (and no
synchronization) both are decided on the host from the shapes.  With a tensor of ids they
depend on the ids' values: on CPU (outside ``torch.compile``) and in the strict finite-check
mode ``"step"`` they are read at once and raise before any state changes; elsewhere (CUDA,
compiled graphs) a host read would synchronize every step, so the check is *deferred* like
the finite check (:func:`smallbn.set_finite_check`): the step runs with out-of-range ids
clamped into range, the first such training call is recorded on the device together with
its cause (``_domain_problem``), and the error (naming the layer, the call and the cause) is
raised when the deferred flag is read: every ``interval`` training calls, in ``eval()`` and
in :func:`smallbn.check_finite`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from smallbn import _distributed
from smallbn.layers._base import BatchStatsNorm, _affine_from_stats
from smallbn.layers._finite_check import deferred_interval
from smallbn.stats import (
    Moments,
    SampleNormalization,
    merge_moments,
    normalize,
    normalize_from_sample_moments,
    normalize_with_population,
    sample_moments,
    update_running_stats,
)

#: Bits of ``DomainBatchNorm._domain_problem``: what a deferred check found at the recorded call.
_OUT_OF_RANGE = 1  # a domain id outside [0, num_domains)
_ONE_VALUE = 2  # a domain present in a training batch with one value per channel
_NOT_FINITE = 4  # NaN/Inf batch statistics
_IN_EVAL = 8  # found in an evaluation call (after the recorded number of training calls)

__all__ = [
    "DomainBatchNorm",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
    "use_domain",
]


class DomainBatchNorm(BatchStatsNorm):
    """Domain-specific BN for inputs of any rank ≥ 2 (see the 1d/2d/3d variants).

    Sample n of domain d(n) is normalized as
    ``y_n = γ (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β`` (shared affine, the default) or
    ``y_n = γ_{d(n)} (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β_{d(n)}``
    (``per_domain_affine=True``).

    Args:
        num_domains: number of statistics sets.
        per_domain_affine: give every domain its own γ, β (``weight``/``bias`` of shape
            ``(num_domains, C)``, initialised to ones/zeros), as Domain-Specific BN does
            (Chang et al., CVPR 2019); the default shares one ``(C,)`` affine across the
            domains, as the per-level BN of Wu & Johnson 2021 (Table 5 compares both).
            Needs ``affine=True``.
        momentum: as BN; a cumulative average (``None``) is not supported, because the
            step counter ``num_batches_tracked`` is shared by the domains.
    """

    _family = "DomainBatchNorm"
    repeated_calls_define_population = True  # each call's samples go to their own domains

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
        num_domains: int = 2,
        per_domain_affine: bool = False,
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
        if per_domain_affine and not affine:
            raise ValueError(
                f"{type(self).__name__}: per_domain_affine=True gives every domain its own "
                f"affine (γ, β), but affine=False builds the layer without one; pass "
                f"affine=True, or drop per_domain_affine"
            )
        self.num_domains = int(num_domains)
        # Set before the base's __init__, which reads it (_affine_shape) to create γ and β.
        self.per_domain_affine = bool(per_domain_affine)
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
        self.active_domain = 0
        # What the deferred structural check found at the call recorded in _nonfinite_call
        # (bits _OUT_OF_RANGE, ...; 0: nothing), on the device: recording costs no host read.
        self.register_buffer(
            "_domain_problem", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )

    def _stats_shape(self) -> tuple[int, ...]:
        return (self.num_domains, self.num_features)

    def _affine_shape(self) -> tuple[int, ...]:
        if self.per_domain_affine:
            return (self.num_domains, self.num_features)
        return (self.num_features,)

    def _domain_affine(self, domain: int | Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(γ, β)`` to normalize domain ``domain`` with (an int: ``(C,)`` rows; a tensor of
        per-sample ids ``(N,)``: ``(N, C)`` rows, one per sample): the rows of ``domain`` with
        ``per_domain_affine=True``, the shared ``(C,)`` affine otherwise (``None`` where the
        layer has none).  Indexing keeps the graph to the parameters, so the gradient of
        ``weight``/``bias`` reaches the rows of the domains used, and only those."""
        if not self.per_domain_affine:
            return self.weight, self.bias
        weight = None if self.weight is None else self.weight[domain]
        bias = None if self.bias is None else self.bias[domain]
        return weight, bias

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", num_domains={self.num_domains}"
        # Only when set: the default's repr stays what it was.
        return text + (", per_domain_affine=True" if self.per_domain_affine else "")

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A BN checkpoint's ``(C,)`` statistics, and with ``per_domain_affine=True`` its
        ``(C,)`` γ and β (BN's, or a shared-affine domain BN's), copied to every domain."""
        names = ["running_mean", "running_var"]
        if self.per_domain_affine:
            names += ["weight", "bias"]
        for name in names:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and value.shape == (self.num_features,):
                state_dict[prefix + name] = value.unsqueeze(0).repeat(self.num_domains, 1)

    def _checkpoint_mismatch(self, state_dict: dict[str, Any], prefix: str) -> str:
        """Name the option that differs from a domain-BN checkpoint's ``(D, C)`` statistics
        or ``(D, C)`` affine: ``num_domains`` (the base's message would send the user to
        num_features), the channels, ``per_domain_affine`` (a per-domain γ, β met by a layer
        with one shared affine), or several."""
        stored = state_dict.get(prefix + "running_mean")
        weight = state_dict.get(prefix + "weight")
        per_domain = isinstance(weight, Tensor) and weight.dim() == 2 and self.affine
        if isinstance(stored, Tensor) and stored.dim() == 2:
            domains, channels = stored.shape
        elif per_domain:
            assert isinstance(weight, Tensor)
            domains, channels = weight.shape
        else:
            return super()._checkpoint_mismatch(state_dict, prefix)  # a BN checkpoint, or none
        differences, options = [], []
        if per_domain and not self.per_domain_affine:
            assert isinstance(weight, Tensor)
            differences.append(
                f"per_domain_affine: the checkpoint has a separate affine per domain (weight "
                f"of shape {tuple(weight.shape)}), this layer one affine shared by the domains "
                f"(shape ({self.num_features},))"
            )
            options.append("per_domain_affine=True")
        if domains != self.num_domains:
            differences.append(
                f"num_domains: the checkpoint has {domains} domains, this layer {self.num_domains}"
            )
            options.append(f"num_domains={domains}")
        if channels != self.num_features:
            differences.append(
                f"num_features: the checkpoint has {channels} channels, this layer "
                f"{self.num_features}"
            )
            options.append(f"num_features={channels}")
        if not differences:  # the statistics and the affine's kind match: another tensor differs
            return super()._checkpoint_mismatch(state_dict, prefix)
        return (
            f"It differs in {'; '.join(differences)}. Build the layer with "
            f"{' and '.join(options)}, or load a checkpoint made for this model."
        )

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """The eval affine map of ``active_domain`` (fold a model per domain): its running
        statistics and, with ``per_domain_affine=True``, its γ, β rows."""
        if not self.track_running_stats:
            return None
        running_mean, running_var = self.running_stats()
        d = self.active_domain
        return _affine_from_stats(
            running_mean[d], running_var[d], self.eps, *self._domain_affine(d)
        )

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

    def _check_domain(self, domain: object) -> int | Tensor:
        """``domain`` as an ``int`` (one domain for the batch) or an integer tensor of 0 dims
        (the same) or 1 dim (one id per sample); anything else raises, naming the fix.

        Domain ids are indices, and like torch's index arguments (``index_select``,
        ``nn.Embedding``) they must have an integer type: floats are refused even when
        integral (``1.0``), because a float id is usually the result of arithmetic that need
        not be exact, and casting it would silently truncate (``1.9`` → domain 1).  Bools are
        refused as well: Python's ``True`` is an ``int`` but means a flag, and a bool tensor is
        a mask, not a list of domain ids.  A 2-D tensor is refused instead of flattened: its
        layout (``(N, 1)``, ``(1, N)``, ``(A, B)``) is ambiguous.
        """
        where = self.describe()
        if isinstance(domain, Tensor):
            dtype = domain.dtype
            if dtype == torch.bool:
                raise TypeError(
                    f"{where}: domain ids must be integers, got a torch.bool tensor (a mask, "
                    f"not domain ids). Pass integer ids, e.g. mask.long() for domains 0/1"
                )
            if dtype.is_floating_point or dtype.is_complex:
                raise TypeError(
                    f"{where}: domain ids must be integers, got a {dtype} tensor: casting "
                    f"would truncate (1.9 becomes 1). Pass integer ids, e.g. ids.long() if "
                    f"they are exact, or ids.round().long()"
                )
            if domain.dim() > 1:
                raise ValueError(
                    f"{where}: domain ids must be a 1-D tensor of one id per sample or a single "
                    f"id (an int or a 0-dim tensor), got a tensor of shape "
                    f"{tuple(domain.shape)}. If it holds one id per sample, pass ids.flatten()"
                )
            return domain
        if isinstance(domain, bool | np.bool_):
            raise TypeError(
                f"{where}: domain ids must be integers, got the bool {domain}: a Python bool "
                f"is not a domain index. Pass domain=int(flag) if it is meant as domain 0/1"
            )
        if isinstance(domain, numbers.Integral):
            return int(domain)
        if isinstance(domain, numbers.Real):
            raise TypeError(
                f"{where}: domain ids must be integers, got the float {domain}: it would be "
                f"truncated (1.9 becomes 1). Pass an int, e.g. domain=int(d) if d is exact"
            )
        list_hint = (
            ", or per-sample ids as a tensor: torch.tensor(ids)"
            if isinstance(domain, list | tuple)
            else ""
        )
        raise TypeError(
            f"{where}: domain must be an int or an integer tensor of domain ids, got a "
            f"{type(domain).__name__}. Pass an int{list_hint}"
        )

    def _domain_index(self, x: Tensor, domain: object) -> Tensor:
        """Every sample's domain id (``(N,)`` long on ``x``'s device; ``None``:
        ``active_domain``), checked on the host now (:meth:`population_moments`, outside any
        training step)."""
        checked = self._check_domain(self.active_domain if domain is None else domain)
        index, _ = self._checked_index(x, checked, on_host=True)
        return index

    def _checked_index(
        self, x: Tensor, domain: int | Tensor, *, on_host: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Every sample's domain id (``(N,)`` long on ``x``'s device) for a domain already
        through :meth:`_check_domain`, and whether an id is out of range.

        An ``int`` is checked on the host (no read).  A tensor's values are read now when
        ``on_host`` (raising the clear error); otherwise the ids are clamped into range, so
        that the step cannot index out of bounds (a device-side assert on CUDA), and the
        0-dim bool "an id was out of range" comes back for the deferred check.
        """
        if not isinstance(domain, Tensor):
            if not 0 <= domain < self.num_domains:
                self._raise_out_of_range(domain)
            return torch.full((x.shape[0],), domain, dtype=torch.long, device=x.device), None
        index = domain.to(device=x.device, dtype=torch.long)
        if index.dim() == 0:  # one domain for the whole batch
            index = index.expand(x.shape[0]).contiguous()
        elif index.numel() != x.shape[0]:  # a shape: known on the host
            raise ValueError(
                f"{self.describe()}: got {index.numel()} domain ids for a batch of "
                f"{x.shape[0]} samples; pass one id per sample or a single int"
            )
        outside = (index < 0) | (index >= self.num_domains)
        if on_host:
            if index.numel() and bool(outside.any()):
                self._raise_out_of_range(domain)
            return index, None
        return index.clamp(0, self.num_domains - 1), outside.any()

    def _raise_out_of_range(self, domain: object) -> None:
        raise ValueError(
            f"{self.describe()}: domain ids must lie in [0, {self.num_domains}), got "
            f"{domain}; build the layer with a larger num_domains"
        )

    def _checks_on_host(self, x: Tensor) -> bool:
        """Whether checks that depend on the values of tensor domain ids read them now: on
        CPU outside ``torch.compile`` (a read is free there), and in the strict finite-check
        mode ``"step"``; elsewhere they are deferred (module docstring)."""
        on_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        return on_cpu or self._finite_check_now(x) is True

    def _record_problem(self, problem: Tensor, *, training: bool = True) -> None:
        """Deferred check: record ``problem`` (a 0-dim long of ``_OUT_OF_RANGE``, … bits,
        0 for none) with no host read.  The cause is kept for the first call with a problem,
        the call itself by the finite check's flag (one record per training call, so that
        call numbers count training calls).  An evaluation call records the number of
        training calls before it, without counting itself."""
        first = self._nonfinite_call
        problem = problem.to(first.device)
        cause = problem if training else torch.where(problem != 0, problem | _IN_EVAL, problem)
        self._domain_problem.copy_(torch.where(first < 0, cause, self._domain_problem))
        if training:
            self._record_finite(problem == 0)
        else:
            first.copy_(torch.where((problem == 0) | (first >= 0), first, self._training_calls))

    def _raise_deferred(self, call: int, where: str | None = None) -> None:
        """The deferred error: a domain-specific cause when one was recorded (ids out of range,
        a domain with one value per channel: a ``ValueError``, as the immediate check
        raises), the base's non-finite-statistics error otherwise (``where``: the layer's
        path, if the caller knows it)."""
        problem = int(self._domain_problem)
        causes = []
        if problem & _OUT_OF_RANGE:
            causes.append(
                f"domain ids outside [0, {self.num_domains}) (the step used them clamped into "
                f"range; build the layer with a larger num_domains)"
            )
        if problem & _ONE_VALUE:
            causes.append(
                "a domain present in the batch with a single value per channel, whose batch "
                "variance is undefined (use a larger batch or more samples per domain, or "
                "put the layer in eval mode)"
            )
        if not causes:
            super()._raise_deferred(call, where)  # non-finite statistics only
            return
        who = self.describe()
        if where and " at '" not in who:
            who = f"{who} at '{where}'"
        when = (
            f"an evaluation call after training call {call}"
            if problem & _IN_EVAL
            else f"training call {call}"
        )
        also = " Its batch statistics were also NaN or Inf." if problem & _NOT_FINITE else ""
        raise ValueError(
            f"{who}: {when} of this layer had {' and '.join(causes)}. Found by "
            f"the deferred check of per-sample domain ids (on CUDA and in compiled graphs a "
            f"check of the ids' values would read them back every step); it is read every "
            f"{deferred_interval()} training calls, in eval() and in "
            f"smallbn.check_finite(model), and the running statistics may have moved since.{also} "
            f"Rerun on CPU or with smallbn.set_finite_check('step') to stop at that step."
        )

    def forward(self, x: Tensor, domain: int | Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Normalize ``x`` with the statistics of ``domain``: an int or a 0-dim integer tensor
        (one domain for the batch), or a 1-D integer tensor of one id per sample; default
        ``active_domain``.  Floats (even ``1.0``), bools and 2-D tensors raise (see
        :meth:`_check_domain`)."""
        return super().forward(x, domain)

    def _forward_eval(self, x: Tensor, *args: Any) -> Tensor:
        domain = self._check_domain(self.active_domain if args[0] is None else args[0])
        running_mean, running_var = self.running_stats()
        if not isinstance(domain, Tensor):
            if not 0 <= domain < self.num_domains:
                self._raise_out_of_range(domain)
            # one domain for the whole batch: BN's inference with that domain's statistics
            return normalize_with_population(
                x, running_mean[domain], running_var[domain], self.eps, *self._domain_affine(domain)
            )
        on_host = self._checks_on_host(x)
        index, outside = self._checked_index(x, domain, on_host=on_host)
        if outside is not None:
            self._record_problem(outside.long() * _OUT_OF_RANGE, training=False)
        return normalize(
            x, running_mean[index], running_var[index], self.eps, *self._domain_affine(index)
        )

    def _forward_train(self, x: Tensor, factor: float | None, *args: Any) -> Tensor:
        domain = self._check_domain(self.active_domain if args[0] is None else args[0])
        # One int domain without other processes: its values per channel are known on the
        # host (no read); otherwise they are counted from the ids on the device.
        single = not isinstance(domain, Tensor) and self._sync_group() is None
        if single:
            if not 0 <= domain < self.num_domains:
                self._raise_out_of_range(domain)
            values = x.numel() // x.shape[1]
            if values == 1:
                self._raise_too_small(x, 1, f"domain {[domain]}")
            if values > 1 and torch.compiler.is_compiling():
                return self._compiled_one_domain(x, int(domain), factor)
        on_host = self._checks_on_host(x)
        index, outside = self._checked_index(x, domain, on_host=on_host)

        def statistics(instance: Moments) -> SampleNormalization:
            domains = self._merge_groups(instance, index, self.num_domains, check=False)
            present = domains.count > 0
            if single:  # the sizes were checked on the host
                self._check_finite(domains, x)
            elif on_host:
                too_small = present & (domains.count <= 1)
                if bool(too_small.any()):  # before the values' check: the structural error first
                    which = torch.nonzero(too_small).flatten().tolist()
                    self._raise_too_small(x, 1, f"domain {which}")
                self._check_finite(domains, x)
            else:
                self._record_problem(self._deferred_problem(domains, outside))
            if factor is not None:
                # Only the domains present in the batch move.
                running_mean, running_var = self.running_stats()
                with torch.no_grad():
                    weight = (factor * present.to(running_mean.dtype)).unsqueeze(-1)
                    running_mean.lerp_(domains.mean.to(running_mean), weight)
                    running_var.lerp_(domains.unbiased_var().to(running_var), weight)
            # per-domain γ, β: (N, C) rows, whose gradient _NormalizeWithStatistics returns
            # per sample and autograd's index backward sums into the rows of the domains present
            return (domains.mean[index], domains.var[index], *self._domain_affine(index))

        return normalize_from_sample_moments(x, statistics, self.eps, (self.weight, self.bias))

    def _compiled_one_domain(self, x: Tensor, domain: int, factor: float | None) -> Tensor:
        """A compiled training step on one int domain ``d``: BN of the whole batch through
        torch's fused kernel with ``d``'s affine (its γ, β rows with ``per_domain_affine``),
        moving only ``d``'s running statistics (the same numbers as the per-sample path, whose
        ``index_add`` over a constant index inductor's CPU code generation fails on, torch
        2.13)."""
        y, moments = self._batch_norm(x, params=self._domain_affine(domain))
        if factor is not None:
            running_mean, running_var = self.running_stats()
            update_running_stats(
                running_mean[domain],
                running_var[domain],
                moments.mean,
                moments.unbiased_var(),
                factor,
            )
        return y

    def _deferred_problem(self, domains: Moments, outside: Tensor | None) -> Tensor:
        """The problem bits of a training call checked on the device: ids out of range, a
        present domain with one value per channel, and (unless the finite check is off)
        non-finite statistics, as one 0-dim long."""
        detached = domains.detach()
        one_value = ((detached.count > 0) & (detached.count <= 1)).any()
        problem = one_value.long() * _ONE_VALUE
        if outside is not None:
            problem = problem | outside.long() * _OUT_OF_RANGE
        total = detached.mean.sum() + detached.var.sum()
        if self._finite_check_now(total) is not None:  # False here: on_host covers True
            problem = problem | (~torch.isfinite(total)).long() * _NOT_FINITE
        return problem


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
    """Within the block every :class:`DomainBatchNorm` of ``model`` uses ``domain`` (an int:
    a float, bool or tensor raises, as in the layers' forward)."""
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm)]
    previous = [m.active_domain for m in layers]
    for m in layers:  # every layer is checked before any is switched
        checked = m._check_domain(domain)
        if isinstance(checked, Tensor):
            raise TypeError(
                f"{m.describe()}: use_domain takes one int domain for the whole model, got a "
                f"tensor; pass per-sample ids to each layer's forward instead (layer(x, ids))"
            )
        if not 0 <= checked < m.num_domains:
            raise ValueError(
                f"{m.describe()}: domain {domain} not in [0, {m.num_domains}); pass a domain "
                f"every DomainBatchNorm of the model has"
            )
    for m in layers:
        m.active_domain = int(domain)
    try:
        yield model
    finally:
        for m, d in zip(layers, previous, strict=True):
            m.active_domain = d
