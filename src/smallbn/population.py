"""Population statistics and the train/test remedies of Wu & Johnson, "Rethinking 'Batch' in
BatchNorm" (2021): PreciseBN, evaluation with batch statistics, and FrozenBN for the last
epochs.

PreciseBN replaces the exponential moving average (EMA) of batch statistics, which at small
batch and high learning rate lags behind the weights and is dominated by the last few noisy
batches, by the statistics of the population the model sees with its final weights:

    μ = Σ_b n_b μ_b / Σ_b n_b,    σ² = E[x²] − μ² = Σ_b n_b (σ²_b + (μ_b − μ)²) / Σ_b n_b,

over ~10³–10⁴ samples, where n_b is batch b's per-channel element count and σ²_b its biased
(not Bessel-corrected) variance.  Every batch-statistics layer of smallbn and torch's own BN
take part; domain-specific BN gets one set per domain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn import _distributed
from smallbn._optional import tqdm
from smallbn.convert import freeze_norms, uses_batch_stats
from smallbn.layers import BatchStatsNorm, NormBase
from smallbn.stats import Moments, all_gather_moments, channel_moments, merge_moments

__all__ = [
    "FreezeNormsAt",
    "batch_input",
    "batch_stats_layers",
    "batch_stats_eval",
    "precise_bn",
]

ForwardFn = Callable[[nn.Module, Any], Any]


def batch_stats_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that normalize with batch statistics and keep running statistics."""
    return [(name, m) for name, m in model.named_modules() if uses_batch_stats(m)]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch_input(batch))


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)} ({batch.dtype})"
    if isinstance(batch, (list, tuple)):
        items = ", ".join(_describe_batch(item) for item in list(batch)[:3])
        more = ", ..." if len(batch) > 3 else ""
        return f"{type(batch).__name__} of {len(batch)} [{items}{more}]"
    if isinstance(batch, dict):
        return f"dict with keys {sorted(map(str, batch))[:6]}"
    return type(batch).__name__


def batch_input(batch: Any, tool: str = "precise_bn") -> Tensor:
    """The model input of a batch that the population tools accept without ``forward=``:
    a floating-point tensor, or an ``(input, target)`` pair (a DataLoader's ``[x, y]``)
    whose input is a floating-point tensor with as many samples as the target.

    Anything else (dicts, lists of images as torchvision's detection models take, a
    ``(label, image)`` pair) is an error that shows how to pass ``forward=``: which entry
    is the input is the user's to say, never a guess.
    """
    if isinstance(batch, Tensor) and batch.is_floating_point():
        return batch
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        x, target = batch
        if (
            isinstance(x, Tensor)
            and x.is_floating_point()
            and x.dim() > 0
            and (
                not isinstance(target, Tensor)
                or (target.dim() > 0 and target.shape[0] == x.shape[0])
            )
        ):
            return x
    raise TypeError(
        f"{tool}: cannot tell the model input in a batch of {_describe_batch(batch)}: "
        f"without forward= a batch must be a floating-point tensor or an (input, target) "
        f"pair whose input is a floating-point tensor with one row per target. Pass "
        f"forward=lambda model, batch: model(batch['image']) (whatever your model takes) "
        f"and batch_size=lambda batch: len(batch['image'])."
    )


def _population_moments(layer: nn.Module, x: Tensor, args: tuple[Any, ...]) -> Moments:
    if isinstance(layer, BatchStatsNorm):
        return layer.population_moments(x, *args)
    return channel_moments(x.detach())


def _accepts_repeated_calls(layer: nn.Module) -> bool:
    """Whether several calls of ``layer`` in one forward still define its population.

    Domain-specific BN keeps one population per domain and each call contributes per-domain
    counts, so a layer called once per domain (one FPN level per domain, Wu & Johnson 2021)
    accumulates exactly what separate layers would.  Any other layer has one population, and
    several inputs in one forward would be mixed into it."""
    return bool(getattr(layer, "repeated_calls_define_population", False))


def _no_data(layer: nn.Module) -> Moments:
    """Zero moments shaped like ``layer``'s running statistics (``(D, C)`` for domain BN),
    in the accumulation dtype: what a process whose data never reached ``layer`` contributes
    to the cross-process merge, so that every process gathers every layer."""
    running_mean = layer.running_mean
    assert isinstance(running_mean, Tensor)  # batch_stats_layers keeps layers that have it
    zeros = torch.zeros(running_mean.shape, dtype=torch.float64, device=running_mean.device)
    return Moments(zeros.sum(-1), zeros, zeros.clone())


