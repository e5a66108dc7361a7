"""One run of the comparison job: the norm layers it builds, its training loop, its
checkpoints (written atomically, resumed only when they fit the run) and its evaluation with
EMA and PreciseBN statistics (:func:`run_one`)."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from smallbn._io import atomic_write
from smallbn._optional import tqdm
from smallbn.convert import ConversionWarning, bind_producers, uses_batch_stats
from smallbn.experiments.compare.configs import _NATIVE_GROUPS, METHODS, RunConfig
from smallbn.experiments.data import Dataset
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.sampling import batch_indices, steps_per_epoch
from smallbn.experiments.train import evaluate
from smallbn.layers import NormBase
from smallbn.population import precise_bn
from smallbn.registry import build_norm

__all__ = ["CheckpointError", "run_one"]


class CheckpointError(RuntimeError):
    """A run's checkpoint cannot be resumed from: damaged, from another version, written for
    another run, or past the end of this one."""


def _norm_factory(config: RunConfig, sgd_steps: int) -> Callable[..., nn.Module]:
    """The constructor the ResNet calls for each norm layer of this run.

    Schedules are in the layer's own steps: BRN counts forward calls (SGD steps), CBN counts
    iterations, i.e. groups (its burn-in is a quarter of the groups seen in training).  MABN's
    moving averages span 32 samples, the release's ``B = 32/b`` (16 at b = 2): a fixed window of
    16 steps would average over 16 weight updates at b = 32, stale enough to make training
    unstable (docs/results.md, "Two processes").  ``naive`` is CBN without compensation and
    with CBN's window, so that the two differ in the compensation only.
    """
    spec, b = METHODS[config.method], config.norm_batch
    grouped = config.mode == "groups" and b < config.sgd_batch
    group_calls = sgd_steps * (config.sgd_batch // b if grouped else 1)
    options: dict[str, Any] = {}
    if config.method == "bn" and grouped:
        spec, options = "ghostbn", {"group_size": b}
    elif config.method == "brn":  # the paper's 5k/25k/40k-of-~100k ramp, scaled to this run
        options = {
            "warmup_steps": int(0.05 * sgd_steps),
            "d_max_ramp_end": int(0.25 * sgd_steps),
            "r_max_ramp_end": int(0.4 * sgd_steps),
        }
    elif config.method == "gn":
        options = {"channels_per_group": 8}
    elif config.method in ("cbn", "naive"):  # naive: CBN's window, without compensation
        options = {"window": min(math.ceil(16 / b), 8), "burnin": int(0.25 * group_calls)}
        if config.method == "naive":
            options["compensate"] = False
    elif config.method == "mabn":
        options = {"window": max(1, round(32 / b))}
    if grouped and config.method in _NATIVE_GROUPS:
        options["norm_batch_size"] = b
    if config.sync and spec not in ("gn", "ln", "in"):
        options["sync"] = True
        spec = "syncbn" if spec == "bn" else spec  # torch's BN cannot pool on CPU

    def make(channels: int, **kwargs: Any) -> nn.Module:
        return build_norm(spec, channels, **{**kwargs, **options})

    return make


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def _checkpoint_path(output_dir: Path, config: RunConfig) -> Path:
    return output_dir / "checkpoints" / f"{config.tag}.pt"


def _unusable(checkpoint: Path, tag: str, reason: str) -> CheckpointError:
    """The error for a checkpoint that does not fit run ``tag`` (this job's and the rethink
    studies'): it names the file and says to delete it, never discarding it."""
    return CheckpointError(
        f"{checkpoint}: cannot resume {tag} from this checkpoint ({reason}); delete the file "
        f"to restart that run from scratch"
    )


def _differences(key: str, other: str) -> str:
    """The fields in which two run keys differ, as ``field=theirs (this run: ours)``."""
    try:
        ours, theirs = json.loads(key), json.loads(other)
    except (TypeError, json.JSONDecodeError):
        return "an unreadable key"
    if not isinstance(theirs, dict):
        return "an unreadable key"
    fields = sorted(set(ours) | set(theirs))
    return ", ".join(
        f"{field}={theirs.get(field)!r} (this run: {ours.get(field)!r})"
        for field in fields
        if ours.get(field) != theirs.get(field)
    )


def _resume(
    checkpoint: Path,
    config: RunConfig,
    total: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[int, float, float]:
    """Load ``checkpoint`` into ``model`` and ``optimizer``; returns (step, seconds, loss).

    A checkpoint that does not fit its run raises :class:`CheckpointError` naming the file
    and saying to delete it; it is never discarded nor worked around.  Resuming from it would
    record a result trained for the wrong number of steps (a step past this run's end) or
    from another run's weights (a file copied or renamed by hand), and discarding it would
    silently throw away training the user may want back.  Checkpoints record the run
    (``key``) and the number of steps (``total``) they were written for; older ones, without
    those fields, are checked on their step alone.  A checkpoint at exactly ``total`` steps is
    a finished training whose result was not recorded yet: resuming evaluates it, no step is
    trained again.
    """

    def unusable(reason: str) -> CheckpointError:
        return _unusable(checkpoint, config.tag, reason)

    try:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        step = state["step"]
    except Exception as error:  # any failure to read it: the file is the problem
        raise unusable(f"{type(error).__name__}: {error}") from error
    if "key" in state and state["key"] != config.key:
        raise unusable(f"it was written for another run: {_differences(config.key, state['key'])}")
    if "total" in state and state["total"] != total:
        raise unusable(
            f"it was written for a run of {state['total']} steps and this run has {total}: "
            f"the training data or the code changed since"
        )
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise unusable(f"it is at step {step!r}, outside this run's {total} steps")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        _load_host_state(model, state.get("host_state"))
        return step, float(state["elapsed"]), float(state["loss"])
    except Exception as error:  # any failure to resume: the file is the problem
        raise unusable(f"{type(error).__name__}: {error}") from error


def _host_steps(model: nn.Module) -> dict[str, NormBase]:
    """The layers that keep a host step counter (:meth:`NormBase.host_step`), by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, NormBase) and m.host_step() is not None
    }


def _host_state(model: nn.Module) -> dict[str, int]:
    """What the checkpoint needs beside the ``state_dict`` to resume exactly: each layer's
    host step counter (Shuffle BN's picks its next permutation; host state, kept out of the
    ``state_dict`` so that it stays BN's)."""
    return {name: int(m.host_step() or 0) for name, m in _host_steps(model).items()}


def _load_host_state(model: nn.Module, state: dict[str, int] | None) -> None:
    """Restore :func:`_host_state`; layers whose counter the checkpoint does not hold (all of
    them in one written before it was kept, ``None``) resume from step 0, said with a
    warning naming them."""
    layers = _host_steps(model)
    missing = list(layers) if state is None else [n for n in layers if n not in state]
    if missing:
        warnings.warn(
            f"the checkpoint does not hold the step counters of {len(missing)} layer(s) "
            f"(Shuffle BN's, e.g. '{missing[0]}'): the resumed run draws their permutations "
            f"from step 0 again, not those an uninterrupted run would draw",
            RuntimeWarning,
            stacklevel=3,
        )
    for name, module in layers.items():
        if state is not None and name in state:
            module.set_host_step(int(state[name]))


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr(config: RunConfig, step: int, total: int) -> float:
    """Linear warm-up over the first 2% of steps, then cosine decay."""
    warmup = max(1, total // 50)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _sgd_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    lr: float,
    *,
    tag: str,
    step: int,
    hint: str = "",
) -> None:
    """One SGD step on ``loss`` at learning rate ``lr`` (the training loops of this job and of
    the rethink studies); a loss that is not finite raises FloatingPointError naming the run,
    the step and ``hint`` (the option that lowers the learning rate)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{tag}: training diverged at step {step} (loss {float(loss)}); lower the learning "
            f"rate{hint}"
        )
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CPU, where oneDNN's convolutions run 15–40% faster in NHWC at these
    sizes (every layer computes the same in either layout: tests/layers/test_memory_format)."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The SGD of this job's runs and the rethink studies': Nesterov momentum 0.9, weight
    decay 5e-4, peak learning rate ``lr`` (the schedule sets each step's)."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )


def run_one(
    config: RunConfig,
    data: Dataset,
    checkpoint: Path,
    *,
    device: torch.device,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate one config, resuming from ``checkpoint`` if it exists.

    Rank 0 checkpoints every ``checkpoint_every`` steps and when training ends, so a run
    interrupted while it is evaluated resumes without training again.  A checkpoint that
    does not fit the run raises :class:`CheckpointError` (see :func:`_resume`).
    """
    rank, world = _rank()
    config.check()
    train_x, train_y = data.train_x[: config.train_samples], data.train_y[: config.train_samples]
    class_group = config.class_group  # check(): divides the batch where it is used (correlated)
    per_epoch = steps_per_epoch(train_y, config.batch, class_group, config.composition)
    total = max(1, int(round(config.epochs * per_epoch)))
    torch.manual_seed(config.seed)
    model = SmallResNet(
        data.num_classes,
        data.in_channels,
        config.widths,
        config.blocks,
        norm=_norm_factory(config, total),
    ).to(device)
    model.to(memory_format=_memory_format(device))  # type: ignore[call-overload]
    with warnings.catch_warnings():  # a model trained from scratch: no function to keep
        warnings.filterwarnings("ignore", "MABN centres", ConversionWarning)
        bind_producers(model)
    optimizer = _sgd(model, config.lr)
    start, elapsed, loss_value = 0, 0.0, float("nan")
    if checkpoint.exists():
        start, elapsed, loss_value = _resume(checkpoint, config, total, model, optimizer, device)
        if rank == 0:
            print(
                f"resuming {config.tag} from its checkpoint at step {start} of {total}",
                file=sys.stderr,
                flush=True,
            )
    trained: nn.Module = model
    if world > 1:
        with warnings.catch_warnings():
            # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which (its own
            # warning says) still syncs buffers at init: rank-local running statistics (Shuffle
            # BN's) need broadcast_buffers=False until init_sync_buffers exists
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            trained = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    stream = batch_indices(
        train_y, config.batch, class_group, config.composition, config.seed, start
    )
    bar = tqdm(
        total=total,
        initial=start,
        desc=config.tag.rsplit("-", 1)[0],
        leave=False,
        disable=not progress or rank != 0,
    )
    model.train()
    began = time.perf_counter()
    for step in range(start, total):
        index = next(stream)
        if world > 1:  # each process trains on its share of whole groups
            index = index.reshape(world, -1)[rank]
        x, y = train_x[index].to(device), train_y[index].to(device)
        loss = F.cross_entropy(trained(x), y)
        _sgd_step(
            optimizer, loss, _lr(config, step, total), tag=config.tag, step=step, hint=" (--lr)"
        )
        bar.update(1)
        done = step + 1
        if rank == 0 and (done % checkpoint_every == 0 or done == total):
            loss_value = float(loss.detach())
            _save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "host_state": _host_state(model),
                    "step": done,
                    "elapsed": elapsed + time.perf_counter() - began,
                    "loss": loss_value,
                    "key": config.key,
                    "total": total,
                },
                checkpoint,
            )
        if done == total:
            loss_value = float(loss.detach())
    bar.close()
    elapsed += time.perf_counter() - began
    error_ema = evaluate(model, data.test_x, data.test_y, device=device)
    # PreciseBN sees batches composed as in training (groups of b), normalized as in training
    precise_stream = (
        (train_x[i].to(device), train_y[i])
        for i in batch_indices(
            train_y, config.batch, class_group, config.composition, config.seed + 7
        )
    )
    if any(uses_batch_stats(m) for m in model.modules()):
        precise_bn(model, precise_stream, config.precise_samples, progress=False)
        error_precise = evaluate(model, data.test_x, data.test_y, device=device)
    else:  # GN/LN/IN: no population statistics to recompute
        error_precise = error_ema
    return {
        **config.identity(),
        "key": config.key,
        "train_samples_used": len(train_y),  # train_samples caps it; a small dataset has fewer
        "steps": total,
        "error_ema": error_ema,
        "error_precise": error_precise,
        "train_seconds": elapsed,
        "final_loss": loss_value,
        "device": str(device),
        "torch": torch.__version__,
    }
