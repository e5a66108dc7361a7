"""``smallbn bench network``: training and inference throughput of the comparison job's
ResNet with each method, against BN.

The network is :class:`~smallbn.experiments.models.SmallResNet` as the comparison job builds
it (widths 16, 32, 64; one basic block per stage; 1×28×28 inputs, 10 classes), with every
norm layer from :mod:`smallbn.bench.methods` and producers bound.  Measured, interleaved with
BN in the same run:

* **train**: one SGD step (forward, cross-entropy on fixed random labels, backward,
  ``SGD(lr=0.01, momentum=0.9)`` step, gradients set to ``None``) on a batch;
* **eval**: one eval-mode forward under ``torch.no_grad``, the model as trained;
* **folded**: the same after :func:`smallbn.fold` (norms folded into their convs), for
  methods whose every norm folds (an affine map in eval mode); ``None`` with the reason
  otherwise (GN/LN/IN/SN normalize each sample by its own statistics at inference).

Throughput is ``batch / median step time``; ratios are times over BN's time in the same
repeat (median over repeats; above 1 is slower), the folded ones over *unfolded* BN's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallbn.bench.harness import (
    Settings,
    Timing,
    eval_forward,
    load_average,
    time_steps,
)
from smallbn.bench.memory import cuda_peak_bytes, saved_bytes, state_bytes
from smallbn.bench.methods import (
    BASELINE,
    DEFAULT_METHODS,
    METHOD_NOTES,
    METHOD_OPTIONS,
    bound,
    check_methods,
    norm_factory,
)
from smallbn.experiments.models import SmallResNet
from smallbn.fold import fold_with_report

__all__ = ["NetworkRow", "NetworkReport", "build_network", "run_network"]

#: The comparison job's ResNet (RunConfig defaults) and its inputs.
WIDTHS = (16, 32, 64)
BLOCKS = 1
INPUT = (1, 28, 28)
CLASSES = 10


@dataclass(frozen=True)
class NetworkRow:
    """One method's throughputs (images/s), ratios (``time / BN time``) and memory (bytes)."""

    method: str
    train_images_per_s: float
    train_ratio: float
    eval_images_per_s: float
    eval_ratio: float
    folded_images_per_s: float | None
    folded_ratio: float | None
    fold_note: str | None
    saved_bytes: int
    peak_bytes: int | None
    state_bytes: int