def _check_finite(populations: dict[str, tuple[nn.Module, Moments]]) -> None:
    """Raise if any population has a NaN/Inf mean or variance where it counted samples;
    torch's own BN computes batch statistics of non-finite inputs without complaint, and
    writing them would leave a layer that outputs NaN for every input."""
    bad_layers: list[str] = []
    for name, (layer, population) in populations.items():
        finite = torch.isfinite(population.mean) & torch.isfinite(population.var)
        bad = ~finite & (population.count > 0).unsqueeze(-1)
        if not bool(bad.any()):
            continue
        channels = torch.nonzero(bad.reshape(-1, bad.shape[-1]).any(0)).flatten().tolist()
        shown = channels[:8] + (["..."] if len(channels) > 8 else [])
        where = f"channel(s) {shown}"
        if bad.dim() > 1:  # one row per domain
            where += f" of domain(s) {torch.nonzero(bad.any(-1)).flatten().tolist()}"
        bad_layers.append(f"layer '{name}' ({type(layer).__name__}) in {where}")
    if bad_layers:
        others = bad_layers[1:4] + (["..."] if len(bad_layers) > 4 else [])
        also = (
            f" (also {len(bad_layers) - 1} later layer(s): {'; '.join(others)})" if others else ""
        )
        raise FloatingPointError(
            f"precise_bn: the population statistics of {bad_layers[0]} are NaN or Inf"
            f"{also}: the inputs it saw during the PreciseBN pass contain NaN/Inf (or values "
            f"whose square overflows). No statistics were changed. Check the data and the "
            f"layers before it (torch.autograd.set_detect_anomaly(True) during training "
            f"finds where non-finite values first appear)."
        )


def _set_population(layer: nn.Module, population: Moments) -> None:
    if isinstance(layer, BatchStatsNorm):
        layer.set_population_stats(population)
        return
    assert isinstance(layer, _BatchNorm) and layer.running_mean is not None
    assert layer.running_var is not None
    with torch.no_grad():
        layer.running_mean.copy_(population.mean)
        layer.running_var.copy_(population.var)


def _accumulate(total: Moments | None, batch: Moments) -> Moments:
    batch = Moments(batch.count.double(), batch.mean.double(), batch.var.double())
    if total is None:
        return batch
    stacked = Moments(
        torch.stack([total.count, batch.count]),
        torch.stack([total.mean, batch.mean]),
        torch.stack([total.var, batch.var]),
    )
    return merge_moments(stacked)


