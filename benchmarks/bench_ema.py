"""Cost of G running-average updates at once (one per group of a batch, as CBN's and MABN's
grouped steps make): ``stats.ema_sequence`` (every intermediate average, which MABN needs)
against ``stats.ema_after`` (the last one only, which CBN needs), single-threaded, in µs per
call.  ``python benchmarks/bench_ema.py [--groups 8] [--channels 64]``."""

from __future__ import annotations

import argparse
import functools
import timeit

import torch

from smallbn.stats import ema_after, ema_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = torch.randn(2 * args.channels)
    values = torch.randn(args.groups, 2 * args.channels)
    for name, fn in (("ema_sequence", ema_sequence), ("ema_after", ema_after)):
        fn(start, values, 5, 0.1)  # warm-up
        call = functools.partial(fn, start, values, 5, 0.1)
        best = min(timeit.repeat(call, number=2000, repeat=5))
        print(f"{name}: {best / 2000 * 1e6:.1f} µs per call ({args.groups} groups)")


if __name__ == "__main__":
    main()
