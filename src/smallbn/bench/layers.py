"""``smallbn bench layers``: the cost of each method on a conv+norm block, against BN.

Per input shape ``(N, C, H, W)`` every method runs as ``Conv2d(C, C, 3, padding=1,
bias=False)`` + norm (MABN after the weight-centred conv it is made for, Cross-Iteration BN
with the conv bound as its producer), and is measured against ``conv + nn.BatchNorm2d`` in
the same run:

* **train**: the median time of a training step (:func:`~smallbn.bench.harness.training_step`)
  and the median over repeats of its ratio to BN's step in the same repeat;
* **eval**: the same for an eval-mode forward under ``torch.no_grad``;
* **saved**: the bytes one training forward keeps for the backward pass, input and state
  excluded (:func:`~smallbn.bench.memory.saved_bytes`), and the difference to BN's: the
  activation memory the method adds per layer, exact on any device;
* **peak** (CUDA only): the peak memory of a training step above what was allocated before
  it (``torch.cuda.max_memory_allocated``), and the difference to BN's;
* **state**: the bytes the method keeps across steps beyond the conv's weight (norm
  parameters and buffers, Cross-Iteration BN's window, MABN's moving averages, ...).

A second, independently built ``conv + BN`` block (``bn-control``) is measured like the
methods: its ratio to BN is the harness's own noise in that run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from smallbn.bench.harness import (
    Settings,
    Timing,
    conv_block,
    eval_forward,
    load_average,
    quartiles,
    time_steps,
    training_step,
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

__all__ = [
    "CONTROL",
    "DEFAULT_SHAPES",
    "LayerRow",
    "LayersReport",
    "build_block",
    "run_layers",
]

Shape = tuple[int, int, int, int]

#: ResNet-like shapes: a ResNet-50 stage-1 and stage-3 map at batch 2, and CIFAR-size maps at
#: batch 8 and 32.
DEFAULT_SHAPES: tuple[Shape, ...] = (
    (2, 64, 56, 56),
    (2, 256, 14, 14),
    (8, 64, 32, 32),
    (32, 64, 32, 32),
)

#: The control variant: a second ``conv + BN`` block; its ratio to BN is the harness noise.
CONTROL = "bn-control"


@dataclass(frozen=True)
class LayerRow:
    """One method at one shape (times in ms, ratios ``time / BN time``, memory in bytes)."""

    method: str
    shape: Shape
    train_ms: float
    train_ratio: float
    train_ratio_iqr: tuple[float, float]
    eval_ms: float
    eval_ratio: float
    eval_ratio_iqr: tuple[float, float]
    saved_bytes: int
    saved_extra_bytes: int
    peak_bytes: int | None
    peak_extra_bytes: int | None
    state_bytes: int
    state_extra_bytes: int


@dataclass(frozen=True)
class LayersReport:
    """The rows of a ``bench layers`` run with its settings, options and notes."""

    settings: dict[str, object]
    rows: tuple[LayerRow, ...]
    methods: tuple[str, ...]
    shapes: tuple[Shape, ...]
    options: dict[str, dict[str, object]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """JSON-ready: ``settings``, ``methods``, ``shapes``, ``options``, ``notes``,
        ``skipped`` (method @ shape → why) and ``rows``."""
        return {
            "kind": "layers",
            "settings": self.settings,
            "baseline": BASELINE,
            "ratio": "time of the method / time of conv + torch.nn.BatchNorm2d, median over "
            "repeats of the ratio within a repeat (above 1: slower)",
            "memory": {
                "saved_bytes": "bytes one training forward keeps for backward (autograd saved "
                "tensors and custom Functions' ctx tensors, one count per allocation), input "
                "and parameters/buffers excluded",
                "peak_bytes": "CUDA only: peak allocated memory during a training step above "
                "the memory allocated before it",
                "state_bytes": "parameters, buffers and tensor attributes of the block beyond "
                "the conv weight",
            },
            "methods": list(self.methods),
            "shapes": [list(s) for s in self.shapes],
            "options": self.options,
            "notes": self.notes,
            "skipped": self.skipped,
            "rows": [asdict(row) for row in self.rows],
        }


def build_block(method: str, channels: int) -> nn.Module:
    """``Conv2d(C, C, 3, padding=1, bias=False)`` + ``method``'s layer with the benchmark's
    options, producers bound (MABN's conv becomes weight-centred)."""
    return bound(conv_block(norm_factory(method)(channels), channels))


def _iqr(values: Sequence[float]) -> tuple[float, float]:
    q1, _, q3 = quartiles(values)
    return q1, q3


def _conv_weight_bytes(block: nn.Module) -> int:
    weight = block[0].weight  # type: ignore[index]
    assert isinstance(weight, Tensor)
    return weight.numel() * weight.element_size()


def _measure_shape(
    methods: tuple[str, ...],
    shape: Shape,
    settings: Settings,
    control: bool,
    skipped: dict[str, str],
) -> list[LayerRow]:
    device = settings.torch_device
    torch.manual_seed(settings.seed)
    x = torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    names = [*methods[:1], *([CONTROL] if control else []), *methods[1:]]
    blocks: dict[str, nn.Module] = {}
    for name in names:
        method = BASELINE if name == CONTROL else name
        try:
            block = build_block(method, shape[1]).to(device)
            # one step and one eval forward: a method that cannot run here is skipped
            training_step(block, x, grad)()
            eval_forward(block, x)()
        except (ValueError, RuntimeError) as error:
            if name == BASELINE:
                raise
            skipped[f"{name} @ {'x'.join(map(str, shape))}"] = str(error)
            continue
        blocks[name] = block
    train = time_steps(
        {name: training_step(block, x, grad) for name, block in blocks.items()},
        baseline=BASELINE,
        repeats=settings.repeats,
        warmup=settings.warmup,
        device=device,
    )
    memory: dict[str, tuple[int, int | None, int]] = {}
    for name, block in blocks.items():
        inp = x.detach().requires_grad_(True)
        saved = saved_bytes(block, inp)
        peak = None
        if device.type == "cuda":
            peak = cuda_peak_bytes(training_step(block, x, grad), device)
        memory[name] = (saved, peak, state_bytes(block) - _conv_weight_bytes(block))
    evals = time_steps(
        {name: eval_forward(block, x) for name, block in blocks.items()},
        baseline=BASELINE,
        repeats=settings.repeats,
        warmup=settings.warmup,
        device=device,
    )
    by_eval: dict[str, Timing] = {t.name: t for t in evals}
    train_base, eval_base = train[0], by_eval[BASELINE]
    base_saved, base_peak, base_state = memory[BASELINE]
    rows = []
    for timing in train:
        name = timing.name
        saved, peak, state = memory[name]
        ev = by_eval[name]
        rows.append(
            LayerRow(
                method=name,
                shape=shape,
                train_ms=timing.median_ms,
                train_ratio=timing.ratio,
                train_ratio_iqr=_iqr(timing.paired_ratios(train_base)),
                eval_ms=ev.median_ms,
                eval_ratio=ev.ratio,
                eval_ratio_iqr=_iqr(ev.paired_ratios(eval_base)),
                saved_bytes=saved,
                saved_extra_bytes=saved - base_saved,
                peak_bytes=peak,
                peak_extra_bytes=None if peak is None or base_peak is None else peak - base_peak,
                state_bytes=state,
                state_extra_bytes=state - base_state,
            )
        )
    return rows


def run_layers(
    methods: Sequence[str] = DEFAULT_METHODS,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    settings: Settings | None = None,
    *,
    control: bool = True,
    progress: Callable[[str], object] | None = None,
) -> LayersReport:
    """Measure every method on a conv block at every shape against ``conv + BN``.

    Args:
        methods: registered names (``bn``, the baseline, is always measured).
        shapes: ``(N, C, H, W)`` inputs.
        settings: repeats, warm-up, threads, seed and device (default :class:`Settings`).
        control: also measure a second ``conv + BN`` block (``bn-control``): the noise.
        progress: called with a line before each shape (e.g. ``print``).

    Raises:
        ValueError: an unknown method or a malformed shape.
    """
    settings = settings or Settings()
    names = check_methods(list(methods))
    checked: list[Shape] = []
    for shape in shapes:
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"a shape is (N, C, H, W) of positive sizes, got {tuple(shape)}")
        checked.append((int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3])))
    skipped: dict[str, str] = {}
    rows: list[LayerRow] = []
    record = settings.record()
    with settings.applied():
        for shape in checked:
            if progress is not None:
                progress(f"bench layers: {'x'.join(map(str, shape))} ({len(names)} methods)")
            rows.extend(_measure_shape(names, shape, settings, control, skipped))
    return LayersReport(
        settings={**record, "load_average_after": load_average()},
        rows=tuple(rows),
        methods=names,
        shapes=tuple(checked),
        options={m: dict(METHOD_OPTIONS.get(m, {})) for m in names},
        notes={
            **{m: METHOD_NOTES.get(m, "") for m in names},
            **(
                {CONTROL: "a second conv + BN block: its ratio to BN is the noise"}
                if control
                else {}
            ),
        },
        skipped=skipped,
    )
