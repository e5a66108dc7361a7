"""What every study run shares to train: the network (:func:`_model`), SGD and its learning
rate schedule (:func:`_lr`), the training loop with its checkpoints (:class:`_Run`), resuming,
the clock that sums training time over resumes (:class:`_Clock`) and the row's common fields
(:func:`_row`)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallbn._optional import tqdm
from smallbn.experiments.compare.training import _memory_format, _sgd, _sgd_step
from smallbn.experiments.data import Dataset
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.rethink.checkpoint import _Checkpoint
from smallbn.experiments.rethink.config import StudyConfig
from smallbn.experiments.rethink.images import _Data
from smallbn.experiments.sampling import batch_indices, steps_per_epoch
from smallbn.registry import build_norm


def _model(config: StudyConfig, data: Dataset, device: torch.device) -> nn.Module:
    """The study's network: BN over the SGD batch (ema, domain a), Ghost BN over groups of b
    (inconsistency), two-domain domain BN (domain b)."""
    options: dict[str, Any] = {}
    spec = "bn"
    if config.study == "inconsistency" and config.norm_batch < config.sgd_batch:
        spec, options = "ghostbn", {"group_size": config.norm_batch}
    elif config.study == "domain" and config.part == "b":
        spec, options = "domainbn", {"num_domains": 2}
        if config.domain_affine:
            options["per_domain_affine"] = True

    def make(channels: int, **kwargs: Any) -> nn.Module:
        return build_norm(spec, channels, **{**kwargs, **options})

    torch.manual_seed(config.seed)
    model = SmallResNet(
        data.num_classes, data.in_channels, config.widths, config.blocks, norm=make
    ).to(device)
    model.to(memory_format=_memory_format(device))  # type: ignore[call-overload]
    return model


def _lr(config: StudyConfig, step: int, total: int) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay or constant."""
    warmup = max(1, int(config.warmup * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@dataclass
class _Clock:
    """Wall and CPU seconds of a run's training, summed over resumes."""

    wall: float = 0.0
    cpu: float = 0.0

    def __post_init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        now, cpu = time.perf_counter(), time.process_time()
        self.wall += now - self._wall
        self.cpu += cpu - self._cpu
        self._wall, self._cpu = now, cpu
        return self.wall, self.cpu


@dataclass
class _Run:
    """What every study's run shares: config, data, device, checkpoint, progress."""

    config: StudyConfig
    data: _Data
    device: torch.device
    checkpoint: _Checkpoint
    checkpoint_every: int
    progress: bool

    def model_and_optimizer(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The run's freshly initialised network (:func:`_model`) and its SGD."""
        model = _model(self.config, self.data.dataset, self.device)
        return model, _sgd(model, self.config.lr)

    def resume(
        self,
        state: dict[str, Any] | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        say_stage: bool = False,
    ) -> tuple[_Clock, int]:
        """The clock and the first step of the run's training: from scratch when ``state``
        (the loaded checkpoint) is None, else from ``state``, restored into ``model`` and
        ``optimizer`` (with torch's random state) and announced on stderr (with its stage
        where ``say_stage``)."""
        if state is None:
            return _Clock(), 0
        self.checkpoint.restore(state, model, optimizer)
        clock, start = _Clock(state["wall"], state["cpu"]), state["step"]
        where = f" (stage {state['stage']})" if say_stage and state["stage"] else ""
        print(
            f"resuming {self.config.tag} from its checkpoint at step {start} of "
            f"{self.checkpoint.total}{where}",
            file=sys.stderr,
            flush=True,
        )
        return clock, start

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        start: int,
        loss: Callable[[nn.Module, Tensor], Tensor],
        state: Callable[[], dict[str, Any]],
        clock: _Clock,
        on_epoch: Callable[[int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """SGD steps ``start`` … ``checkpoint.total − 1`` of the run on i.i.d. batches of
        ``sgd_batch`` training samples (the order a pure function of the seed and the step, so
        a resumed run sees the batches it would have seen).  ``loss(model, index)`` computes a
        batch's loss; ``on_epoch(step)`` runs at the end of every epoch and ``on_step(step)``
        after every step, both before the checkpoint of that step; ``state()`` is what the run
        has to keep beside the weights (its stage, what it has measured), taken at every
        checkpoint."""
        config, total = self.config, self.checkpoint.total
        per_epoch = _total(config, self.data)[0]
        stream = batch_indices(self.data.train_y, config.sgd_batch, 1, "iid", config.seed, start)
        bar = tqdm(
            total=total,
            initial=start,
            desc=self.config.tag.rsplit("-", 1)[0],
            leave=False,
            disable=not self.progress,
        )
        model.train()
        for step in range(start, total):
            index = next(stream)
            _sgd_step(
                optimizer, loss(model, index), _lr(config, step, total), tag=config.tag, step=step
            )
            bar.update(1)
            done = step + 1
            if on_step is not None:
                on_step(done)
            epoch_end = done % per_epoch == 0
            if epoch_end and on_epoch is not None:
                on_epoch(done)
            if epoch_end or done % self.checkpoint_every == 0 or done == total:
                self.save(state(), done, model, optimizer, clock)
        bar.close()

    def save(
        self,
        record: dict[str, Any],
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clock: _Clock,
    ) -> None:
        """Checkpoint the run at ``step``: ``record`` (its stage, what it has measured), the
        weights, the optimizer, torch's random state and the training time so far."""
        wall, cpu = clock.lap()
        self.checkpoint.save(
            {
                **record,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "wall": wall,
                "cpu": cpu,
            }
        )


def _cross_entropy(
    x: Tensor, y: Tensor, device: torch.device
) -> Callable[[nn.Module, Tensor], Tensor]:
    def loss(model: nn.Module, index: Tensor) -> Tensor:
        return F.cross_entropy(model(x[index].to(device)), y[index].to(device))

    return loss


def _total(config: StudyConfig, data: _Data) -> tuple[int, int]:
    """(steps per epoch, steps) of a run."""
    per_epoch = steps_per_epoch(data.train_y, config.sgd_batch, 1, "iid")
    return per_epoch, per_epoch * config.epochs


def _row(
    config: StudyConfig, run: _Run, clock: _Clock, steps: int, **measured: Any
) -> dict[str, Any]:
    return {
        **config.identity(),
        "key": config.key,
        "train_samples_used": len(run.data.train_y),
        "steps": steps,
        "train_seconds": clock.wall,
        "train_cpu_seconds": clock.cpu,
        "device": str(run.device),
        "torch": torch.__version__,
        **measured,
    }
