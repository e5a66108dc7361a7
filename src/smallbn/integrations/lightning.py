"""PreciseBN in a Lightning training loop.

>>> trainer = lightning.Trainer(callbacks=[PreciseBN(num_samples=4096)])

Before every validation (not the sanity check) :class:`PreciseBN` recomputes the population
statistics of every batch-statistics layer with :func:`smallbn.precise_bn` on training
batches (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021: more stable than the EMA),
so validation and checkpoints after it use them.  Under DDP the populations are merged
across processes.

It also refuses ``Trainer(sync_batchnorm=True)`` on a model with smallbn layers: Lightning
then calls ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces every
``_BatchNorm`` (smallbn's CBN, MABN, BRN, Ghost BN included) by torch's SyncBatchNorm and
silently drops the method; build the layers with ``sync=True`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from smallbn.layers import NormBase
from smallbn.population import ForwardFn, precise_bn

try:  # the lightning package, or the older standalone pytorch_lightning
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]

__all__ = ["PreciseBN"]


class PreciseBN(Callback):  # type: ignore[misc]
    """Run :func:`smallbn.precise_bn` before each validation.

    Args:
        num_samples: samples per PreciseBN pass (paper: 10³–10⁴ are enough).
        data: ``data()`` returns the batches to use; default the trainer's training
            dataloader.
        forward, batch_size: as :func:`smallbn.precise_bn` (``forward(model, batch)`` runs one
            batch; default: the LightningModule called on the batch's input).
        every_n_epochs: run before the validation of every n-th epoch.
    """

    def __init__(
        self,
        num_samples: int = 4096,
        *,
        data: Callable[[], Iterable[Any]] | None = None,
        forward: ForwardFn | None = None,
        batch_size: Callable[[Any], int] | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        if int(num_samples) < 1 or int(every_n_epochs) < 1:
            raise ValueError(
                f"PreciseBN: num_samples and every_n_epochs must be >= 1, got "
                f"{num_samples} and {every_n_epochs}"
            )
        self.num_samples = int(num_samples)
        self.data = data
        self.forward = forward
        self.batch_size = batch_size
        self.every_n_epochs = int(every_n_epochs)
        self.runs = 0

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        # Lightning keeps Trainer(sync_batchnorm=True) as a layer-sync plugin, applied in
        # strategy.setup, after this hook.
        layer_sync = getattr(getattr(trainer, "strategy", None), "_layer_sync", None) or getattr(
            getattr(trainer, "_accelerator_connector", None), "_layer_sync", None
        )
        if layer_sync is not None and any(isinstance(m, NormBase) for m in pl_module.modules()):
            raise ValueError(
                "PreciseBN: Trainer(sync_batchnorm=True) converts every BatchNorm, smallbn's "
                "too, into torch's SyncBatchNorm and drops their method; pass "
                "sync_batchnorm=False and build smallbn's layers with sync=True (or convert "
                "with smallbn.convert(model, method, sync=True))"
            )

    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        data = self.data() if self.data is not None else trainer.train_dataloader
        if data is None:
            raise ValueError(
                "PreciseBN: the trainer has no training dataloader; pass data=lambda: loader"
            )
        was_training = pl_module.training
        precise_bn(
            pl_module,
            _endless(data),
            self.num_samples,
            forward=self.forward,
            batch_size=self.batch_size,
            progress=False,
        )
        pl_module.train(was_training)
        self.runs += 1


def _endless(data: Iterable[Any]) -> Iterable[Any]:
    """``data`` again and again (a short loader still gives ``num_samples``); stops after one
    pass that yields nothing."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return
