"""Single-run probes behind the README's reading of the comparison (correlated groups, b = 2).

Each probe trains one :func:`smallbn.experiments.compare.run_one` config of the default preset
(Fashion-MNIST, 8,000 images, 3 epochs, b = 2) with one thing changed, and prints the test
error with EMA statistics and after PreciseBN:

    .venv/bin/python scripts/compare_probes.py cbn --window 16 --burnin 0.25 --seed 0
    .venv/bin/python scripts/compare_probes.py cbn --window 8 --burnin 0.05 --seed 0
    .venv/bin/python scripts/compare_probes.py cbn --burnin 0.5 --seed 0        # seeds 0, 1, 2
    .venv/bin/python scripts/compare_probes.py cbn --composition iid --seed 0  # seeds 0, 1, 2
    .venv/bin/python scripts/compare_probes.py cbn --composition iid --window 1 --seed 0
    .venv/bin/python scripts/compare_probes.py cbn --composition iid --no-compensate --seed 0
    .venv/bin/python scripts/compare_probes.py sn --mixture-lr 0 --seed 1   # mixture frozen
    .venv/bin/python scripts/compare_probes.py sn --mixture-lr 10 --seed 1  # 10x its lr

``cbn`` replaces the job's CBN options (window, burn-in as a fraction of the groups seen,
``--no-compensate`` for naive pooling); ``--composition`` picks correlated or i.i.d. groups;
``sn`` scales the learning rate of SN's mixture logits (``mean_weight``/``var_weight``) and
prints the learned mixture per layer.  Probes, not product: they patch the job's norm factory
and optimizer for one run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

import smallbn.experiments.compare as compare
from smallbn.experiments.data import load_dataset
from smallbn.mixture import format_mixture_table
from smallbn.registry import build_norm


def _cbn_factory(window: int, burnin: float, compensate: bool = True) -> Any:
    def factory(config: compare.RunConfig, sgd_steps: int) -> Any:
        groups = sgd_steps * (config.sgd_batch // config.norm_batch)
        options = {
            "window": window,
            "burnin": int(burnin * groups),
            "norm_batch_size": config.norm_batch,
            "compensate": compensate,
        }
        return lambda channels, **kw: build_norm("cbn", channels, **{**kw, **options})

    return factory


class _MixtureScaledSGD(torch.optim.SGD):
    """SGD whose 3-element parameters (SN's mixture logits) get ``scale`` times the lr."""

    scale = 1.0

    def __init__(self, params: Any, **kwargs: Any) -> None:
        params = list(params)
        mixture = [p for p in params if p.dim() == 1 and p.numel() == 3]
        rest = [p for p in params if all(p is not q for q in mixture)]
        super().__init__([{"params": rest}, {"params": mixture, "mixture": True}], **kwargs)

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:  # the job sets every group's lr before each step
            if group.get("mixture"):
                group["lr"] *= self.scale
        return super().step(closure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    cbn = sub.add_parser("cbn")
    cbn.add_argument("--window", type=int, default=8)
    cbn.add_argument("--burnin", type=float, default=0.25, help="fraction of the groups seen")
    cbn.add_argument("--no-compensate", action="store_true", help="naive pooling")
    sn = sub.add_parser("sn")
    sn.add_argument("--mixture-lr", type=float, default=1.0, help="scale of the mixture's lr")
    for p in (cbn, sn):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--train-samples", type=int, default=8_000)
        p.add_argument("--epochs", type=float, default=3.0)
        p.add_argument("--composition", choices=("correlated", "iid"), default="correlated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe == "cbn":
        compare._norm_factory = _cbn_factory(args.window, args.burnin, not args.no_compensate)  # type: ignore[assignment]
        method = "cbn"
    else:
        _MixtureScaledSGD.scale = args.mixture_lr
        compare.torch.optim.SGD = _MixtureScaledSGD  # type: ignore[misc]
        evaluate = compare.evaluate

        def evaluate_and_show(model: torch.nn.Module, *a: Any, **kw: Any) -> float:
            error = evaluate(model, *a, **kw)
            print(format_mixture_table(model))
            return error

        compare.evaluate = evaluate_and_show  # type: ignore[assignment]
        method = "sn"
    config = compare.RunConfig(
        method, 2, args.composition, args.seed, epochs=args.epochs, train_samples=args.train_samples
    )
    data = load_dataset(config.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        row = compare.run_one(
            config,
            data,
            Path(tmp) / "checkpoint.pt",
            device=torch.device("cpu"),
            checkpoint_every=10**9,
            progress=False,
        )
    settings = {k: v for k, v in vars(args).items() if k != "probe"}
    print(
        f"{args.probe} {settings}: test error {100 * row['error_ema']:.1f}% (EMA), "
        f"{100 * row['error_precise']:.1f}% (PreciseBN)"
    )


if __name__ == "__main__":
    main()
