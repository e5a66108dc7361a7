"""The ``smallbn record`` job: train the same BN SmallResNet at several batch sizes and
record one layer's batch statistics μ_B, σ²_B, g_B, Ψ_B (the comparison of Yan et al.,
ICLR 2020, Figure 2: batch 2 against batch 32)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from smallbn.experiments.data import load_dataset
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.train import batches, train_steps
from smallbn.recorder import (
    Recording,
    StatsRecorder,
    format_fluctuation_table,
    plot_stats,
    summarize_fluctuation,
)

__all__ = ["run_record"]


def run_record(
    batch_sizes: Sequence[int],
    *,
    steps: int = 300,
    layer: str = "stages.0.bn2",
    channel: int | None = None,
    window: int = 11,
    raw_grad: bool = False,
    lr: float = 0.02,
    train_samples: int = 6000,
    dataset: str = "fashion-mnist",
    data_root: str | None = None,
    output_dir: Path = Path("runs/record"),
    file_format: str = "pt",
    seed: int = 0,
) -> str:
    """Run the recordings, write them and the figure to ``output_dir``; returns the
    fluctuation table (Markdown).  Raises KeyError for an unknown ``layer``."""
    data = load_dataset(dataset, data_root)
    train_x, train_y = data.train_x[:train_samples], data.train_y[:train_samples]
    records: dict[str, Recording] = {}
    for size in batch_sizes:
        # Same seed for every run: identical initial weights and the same shuffling stream,
        # so the runs differ in the batch size only.
        torch.manual_seed(seed)
        model = SmallResNet(data.num_classes, data.in_channels)
        label = f"batch {size}"
        metadata = {
            "dataset": data.name,
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "train_samples": len(train_x),
        }
        recorder = StatsRecorder(
            model,
            [layer],
            channels=None if channel is None else [channel],
            label=label,
            metadata=metadata,
            scale_grad_by_batch=not raw_grad,
        )
        stream = batches(train_x, train_y, size, torch.Generator().manual_seed(seed))
        with recorder:
            result = train_steps(model, stream, steps, lr=lr, progress=label)
        records[label] = recorder.recording()
        saved = records[label].save(output_dir / f"batch{size}.{file_format}")
        print(
            f"{label:>9}: final loss {result.final_loss:.3f}, "
            f"{1000 * result.seconds_per_step:.1f} ms/step -> {saved}",
            flush=True,
        )
    safe_layer = layer.replace("/", "_") or "root"
    figure = plot_stats(records, layer, output_dir / f"stats_{safe_layer}.png", channel)
    summary = summarize_fluctuation(records, layer, channel, window=window)
    what = "averaged over channels" if channel is None else f"channel {channel}"
    detrend = f" of the deviation from a {window}-iteration moving average" if window > 1 else ""
    grads = "raw dL/dy" if raw_grad else "dL/dy scaled by N (per-sample loss gradient)"
    title = (
        f"Fluctuation of {layer}'s batch statistics on {data.name} over {steps} "
        f"iterations (per-channel std over iterations{detrend}, {what}; {grads})"
    )
    return f"\n{format_fluctuation_table(summary, title)}\n\nfigure: {figure}"
