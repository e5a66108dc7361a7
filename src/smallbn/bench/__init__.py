"""Speed and memory measurements, always as ratios to ``torch.nn.BatchNorm2d`` timed in the
same run: the harness (:mod:`~smallbn.bench.harness`), memory accounting
(:mod:`~smallbn.bench.memory`), the ``smallbn bench layers`` / ``network`` jobs
(:mod:`~smallbn.bench.layers`, :mod:`~smallbn.bench.network`) and their tables and files
(:mod:`~smallbn.bench.report`)."""

from smallbn.bench.harness import (
    Settings,
    Timing,
    conv_block,
    eval_forward,
    time_eval_forwards,
    time_steps,
    time_training_steps,
    training_step,
)
from smallbn.bench.memory import cuda_peak_bytes, saved_bytes, state_bytes

__all__ = [
    "Settings",
    "Timing",
    "conv_block",
    "cuda_peak_bytes",
    "eval_forward",
    "saved_bytes",
    "state_bytes",
    "time_eval_forwards",
    "time_steps",
    "time_training_steps",
    "training_step",
]
