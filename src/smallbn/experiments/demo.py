"""The short demo job: convert one small ResNet to each method, train a few steps at a
small batch on real data, and print a table of test error and step time."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from smallbn.convert import ConversionWarning, convert
from smallbn.experiments.data import OptionError, load_dataset
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.train import batches, evaluate, train_steps

__all__ = ["DEFAULT_METHODS", "DemoRow", "format_table", "run_demo"]

DEFAULT_METHODS = ("bn", "syncbn", "brn", "ghostbn", "domainbn", "gn", "ln", "in", "frozenbn")


@dataclass(frozen=True)
class DemoRow:
    method: str
    layer: str
    error: float
    loss: float
    ms_per_step: float


def _options(method: str, steps: int, batch_size: int) -> dict[str, Any]:
    if method == "brn":  # the paper's 5k/25k/40k ramp, scaled to the demo's length
        return {
            "warmup_steps": steps // 8,
            "d_max_ramp_end": steps // 2,
            "r_max_ramp_end": steps * 4 // 5,
        }
    if method == "ghostbn":
        return {"group_size": max(batch_size // 2, 1)}
    return {}


def run_demo(
    methods: tuple[str, ...] = DEFAULT_METHODS,
    *,
    steps: int = 300,
    batch_size: int = 8,
    train_samples: int = 6000,
    eval_samples: int = 2000,
    dataset: str = "fashion-mnist",
    data_root: str | None = None,
    seed: int = 0,
) -> list[DemoRow]:
    """Train a copy of one BN ResNet per method; returns one row per method.  Raises
    :class:`OptionError` before training when the batch is larger than the training
    samples."""
    torch.manual_seed(seed)
    data = load_dataset(dataset, data_root)
    train_x, train_y = data.train_x[:train_samples], data.train_y[:train_samples]
    if batch_size > len(train_x):
        raise OptionError(
            "--train-samples",
            f"batch size {batch_size} exceeds the {len(train_x)} training samples"
            + (f" (all {data.name} has)" if len(train_x) < train_samples else "")
            + f"; pass --train-samples {batch_size} or more, or a smaller --batch-size",
        )
    test_x, test_y = data.test_x[:eval_samples], data.test_y[:eval_samples]
    base = SmallResNet(data.num_classes, data.in_channels)
    rows = []
    for method in methods:
        with warnings.catch_warnings():  # trained from scratch: no function to keep
            warnings.filterwarnings("ignore", "MABN centres", ConversionWarning)
            model = convert(copy.deepcopy(base), method, **_options(method, steps, batch_size))
        generator = torch.Generator().manual_seed(seed)
        result = train_steps(
            model, batches(train_x, train_y, batch_size, generator), steps, lr=0.02, progress=method
        )
        layer = type(model.stem_norm).__name__
        rows.append(
            DemoRow(
                method,
                layer,
                evaluate(model, test_x, test_y),
                result.final_loss,
                1000 * result.seconds_per_step,
            )
        )
        print(f"{method:>9}: test error {100 * rows[-1].error:5.1f}%", flush=True)
    return rows


def format_table(rows: list[DemoRow], title: str) -> str:
    """A Markdown table of the demo's rows."""
    lines = [
        title,
        "",
        "| method | layer | test error | final loss | ms/step |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.method} | {row.layer} | {100 * row.error:.1f}% | {row.loss:.3f} "
            f"| {row.ms_per_step:.1f} |"
        )
    return "\n".join(lines)
