"""The ``smallbn record`` job: train the same BN SmallResNet at several batch sizes and
record one layer's batch statistics μ_B, σ²_B, g_B, Ψ_B (the comparison of Yan et al.,
ICLR 2020, Figure 2: batch 2 against batch 32)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from smallbn.experiments.data import OptionError, load_dataset
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


def _check_channel(model: torch.nn.Module, layer: str, channel: int | None) -> None:
    """:class:`OptionError` if ``channel`` is not a channel of ``layer`` (known before any
    step is trained, where the recorder would find out at the first one)."""
    module = dict(model.named_modules()).get(layer)
    channels = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
    if channel is not None and isinstance(channels, int) and not 0 <= channel < channels:
        raise OptionError(
            "--channel",
            f"{channel} is not a channel of {layer}, which has {channels}: pass 0 to "
            f"{channels - 1}, or leave --channel out for the mean over channels",
        )


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
    fluctuation table (Markdown).  Raises KeyError for an unknown ``layer``, and
    :class:`OptionError` before training when the options cannot give a table of numbers:
    too few steps for the fluctuation (NaN), a channel the layer does not have, a batch
    larger than the training samples."""
    minimum = window + 1 if window > 1 else 2
    if steps < minimum:
        reason = (
            f"the deviation from a centred {window}-iteration moving average needs "
            f"{minimum} iterations (--window {window} + 1)"
            if window > 1
            else "a standard deviation over iterations needs 2"
        )
        raise OptionError(
            "--steps",
            f"{steps} step(s) give no fluctuation, as {reason}; pass --steps {minimum} or more"
            + (" or a smaller --window (0: no moving average)" if window > 1 else ""),
        )
    data = load_dataset(dataset, data_root)
    train_x, train_y = data.train_x[:train_samples], data.train_y[:train_samples]
    if max(batch_sizes) > len(train_x):
        raise OptionError(
            "--train-samples",
            f"batch size {max(batch_sizes)} exceeds the {len(train_x)} training samples"
            + (f" (all {data.name} has)" if len(train_x) < train_samples else "")
            + f"; pass --train-samples {max(batch_sizes)} or more, or smaller --batch-sizes",
        )
    _check_channel(SmallResNet(data.num_classes, data.in_channels), layer, channel)
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
