"""Independent float64 reference implementations, written straight from /work/shared/SPEC.md.

Nothing here imports smallbn: the tests compare the library against these numbers.  The
code favours the obvious over the fast: statistics are computed from a flattened
``(C, values)`` view, groups and domains are visited with explicit Python loops, and
gradients come from autograd through these formulas.  Every input is promoted to float64
first (``x.double()`` keeps the autograd connection to ``x``).

Conventions (torch.nn.BatchNorm semantics, SPEC "BN"):

* normalize with the biased batch variance, eps inside the square root;
* running_var tracks the Bessel-corrected (unbiased) variance;
* momentum is the weight of the new value; momentum=None is the cumulative average
  (factor 1/step at the step-th training step, counted from 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "RefBatchNorm",
    "RefBatchRenorm",
    "RefDomainBatchNorm",
    "RefGhostBatchNorm",
    "affine_normalize",
    "channel_stats",
    "limit_schedule",
]


def channel_stats(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, biased var)`` per channel over ``(N, *spatial)``, in float64."""
    x = x.double()
    channels = x.shape[1]
    flat = x.transpose(0, 1).reshape(channels, -1)
    count = flat.shape[1]
    mean = flat.sum(dim=1) / count
    var = (flat - mean[:, None]).square().sum(dim=1) / count
    return count, mean, var


def _view(stat: Tensor, x: Tensor) -> Tensor:
    return stat.reshape(1, -1, *([1] * (x.dim() - 2)))


def affine_normalize(
    x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """``y = (x − μ) / sqrt(σ² + eps) · γ + β`` with per-channel ``(C,)`` statistics."""
    x = x.double()
    y = (x - _view(mean, x)) / torch.sqrt(_view(var, x) + eps)
    if weight is not None:
        y = y * _view(weight.double(), x)
    if bias is not None:
        y = y + _view(bias.double(), x)
    return y


class RefBatchNorm:
    """Plain BN in training and evaluation, with BN's running statistics.

    ``weight``/``bias`` are float64 leaf tensors with ``requires_grad`` (or ``None`` for
    ``affine=False``); their ``.grad`` is what the tests compare.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        if affine:
            w = torch.ones(num_features) if weight is None else weight.detach()
            b = torch.zeros(num_features) if bias is None else bias.detach()
            self.weight = w.double().clone().requires_grad_(True)
            self.bias = b.double().clone().requires_grad_(True)
        self.running_mean = torch.zeros(num_features, dtype=torch.float64)
        self.running_var = torch.ones(num_features, dtype=torch.float64)
        self.steps = 0  # completed training steps = num_batches_tracked

    def _next_factor(self) -> float:
        self.steps += 1
        return 1.0 / self.steps if self.momentum is None else self.momentum

    @staticmethod
    def _ema(old: Tensor, new: Tensor, factor: float) -> Tensor:
        return (1.0 - factor) * old + factor * new.detach()

    def _update(self, mean: Tensor, unbiased_var: Tensor, factor: float) -> None:
        self.running_mean = self._ema(self.running_mean, mean, factor)
        self.running_var = self._ema(self.running_var, unbiased_var, factor)

    def train_step(self, x: Tensor) -> Tensor:
        count, mean, var = channel_stats(x)
        self._update(mean, var * count / (count - 1), self._next_factor())
        return affine_normalize(x, mean, var, self.eps, self.weight, self.bias)

    def eval(self, x: Tensor) -> Tensor:
        return affine_normalize(
            x, self.running_mean, self.running_var, self.eps, self.weight, self.bias
        )


def limit_schedule(
    step: int, r_max: float, d_max: float, warmup_steps: int, r_end: int, d_end: int
) -> tuple[float, float]:
    """BRN's clipping bounds at 0-based training step ``step`` (SPEC "BRN", schedule).

    ``r_max = 1``, ``d_max = 0`` up to step ``warmup_steps``, then linear to the final
    values, reached at steps ``r_end`` / ``d_end``.  Assumes ``r_end, d_end > warmup_steps``.
    """

    def fraction(end: int) -> float:
        return min(max((step - warmup_steps) / (end - warmup_steps), 0.0), 1.0)

    return 1.0 + (r_max - 1.0) * fraction(r_end), d_max * fraction(d_end)


class RefBatchRenorm(RefBatchNorm):
    """Batch Renormalization (Ioffe 2017).  ``last_r``, ``last_d``, ``last_limits`` record the
    correction of the latest training step so tests can check that clipping was active."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_end: int = 40000,
        d_max_ramp_end: int = 25000,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, weight, bias)
        self.schedule = (r_max, d_max, warmup_steps, r_max_ramp_end, d_max_ramp_end)
        self.last_r = self.last_d = torch.ones(num_features, dtype=torch.float64)
        self.last_limits = (1.0, 0.0)

    def train_step(self, x: Tensor) -> Tensor:
        count, mean, var = channel_stats(x)
        r_max, d_max = limit_schedule(self.steps, *self.schedule)
        with torch.no_grad():  # r and d are constants for backprop
            sigma_batch = torch.sqrt(var + self.eps)
            sigma = torch.sqrt(self.running_var + self.eps)  # running stats BEFORE the update
            r = torch.clamp(sigma_batch / sigma, 1.0 / r_max, r_max)
            d = torch.clamp((mean - self.running_mean) / sigma, -d_max, d_max)
        self.last_r, self.last_d, self.last_limits = r, d, (r_max, d_max)
        self._update(mean, var * count / (count - 1), self._next_factor())
        x_hat = (x.double() - _view(mean, x)) / _view(torch.sqrt(var + self.eps), x)
        x_hat = x_hat * _view(r, x) + _view(d, x)
        if self.weight is not None:
            x_hat = x_hat * _view(self.weight, x) + _view(self.bias, x)
        return x_hat