@contextmanager
def _preserved(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """Restore every buffer (EMA statistics, step counters, cross-iteration windows), the
    train/eval mode of every module and the layers' sync settings on exit."""
    # Per module, every buffer slot as it was: a value (restored in place) or None (a buffer
    # a layer allocates lazily, e.g. a window, is unregistered again).
    buffers = {
        m: {k: None if b is None else b.detach().clone() for k, b in m._buffers.items()}
        for m in model.modules()
    }
    modes = {m: m.training for m in model.modules()}
    syncs = {m: (m.sync, m.process_group) for m in layers if isinstance(m, BatchStatsNorm)}
    passes = {m: m.statistics_pass for m in layers if isinstance(m, NormBase)}
    try:
        for module in passes:
            module.statistics_pass = True
        yield
    finally:
        with torch.no_grad():
            for module, saved in buffers.items():
                for key in [k for k in module._buffers if k not in saved]:
                    del module._buffers[key]
                for key, value in saved.items():
                    current = module._buffers.get(key)
                    if value is None or current is None or current.shape != value.shape:
                        module._buffers[key] = value
                    else:
                        current.copy_(value)
        for module in model.modules():
            if isinstance(module, NormBase):
                module.buffers_restored()
        for module, training in modes.items():
            module.training = training
        for module, (sync, group) in syncs.items():
            module.sync, module.process_group = sync, group
        for module, value in passes.items():
            module.statistics_pass = value


def precise_bn(
    model: nn.Module,
    data: Iterable[Any],
    num_samples: int = 4096,
    *,
    forward: ForwardFn | None = None,
    batch_size: Callable[[Any], int] | None = None,
    process_group: _distributed.ProcessGroup | None = None,
    progress: bool = True,
) -> nn.Module:
    """Recompute the population statistics of every batch-statistics layer (PreciseBN).

    With the weights fixed, batches from ``data`` are run through ``model`` (batch-statistics
    layers in training mode, everything else, e.g. dropout, in eval mode, no gradients) until
    at least ``num_samples`` samples have been seen; each layer's running statistics are then
    set to the population estimate of the module docstring.  Layers that pool past batches in
    training (CBN's window, MABN's moving averages) normalize each batch with its own
    statistics during the pass (:attr:`~smallbn.layers.NormBase.statistics_pass`).  Mode,
    momentum, running averages, step counters and any cross-iteration state (buffers a layer
    would allocate lazily included) are restored first, so only
    ``running_mean``/``running_var`` change.

    When torch.distributed is initialized, every process passes its own data and
    ``num_samples`` counts that process's samples; the population moments are merged across
    ``process_group`` (default: the world), so every rank ends with the same statistics.
    Layer-level synchronization is switched off during the pass, so ranks may run different
    numbers of batches.

    Args:
        data: an iterable of batches: a tensor, an ``(input, target)`` pair (see
            :func:`batch_input`), or anything ``forward`` understands.
        forward: ``forward(model, batch)`` runs one batch; default ``model(input)``.
        batch_size: samples in a batch; default the first dim of the input tensor.

    A layer that no batch reached keeps its statistics.  A :class:`~smallbn.DomainBatchNorm`
    may be called several times in one forward (e.g. once per FPN level, one domain each):
    every call adds to the populations of the domains it was given.

    Raises:
        ValueError: ``data`` ran out before ``num_samples`` (across processes: on any rank,
            and then every rank raises), or a layer other than domain BN was called more than
            once in one forward (a shared layer has no single population).
        FloatingPointError: a population is NaN/Inf (non-finite activations); nothing is
            written.
    """
    if isinstance(num_samples, bool) or int(num_samples) < 1:
        raise ValueError(
            f"precise_bn: num_samples is the number of samples to average over and must be "
            f">= 1 (the paper finds 10^3-10^4 enough), got {num_samples}"
        )
    run = forward or _default_forward
    count = batch_size or (lambda batch: int(batch_input(batch).shape[0]))
    layers = batch_stats_layers(model)
    if not layers:
        return model
    totals: dict[str, Moments | None] = {name: None for name, _ in layers}
    calls: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1 and not _accepts_repeated_calls(module):
                raise ValueError(
                    f"precise_bn: layer '{name}' ({type(module).__name__}) was called "
                    f"{calls[name]} times in one forward; a layer shared between several "
                    f"inputs has no single population. Give each use its own layer (e.g. "
                    f"DomainBatchNorm with one domain per use)."
                )
            extra = (*args[1:], *kwargs.values())
            totals[name] = _accumulate(totals[name], _population_moments(module, args[0], extra))

        return record

    seen = 0
    with _preserved(model, [m for _, m in layers]):
        model.eval()
        for _, layer in layers:
            layer.train()
            if isinstance(layer, BatchStatsNorm):
                layer.sync, layer.process_group = False, None
        handles = [
            layer.register_forward_pre_hook(hook(name), with_kwargs=True) for name, layer in layers
        ]
        bar = tqdm(total=num_samples, desc="PreciseBN", unit="sample", disable=not progress)
        try:
            with torch.no_grad():
                for batch in data:
                    calls.clear()
                    run(model, batch)
                    size = count(batch)
                    seen += size
                    bar.update(size)
                    if seen >= num_samples:
                        break
        finally:
            bar.close()
            for handle in handles:
                handle.remove()
    group = _distributed.active_group(True, process_group)
    _check_enough_data(seen, num_samples, group, layers[0][1])
    populations: dict[str, tuple[nn.Module, Moments]] = {}
    for name, layer in layers:
        population = totals[name]
        if group is not None:
            # Every rank gathers every layer, in model order, with zeros for a layer its data
            # never reached: a rank skipping the collective would pair the other ranks'
            # gathers with the wrong layers.
            local = population if population is not None else _no_data(layer)
            population = merge_moments(all_gather_moments(local, group))
        if population is None or not bool((population.count > 0).any()):
            continue  # the layer was not on the path of any data: it keeps its statistics
        populations[name] = (layer, population)
    # Every rank checks the same merged values, so all raise together or none does.
    _check_finite(populations)
    for layer, population in populations.values():
        _set_population(layer, population)
    if group is not None:
        dist.barrier(group=group)
    return model


def _check_enough_data(
    seen: int, num_samples: int, group: _distributed.ProcessGroup | None, layer: nn.Module
) -> None:
    """Raise if the data ran out before ``num_samples`` here or, across processes, on any
    rank; the ranks first agree, so that no rank waits in a collective for one that raised."""
    if group is None:
        if seen < num_samples:
            raise ValueError(
                f"precise_bn: the data ran out after {seen} samples, before num_samples="
                f"{num_samples}; pass more batches (e.g. an endless loader) or a smaller "
                f"num_samples"
            )
        return
    running_mean = layer.running_mean
    assert isinstance(running_mean, Tensor)
    seen_by_rank = _distributed.all_gather_sizes(seen, group, running_mean.device)
    short = {rank: n for rank, n in enumerate(seen_by_rank) if n < num_samples}
    if short:
        listed = ", ".join(f"rank {rank} had {n}" for rank, n in short.items())
        raise ValueError(
            f"precise_bn: the data ran out before num_samples={num_samples} on "
            f"{len(short)} of {len(seen_by_rank)} processes ({listed} samples; ranks within "
            f"process_group). num_samples counts each process's own samples: pass more "
            f"batches on every rank (e.g. an endless loader) or a smaller num_samples"
        )


@contextmanager
def batch_stats_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every batch-statistics layer normalizes with the statistics of the
    current batch and updates nothing (Wu & Johnson 2021, "use mini-batch statistics at
    inference"); the rest of the model is in eval mode.  Layers that pool past batches in
    training (Cross-Iteration BN's window, MABN's moving averages) use the current batch
    only (:attr:`~smallbn.layers.NormBase.statistics_pass`), so two identical calls give
    identical outputs.  Everything is restored on exit.

    >>> with batch_stats_eval(model):
    ...     logits = model(test_batch)
    """
    layers = [m for _, m in batch_stats_layers(model)]
    tracking = {m: m.track_running_stats for m in layers}
    with _preserved(model, layers):
        model.eval()
        for layer in layers:
            layer.train()
            setattr(layer, "track_running_stats", False)  # noqa: B010 (typed as nn.Module)
        try:
            yield model
        finally:
            for layer, value in tracking.items():
                setattr(layer, "track_running_stats", value)  # noqa: B010


class FreezeNormsAt:
    """Training callback: from epoch ``epoch`` on, normalize with frozen population
    statistics (FrozenBN for the last epochs, Wu & Johnson 2021 §5.2).

    Call :meth:`__call__` at the start of every epoch; at ``epoch`` it optionally runs
    :func:`precise_bn` on ``precise_data()`` and then replaces every norm by
    :class:`~smallbn.FrozenBatchNorm` (statistics and affine fixed).  It returns the model to
    use from then on (the same object unless the model itself is a norm layer).
    ``num_samples``, ``forward``, ``batch_size`` and ``progress`` are passed to
    :func:`precise_bn`.

    >>> freeze = FreezeNormsAt(epoch=8, precise_data=lambda: train_loader)
    >>> for epoch in range(10):
    ...     model = freeze(model, epoch)
    ...     train_one_epoch(model)
    """

    def __init__(
        self,
        epoch: int,
        *,
        precise_data: Callable[[], Iterable[Any]] | None = None,
        num_samples: int = 4096,
        forward: ForwardFn | None = None,
        batch_size: Callable[[Any], int] | None = None,
        progress: bool = True,
    ) -> None:
        self.epoch = epoch
        self.precise_data = precise_data
        self.num_samples = num_samples
        self.forward = forward
        self.batch_size = batch_size
        self.progress = progress
        self.frozen = False

    def __call__(self, model: nn.Module, epoch: int) -> nn.Module:
        if self.frozen or epoch < self.epoch:
            return model
        if self.precise_data is not None:
            precise_bn(
                model,
                self.precise_data(),
                self.num_samples,
                forward=self.forward,
                batch_size=self.batch_size,
                progress=self.progress,
            )
        self.frozen = True
        return freeze_norms(model)