@dataclass(frozen=True)
class NetworkReport:
    """The rows of a ``bench network`` run with its settings, options and notes."""

    settings: dict[str, object]
    rows: tuple[NetworkRow, ...]
    methods: tuple[str, ...]
    batch_size: int
    options: dict[str, dict[str, object]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """JSON-ready: ``settings``, the network, ``options``, ``notes``, ``skipped`` and
        ``rows``."""
        return {
            "kind": "network",
            "settings": self.settings,
            "network": {
                "model": "SmallResNet",
                "widths": list(WIDTHS),
                "blocks": BLOCKS,
                "input": list(INPUT),
                "classes": CLASSES,
                "batch_size": self.batch_size,
                "optimizer": "SGD(lr=0.01, momentum=0.9)",
            },
            "baseline": BASELINE,
            "ratio": "time of the method / time of the BN network, median over repeats of "
            "the ratio within a repeat (above 1: slower); folded: over unfolded BN",
            "memory": {
                "saved_bytes": "bytes a training forward keeps for backward, input and "
                "parameters/buffers excluded",
                "peak_bytes": "CUDA only: peak allocated memory during a training step above "
                "the memory allocated before it",
                "state_bytes": "parameters and buffers of the whole network",
            },
            "methods": list(self.methods),
            "options": self.options,
            "notes": self.notes,
            "skipped": self.skipped,
            "rows": [asdict(row) for row in self.rows],
        }


def build_network(method: str) -> nn.Module:
    """The comparison job's :class:`SmallResNet` with ``method``'s norms, producers bound."""
    model = SmallResNet(CLASSES, INPUT[0], WIDTHS, BLOCKS, norm=norm_factory(method))
    return bound(model)


def _sgd_step(model: nn.Module, x: Tensor, labels: Tensor) -> Callable[[], None]:
    """One training step: forward, cross-entropy, backward, SGD with momentum."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return run


def _fold(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """The folded eval model, or ``None`` and why not every norm folds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback from fx tracing shows in the report
        folded, report = fold_with_report(copy.deepcopy(model).eval())
    if report.kept:
        reasons = dict.fromkeys(kept.reason for kept in report.kept)
        return None, f"{len(report.kept)} norm(s) not folded: {'; '.join(reasons)}"
    return folded, None


def run_network(
    methods: Sequence[str] = DEFAULT_METHODS,
    batch_size: int = 32,
    settings: Settings | None = None,
    *,
    progress: Callable[[str], object] | None = None,
) -> NetworkReport:
    """Measure the comparison job's ResNet with every method against BN.

    Raises:
        ValueError: an unknown method or a batch size below 1.
    """
    settings = settings or Settings(repeats=20, warmup=3)
    names = check_methods(list(methods))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = settings.torch_device
    skipped: dict[str, str] = {}
    record = settings.record()
    with settings.applied():
        torch.manual_seed(settings.seed)
        x = torch.randn(batch_size, *INPUT, device=device)
        labels = torch.randint(0, CLASSES, (batch_size,), device=device)
        models: dict[str, nn.Module] = {}
        for name in names:
            try:
                model = build_network(name).to(device)
                _sgd_step(model, x, labels)()
                eval_forward(model, x)()
            except (ValueError, RuntimeError) as error:
                if name == BASELINE:
                    raise
                skipped[name] = str(error)
                continue
            models[name] = model
        if progress is not None:
            progress(f"bench network: training steps ({len(models)} methods, batch {batch_size})")
        train = time_steps(
            {name: _sgd_step(model, x, labels) for name, model in models.items()},
            baseline=BASELINE,
            repeats=settings.repeats,
            warmup=settings.warmup,
            device=device,
        )
        memory: dict[str, tuple[int, int | None, int]] = {}
        for name, model in models.items():
            model.train()
            saved = saved_bytes(model, x)
            peak = None
            if device.type == "cuda":
                peak = cuda_peak_bytes(_sgd_step(model, x, labels), device)
            memory[name] = (saved, peak, state_bytes(model))
        eval_steps: dict[str, Callable[[], None]] = {}
        fold_notes: dict[str, str | None] = {}
        for name, model in models.items():
            eval_steps[name] = eval_forward(model, x)
            folded, fold_notes[name] = _fold(model)
            if folded is not None:
                eval_steps[f"{name}+folded"] = eval_forward(folded, x)
        if progress is not None:
            progress(f"bench network: eval forwards ({len(eval_steps)} variants)")
        evals = time_steps(
            eval_steps,
            baseline=BASELINE,
            repeats=settings.repeats,
            warmup=settings.warmup,
            device=device,
        )
    by_eval: dict[str, Timing] = {t.name: t for t in evals}
    rows = []
    for timing in train:
        name = timing.name
        ev, folded_timing = by_eval[name], by_eval.get(f"{name}+folded")
        saved, peak, state = memory[name]
        rows.append(
            NetworkRow(
                method=name,
                train_images_per_s=batch_size / (timing.median_ms / 1000),
                train_ratio=timing.ratio,
                eval_images_per_s=batch_size / (ev.median_ms / 1000),
                eval_ratio=ev.ratio,
                folded_images_per_s=None
                if folded_timing is None
                else batch_size / (folded_timing.median_ms / 1000),
                folded_ratio=None if folded_timing is None else folded_timing.ratio,
                fold_note=fold_notes[name],
                saved_bytes=saved,
                peak_bytes=peak,
                state_bytes=state,
            )
        )
    return NetworkReport(
        settings={**record, "load_average_after": load_average()},
        rows=tuple(rows),
        methods=names,
        batch_size=batch_size,
        options={m: dict(METHOD_OPTIONS.get(m, {})) for m in names},
        notes={m: METHOD_NOTES.get(m, "") for m in names},
        skipped=skipped,
    )
