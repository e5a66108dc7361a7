"""Speed measurements, always as ratios to ``torch.nn.BatchNorm2d`` timed in the same run."""

from smallbn.bench.harness import Timing, conv_block, time_training_steps

__all__ = ["Timing", "conv_block", "time_training_steps"]
