"""The timing harness measures every variant, interleaved, with ratios to the baseline."""

from torch import nn

from smallbn.bench import conv_block, time_training_steps


def test_harness_reports_each_variant_and_ratio_to_baseline():
    timings = time_training_steps(
        {
            "bn": lambda: conv_block(nn.BatchNorm2d(4), 4),
            "same": lambda: conv_block(nn.BatchNorm2d(4), 4),
            "heavier": lambda: nn.Sequential(*[conv_block(nn.BatchNorm2d(4), 4) for _ in range(6)]),
        },
        (2, 4, 16, 16),
        baseline="bn",
        repeats=15,
        warmup=2,
        threads=1,
    )
    by = {t.name: t for t in timings}
    assert len(by["bn"].seconds) == 15 and by["bn"].ratio == 1.0
    assert by["heavier"].ratio > 2 * by["same"].ratio
