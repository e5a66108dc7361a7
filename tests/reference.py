"""Independent float64 reference implementations, written straight from docs/methods.md.

Nothing here imports smallbn: the tests compare the library against these numbers.  The
code favours the obvious over the fast: statistics are computed from a flattened
``(C, values)`` view, groups and domains are visited with explicit Python loops, and
gradients come from autograd through these formulas.  Every input is promoted to float64
first (``x.double()`` keeps the autograd connection to ``x``).

Conventions (torch.nn.BatchNorm semantics, docs/methods.md "BN"):

* normalize with the biased batch variance, eps inside the square root;
* running_var tracks the Bessel-corrected (unbiased) variance;
* momentum is the weight of the new value; momentum=None is the cumulative average
  (factor 1/step at the step-th training step, counted from 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Normalized",
    "RefBatchNorm",
    "RefBatchRenorm",
    "RefDomainBatchNorm",
    "RefGhostBatchNorm",
    "affine_normalize",
    "channel_stats",
    "limit_schedule",
    "ref_batch_norm",
    "ref_batch_renorm",
    "ref_domain_batch_norm",
    "ref_domain_population_norm",
    "ref_ghost_batch_norm",
    "ref_group_norm",
    "ref_moving_average_first_step",
    "ref_population_norm",
    "ref_switchable_norm",
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
    """BRN's clipping bounds at 0-based training step ``step`` (docs/methods.md "BRN", schedule).

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
    """Domain-specific BN: one :class:`RefBatchNorm`'s statistics per domain, and a shared
    affine (``weight``/``bias`` of shape ``(C,)``) or one per domain (``(D, C)``: sample n
    gets ``γ_{d(n)}``, ``β_{d(n)}``).

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

    def _affine(self, domain: int) -> tuple[Tensor, Tensor]:
        """``(γ, β)`` of ``domain``: its rows of a per-domain affine, else the shared one."""
        if self.weight.dim() == 2:
            return self.weight[domain], self.bias[domain]
        return self.weight, self.bias

    def train_step(self, x: Tensor, domains: int | list[int]) -> Tensor:
        ids = self._ids(x, domains)
        outputs: list[Tensor | None] = [None] * x.shape[0]
        m = self.momentum
        for domain in sorted(set(ids)):
            members = [n for n, d in enumerate(ids) if d == domain]
            part = x[members]
            count, mean, var = channel_stats(part)
            y = affine_normalize(part, mean, var, self.eps, *self._affine(domain))
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
                    *self._affine(domain),
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
    """Switchable Normalization (methods.md "SN"), straight from the formulas; returns the output
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
    mu, var = mu.expand(n, c), var.expand(n, c)  # a single LN branch is (N, 1)
    x_hat = (x64 - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    view = (1, c) + (1,) * (x64.dim() - 2)
    return x_hat * weight.double().reshape(view) + bias.double().reshape(view), new_mean, new_var


class RefMovingAverageBatchNorm:
    """Moving Average Batch Normalization (docs/methods.md "MABN"), float64, one SMA step at a time.

    ``train_step(x, grad_y)`` runs the forward of every group of ``norm_batch_size`` consecutive
    samples (the last may be smaller; ``None``: one group) as consecutive steps, then the
    backward of the groups in the same order, and returns ``(y, ∂L/∂x, ∂L/∂γ, ∂L/∂β)`` for the
    loss ``Σ y·grad_y``.  The backward is MABN's moving-average formula written out, not
    autograd's.  Conventions (where docs/methods.md is silent, as smallbn documents them):

    * a step ``t`` counts groups from 0; steps ``t < warmup`` use ``χ²_t`` / ``Ψ_t`` alone,
      later ones the mean of the last ``window`` values (fewer while the window fills);
    * ``r = 1`` for ``t < clamp_start``, then ``clamp(sqrt(v+eps)/sqrt(running_var+eps),
      r_min, r_max)`` with ``running_var`` before this step's update;
    * ``running_var ← (1 − f)·running_var + f·v`` with ``f = momentum`` (weight of the new
      value, BN's convention) or ``1/(t+1)`` for ``momentum=None``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        window: int,
        warmup: int,
        clamp_start: int,
        r_min: float = 0.2,
        r_max: float = 5.0,
        momentum: float | None = 0.02,
        eps: float = 1e-5,
        norm_batch_size: int | None = None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        self.window, self.warmup, self.clamp_start = window, warmup, clamp_start
        self.r_min, self.r_max, self.momentum, self.eps = r_min, r_max, momentum, eps
        self.norm_batch_size = norm_batch_size
        w = torch.ones(num_features) if weight is None else weight.detach()
        b = torch.zeros(num_features) if bias is None else bias.detach()
        self.weight, self.bias = w.double().clone(), b.double().clone()
        self.running_var = torch.ones(num_features, dtype=torch.float64)
        self.chi2_history: list[Tensor] = []
        self.psi_history: list[Tensor] = []
        self.steps = 0
        self.last_r: list[Tensor] = []  # r of each group of the latest call
        self.last_used_sma: list[bool] = []

    @staticmethod
    def _per_channel_sum(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(t.shape[1], -1).sum(dim=1)

    @staticmethod
    def _per_channel_mean(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(t.shape[1], -1).mean(dim=1)

    def train_step(self, x: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, grad_y = x.detach().double(), grad_y.detach().double()
        n = x.shape[0]
        size = n if self.norm_batch_size is None else self.norm_batch_size
        outputs, steps = [], []
        self.last_r, self.last_used_sma = [], []
        for start in range(0, n, size):
            part = x[start : start + size]
            t = self.steps
            chi2 = self._per_channel_mean(part.square())
            self.chi2_history.append(chi2)
            use_sma = t >= self.warmup
            var = torch.stack(self.chi2_history[-self.window :]).mean(0) if use_sma else chi2
            sigma = torch.sqrt(var + self.eps)
            if t >= self.clamp_start:
                ratio = sigma / torch.sqrt(self.running_var + self.eps)
                r = torch.clamp(ratio, self.r_min, self.r_max)
            else:
                r = torch.ones_like(sigma)
            factor = 1.0 / (t + 1) if self.momentum is None else self.momentum
            self.running_var = (1 - factor) * self.running_var + factor * var
            z = part / _view(sigma, part)
            outputs.append(_view(self.weight * r, part) * z + _view(self.bias, part))
            steps.append((t, start, z, sigma, r, use_sma))
            self.last_r.append(r)
            self.last_used_sma.append(use_sma)
            self.steps += 1
        grad_x, grad_w, grad_b = [], torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        for _, start, z, sigma, r, use_sma in steps:
            g = grad_y[start : start + size]
            g_hat = g * _view(self.weight * r, g)
            psi = self._per_channel_mean(g_hat * z)
            self.psi_history.append(psi)
            psi_bar = torch.stack(self.psi_history[-self.window :]).mean(0) if use_sma else psi
            grad_x.append((g_hat - z * _view(psi_bar, z)) / _view(sigma, z))
            grad_w += self._per_channel_sum(g * _view(r, g) * z)
            grad_b += self._per_channel_sum(g)
        return torch.cat(outputs), torch.cat(grad_x), grad_w, grad_b

    def eval(self, x: Tensor) -> Tensor:
        x = x.double()
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return _view(scale, x) * x + _view(self.bias, x)


class RefCrossIterationBatchNorm(RefBatchNorm):
    """Cross-Iteration BN (methods.md "CBN"), straight from the formulas: at each training step the
    derivatives of the batch mean μ = E[x] and second moment ν = E[x²] with respect to the
    producer's parameters come from autograd (``torch.func.jacrev``), and the window is a
    plain list of past iterations, compensated one by one:

        μ_{t−τ}(θ_t) = μ_{t−τ} + ⟨∂μ_{t−τ}/∂θ, θ_t − θ_{t−τ}⟩,   same for ν,
        μ̄ = mean_τ μ_{t−τ}(θ_t),   ν̄ = mean_τ max(ν_{t−τ}(θ_t), μ_{t−τ}(θ_t)²),   σ̄² = ν̄ − μ̄²,
        y = γ (x − μ̄)/sqrt(σ̄² + eps) + β      (eps_outside: /(sqrt(σ̄²) + eps)).

    ``aggregation="drop"`` instead averages the entries whose ``ν − μ²`` is not negative
    (the current batch alone where none is left); ``last_negative`` counts the (entry,
    channel) pairs of the latest step with ``ν − μ² < 0`` (where the rules differ),
    ``last_dropped`` those the drop rule left out.  Burn-in: k = 1 for the first ``burnin``
    steps (``ramp=True``: k = 1 + ⌊(window − 1)·t/burnin⌋ at 0-based step t < burnin).
    """

    def __init__(
        self,
        num_features: int,
        window: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        burnin: int = 0,
        ramp: bool = False,
        compensate: bool = True,
        aggregation: str = "max",
        eps_outside: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, weight, bias)
        self.window, self.burnin, self.ramp = window, burnin, ramp
        self.compensate, self.aggregation, self.eps_outside = compensate, aggregation, eps_outside
        self.history: list[tuple[Tensor, Tensor, tuple, tuple, list[Tensor]]] = []
        self.iteration = 0
        self.last_negative = self.last_dropped = 0

    def window_at(self, step: int) -> int:
        if step >= self.burnin:
            return self.window
        return 1 + (self.window - 1) * step // self.burnin if self.ramp else 1

    @staticmethod
    def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
        return flat.mean(dim=1), flat.square().mean(dim=1)

    def train_step(self, u: Tensor, params: list[Tensor], producer) -> Tensor:
        """One training step on ``x = producer(u, params)`` (the layer before the norm, as a
        function of its parameters); gradients reach ``u``, ``params``, γ and β."""
        x = producer(u, params)
        mean_t, second_t = self._moments(x)
        # snapshots (clone): optimizers update parameters in place
        frozen = [p.detach().double().clone() for p in params]
        argnums = tuple(range(len(frozen)))

        def stats(*ps: Tensor) -> tuple[Tensor, Tensor]:
            return self._moments(producer(u.detach().double(), list(ps)))

        jac_mean, jac_second = torch.func.jacrev(stats, argnums=argnums)(*frozen)
        entries = [(mean_t, second_t)]
        used = self.window_at(self.iteration) - 1
        for mean, second, j_mean, j_second, then in reversed(self.history[-used:] if used else []):
            if self.compensate:
                for jm, js, now, old in zip(j_mean, j_second, frozen, then, strict=True):
                    delta = (now - old).unsqueeze(0)
                    mean = mean + (jm * delta).flatten(1).sum(1)
                    second = second + (js * delta).flatten(1).sum(1)
            entries.append((mean, second))
        means = torch.stack([m for m, _ in entries])
        seconds = torch.stack([s for _, s in entries])
        self.last_negative = int(((seconds - means.square()).detach() < 0).sum())
        if self.aggregation == "max":
            mu = means.mean(0)
            nu = torch.maximum(seconds, means.square()).mean(0)
            self.last_dropped = 0
        else:
            keep = (seconds - means.square()).detach() >= 0
            none_left = ~keep.any(0)
            keep[0] = keep[0] | none_left  # no entry left: the current batch alone
            self.last_dropped = int((~keep).sum())
            w = keep.double()
            mu = (w * means).sum(0) / w.sum(0)
            nu = (w * seconds).sum(0) / w.sum(0)
        var = nu - mu.square()
        xd = x.double()
        if self.eps_outside:
            y = (xd - _view(mu, xd)) / (torch.sqrt(_view(var, xd)) + self.eps)
        else:
            y = (xd - _view(mu, xd)) / torch.sqrt(_view(var, xd) + self.eps)
        if self.weight is not None:
            y = y * _view(self.weight, xd) + _view(self.bias, xd)
        count = xd.numel() // xd.shape[1]
        batch_var = (second_t - mean_t.square()).detach()
        self._update(mean_t, batch_var * count / (count - 1), self._next_factor())
        self.history.append((mean_t.detach(), second_t.detach(), jac_mean, jac_second, frozen))
        self.history = self.history[-self.window :]
        self.iteration += 1
        return y


# -- one-call references with their slope (tests/test_robustness.py) ---------------------------
#
# Each returns a :class:`Normalized`: the float64 output (differentiable in x and in the
# float64 copies of the parameters passed in) and ``slope``, ``∂y/∂x`` with the statistics
# held constant (``γ·r/sqrt(σ² + eps)``, broadcastable to x).  The slope sets the scale of
# rounding errors a test may allow: an error δ in a statistic moves the output by
# ``slope·δ``, and the input gradient is of order ``slope·|∂L/∂y|``.


class Normalized(NamedTuple):
    y: Tensor
    slope: Tensor
    #: Switchable Norm: per element, ``Σ_k |∂y/∂(logit_k)|``-sized bound for the mixture logits'
    #: gradient scale (``None`` elsewhere).
    logit_scale: Tensor | None = None


def _affine(
    x_hat: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Normalized:
    """``γ x̂ + β`` and its slope ``γ·inv_std`` (all broadcastable to x̂)."""
    gamma = 1.0 if weight is None else weight
    y = x_hat * gamma if weight is not None else x_hat
    if bias is not None:
        y = y + bias
    return Normalized(y, (inv_std * gamma).detach().expand_as(x_hat))


def _channel(stat: Tensor | None, x: Tensor) -> Tensor | None:
    return None if stat is None else _view(stat.double(), x)


def ref_population_norm(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Normalized:
    """BN with fixed per-channel statistics: BN's inference, FrozenBN, MABN's inference (with
    ``mean`` its running mean): ``y = γ (x − μ)/sqrt(σ² + eps) + β``."""
    x = x.double()
    inv_std = 1.0 / torch.sqrt(_channel(var, x) + eps)
    return _affine(
        (x - _channel(mean, x)) * inv_std, inv_std, _channel(weight, x), _channel(bias, x)
    )


def ref_batch_norm(
    x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> Normalized:
    """BN in training (and SyncBN in one process, CBN's first step): batch statistics over
    ``(N, *spatial)``, biased variance."""
    _, mean, var = channel_stats(x)
    return ref_population_norm(x, mean, var, eps, weight, bias)


def ref_batch_renorm(
    x: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: float,
    d_max: float,
) -> Normalized:
    """One BRN training step with the running statistics before it and the limits in force:
    ``x̂ = (x − μ_B)/σ_B · r + d``, r and d without gradient (docs/methods.md "BRN")."""
    x = x.double()
    _, mean, var = channel_stats(x)
    with torch.no_grad():
        sigma_batch = torch.sqrt(var + eps)
        sigma = torch.sqrt(running_var.double() + eps)
        r = torch.clamp(sigma_batch / sigma, 1.0 / r_max, r_max)
        d = torch.clamp((mean - running_mean.double()) / sigma, -d_max, d_max)
    inv_std = _view(r / torch.sqrt(var.detach() + eps), x)
    x_hat = (x - _view(mean, x)) / _view(torch.sqrt(var + eps), x) * _view(r, x) + _view(d, x)
    return _affine(x_hat, inv_std, _channel(weight, x), _channel(bias, x))


def _per_sample_groups(
    x: Tensor, groups: list[list[int]], eps: float, weight: Tensor | None, bias: Tensor | None
) -> Normalized:
    """Each list of sample indices normalized with its own channel statistics."""
    x = x.double()
    y: list[Tensor | None] = [None] * x.shape[0]
    slope: list[Tensor | None] = [None] * x.shape[0]
    for members in groups:
        part = ref_batch_norm(x[members], eps, weight, bias)
        for j, n in enumerate(members):
            y[n], slope[n] = part.y[j], part.slope[j]
    return Normalized(torch.stack(y), torch.stack(slope))  # type: ignore[arg-type]


def ref_ghost_batch_norm(
    x: Tensor, group_size: int, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Normalized:
    """Ghost BN: consecutive groups of ``group_size`` samples (the last may be smaller)."""
    n = x.shape[0]
    groups = [list(range(s, min(s + group_size, n))) for s in range(0, n, group_size)]
    return _per_sample_groups(x, groups, eps, weight, bias)


def ref_domain_batch_norm(
    x: Tensor, domains: list[int], eps: float, weight: Tensor | None, bias: Tensor | None
) -> Normalized:
    """Domain-specific BN in training: the samples of each domain normalized together."""
    groups = [[n for n, d in enumerate(domains) if d == dom] for dom in sorted(set(domains))]
    return _per_sample_groups(x, groups, eps, weight, bias)


def ref_domain_population_norm(
    x: Tensor,
    domains: list[int],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Normalized:
    """Domain-specific BN in evaluation: sample n with its domain's running statistics."""
    rows = [
        ref_population_norm(x[n : n + 1], running_mean[d], running_var[d], eps, weight, bias)
        for n, d in enumerate(domains)
    ]
    return Normalized(torch.cat([r.y for r in rows]), torch.cat([r.slope for r in rows]))


def ref_group_norm(
    x: Tensor, num_groups: int, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Normalized:
    """Group Normalization (Wu & He 2018): each sample's G groups of C/G consecutive channels
    normalized over (C/G, *spatial), biased variance, per-channel affine.  G = 1 is LayerNorm
    over (C, *spatial), G = C InstanceNorm."""
    x = x.double()
    n, c = x.shape[:2]
    flat = x.reshape(n, num_groups, -1)
    mean = flat.mean(-1, keepdim=True)
    var = (flat - mean).square().mean(-1, keepdim=True)
    inv_std = 1.0 / torch.sqrt(var + eps)
    x_hat = ((flat - mean) * inv_std).reshape(x.shape)
    inv_std = inv_std.expand_as(flat).reshape(x.shape)
    return _affine(x_hat, inv_std, _channel(weight, x), _channel(bias, x))


def ref_switchable_norm(
    x: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool,
    branches: tuple[str, ...] = ("in", "ln", "bn"),
) -> Normalized:
    """Switchable Normalization (methods.md "SN") with the branches that cannot be computed left out
    of the mixture and the other weights renormalized, as smallbn documents it (docs/methods.md only
    asks for no NaN there): IN needs more than one value per sample and channel, LN more than
    one per sample, BN (training) more than one per channel.  Raises ``ValueError`` where no
    branch is left."""
    x = x.double()
    n, c = x.shape[:2]
    per_sample = x[0, 0].numel() if n else 0
    flat = x.reshape(n, c, -1)
    mu_in = flat.mean(-1)
    var_in = (flat - mu_in.unsqueeze(-1)).square().mean(-1)
    # the spec's mean(σ²_in + μ_in²) − μ², in the centred form mean(σ²_in + (μ_in − μ)²): the same
    # number without the cancellation at |μ| ≫ σ
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (var_in + (mu_in - mu_ln).square()).mean(1, keepdim=True)
    if training:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = (var_in + (mu_in - mu_bn).square()).mean(0, keepdim=True)
    else:
        assert running_mean is not None and running_var is not None
        mu_bn, var_bn = running_mean.double()[None], running_var.double()[None]
    stats = {"in": (mu_in, var_in), "ln": (mu_ln, var_ln), "bn": (mu_bn, var_bn)}
    usable = {
        "in": per_sample > 1,
        "ln": per_sample * c > 1,
        "bn": (n * per_sample > 1) if training else True,
    }
    keep = [i for i, b in enumerate(branches) if usable[b]]
    if not keep:
        raise ValueError("no branch of the mixture can be computed")
    w_mean = torch.softmax(mean_logits.double()[keep], 0)
    w_var = torch.softmax(var_logits.double()[keep], 0)
    names = [branches[i] for i in keep]
    mu = sum(w_mean[j] * stats[b][0] for j, b in enumerate(names)).expand(n, c)
    var = sum(w_var[j] * stats[b][1] for j, b in enumerate(names)).expand(n, c)
    shape = (n, c) + (1,) * (x.dim() - 2)
    inv_std = 1.0 / torch.sqrt(var.reshape(shape) + eps)
    result = _affine((x - mu.reshape(shape)) * inv_std, inv_std, _channel(weight, x),
                     _channel(bias, x))  # fmt: skip
    with torch.no_grad():  # |∂y/∂μ_k − ∂y/∂μ| and |∂y/∂σ²_k − ∂y/∂σ²| sized bounds
        spread_mu = torch.stack([(stats[b][0] - mu).abs().expand(n, c) for b in names]).amax(0)
        spread_var = torch.stack([(stats[b][1] - var).abs().expand(n, c) for b in names]).amax(0)
        gamma = 1.0 if weight is None else _channel(weight, x).abs()
        x_hat = ((x - mu.reshape(shape)) * inv_std).abs()
        logit_scale = result.slope.abs() * spread_mu.reshape(shape) + 0.5 * gamma * x_hat * (
            spread_var.reshape(shape) * inv_std.square()
        )
    return result._replace(logit_scale=logit_scale)


def ref_moving_average_first_step(
    x: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Normalized:
    """MABN's first training step (docs/methods.md "MABN"; warm-up: χ²_t and Ψ_t alone, r = 1):
    ``y = γ x/sqrt(E_R[x²] + eps) + β``.  With v = χ²_t and Ψ̄ = Ψ_t, MABN's backward
    ``(ĝ − z·Ψ_t)/sqrt(v + eps)`` is exactly autograd's gradient of this formula."""
    x = x.double()
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    chi2 = flat.square().mean(dim=1)
    inv_std = 1.0 / torch.sqrt(_view(chi2, x) + eps)
    return _affine(x * inv_std, inv_std, _channel(weight, x), _channel(bias, x))