class RefGhostBatchNorm(RefBatchNorm):
    """Ghost BN: consecutive groups of ``group_size`` samples (the last may be smaller), each
    normalized with its own statistics; running statistics take the count-weighted average of
    the group means and of the group unbiased variances."""

    def __init__(self, num_features: int, group_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def train_step(self, x: Tensor) -> Tensor:
        outputs, counts, means, unbiased = [], [], [], []
        for start in range(0, x.shape[0], self.group_size):
            part = x[start : start + self.group_size]
            count, mean, var = channel_stats(part)
            outputs.append(affine_normalize(part, mean, var, self.eps, self.weight, self.bias))
            counts.append(count)
            means.append(mean)
            unbiased.append(var * count / (count - 1))
        total = sum(counts)
        mean_avg = sum(c * m for c, m in zip(counts, means, strict=True)) / total
        var_avg = sum(c * v for c, v in zip(counts, unbiased, strict=True)) / total
        self._update(mean_avg, var_avg, self._next_factor())
        return torch.cat(outputs, dim=0)


class RefDomainBatchNorm:
    """Domain-specific BN: one :class:`RefBatchNorm`'s statistics per domain, shared affine.

    ``domains`` is an int (whole batch) or a list of per-sample domain ids.  A domain absent
    from the batch keeps its running statistics.
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        self.eps, self.momentum = eps, momentum
        w = torch.ones(num_features) if weight is None else weight.detach()
        b = torch.zeros(num_features) if bias is None else bias.detach()
        self.weight = w.double().clone().requires_grad_(True)
        self.bias = b.double().clone().requires_grad_(True)
        zeros = torch.zeros(num_features, dtype=torch.float64)
        ones = torch.ones_like(zeros)
        self.running_mean = [zeros.clone() for _ in range(num_domains)]
        self.running_var = [ones.clone() for _ in range(num_domains)]

    @staticmethod
    def _ids(x: Tensor, domains: int | list[int]) -> list[int]:
        return [domains] * x.shape[0] if isinstance(domains, int) else [int(d) for d in domains]

    def train_step(self, x: Tensor, domains: int | list[int]) -> Tensor:
        ids = self._ids(x, domains)
        outputs: list[Tensor | None] = [None] * x.shape[0]
        m = self.momentum
        for domain in sorted(set(ids)):
            members = [n for n, d in enumerate(ids) if d == domain]
            part = x[members]
            count, mean, var = channel_stats(part)
            y = affine_normalize(part, mean, var, self.eps, self.weight, self.bias)
            for j, n in enumerate(members):
                outputs[n] = y[j]
            self.running_mean[domain] = (1 - m) * self.running_mean[domain] + m * mean.detach()
            unbiased = (var * count / (count - 1)).detach()
            self.running_var[domain] = (1 - m) * self.running_var[domain] + m * unbiased
        return torch.stack(outputs)  # type: ignore[arg-type]

    def eval(self, x: Tensor, domains: int | list[int]) -> Tensor:
        ids = self._ids(x, domains)
        rows = []
        for n, domain in enumerate(ids):
            rows.append(
                affine_normalize(
                    x[n : n + 1],
                    self.running_mean[domain],
                    self.running_var[domain],
                    self.eps,
                    self.weight,
                    self.bias,
                )[0]
            )
        return torch.stack(rows)


def switchable_norm(
    x: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    eps: float,
    momentum: float,
    training: bool,
    branches: tuple[str, ...] = ("in", "ln", "bn"),
) -> tuple[Tensor, Tensor, Tensor]:
    """Switchable Normalization (SPEC "SN"), straight from the formulas; returns the output
    and the updated running mean/var.  Every branch is assumed computable."""
    x64 = x.double()
    n, c = x64.shape[:2]
    flat = x64.reshape(n, c, -1)
    mu_in = flat.mean(-1)
    var_in = flat.var(-1, correction=0)
    second_in = var_in + mu_in.square()
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = second_in.mean(1, keepdim=True) - mu_ln.square()
    if training:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = second_in.mean(0, keepdim=True) - mu_bn.square()
        m = flat.shape[-1] * n
        new_mean = (1 - momentum) * running_mean + momentum * mu_bn[0].detach()
        new_var = (1 - momentum) * running_var + momentum * var_bn[0].detach() * m / (m - 1)
    else:
        mu_bn, var_bn = running_mean[None], running_var[None]
        new_mean, new_var = running_mean, running_var
    means = {"in": mu_in, "ln": mu_ln, "bn": mu_bn}
    variances = {"in": var_in, "ln": var_ln, "bn": var_bn}
    w_mean = torch.softmax(mean_logits.double(), 0)
    w_var = torch.softmax(var_logits.double(), 0)
    mu = sum(w_mean[i] * means[b] for i, b in enumerate(branches))
    var = sum(w_var[i] * variances[b] for i, b in enumerate(branches))
    shape = (n, c) + (1,) * (x64.dim() - 2)
    x_hat = (x64 - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    view = (1, c) + (1,) * (x64.dim() - 2)
    return x_hat * weight.double().reshape(view) + bias.double().reshape(view), new_mean, new_var
