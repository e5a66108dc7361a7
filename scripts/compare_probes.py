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
    .venv/bin/python scripts/compare_probes.py cbn --burnin-mode linear --seed 0  # seeds 0, 1
    .venv/bin/python scripts/compare_probes.py pooled --seed 0                # seeds 0, 1, 2
    .venv/bin/python scripts/compare_probes.py pooled --detach-past --seed 0  # seeds 0, 1, 2
    .venv/bin/python scripts/compare_probes.py sn --mixture-lr 0 --seed 1   # mixture frozen
    .venv/bin/python scripts/compare_probes.py sn --mixture-lr 10 --seed 1  # 10x its lr
    .venv/bin/python scripts/compare_probes.py cbn --burnin 0 --seed 0  # seeds 0, 1, 2
    .venv/bin/python scripts/compare_probes.py cbn --epochs 9 --seed 0 --loss-trace 18
    .venv/bin/python scripts/compare_probes.py brn --momentum 0.1 --norm-batch 32 --seed 0

``cbn`` replaces the job's CBN options (window, burn-in as a fraction of the groups seen,
``--no-compensate`` for naive pooling, the release's linear ramp of k, aggregation and eps
placement); ``--composition`` picks correlated or i.i.d. groups; ``pooled`` is a diagnostic,
not a method: it pools the statistics of the last ``--window`` groups *of the same SGD batch*
(same weights, so nothing to compensate) with the gradient flowing through every pooled group,
or, with ``--detach-past``, through the current group only as in CBN; ``sn`` scales the
learning rate of SN's mixture logits (``mean_weight``/``var_weight``) and prints the learned
mixture per layer; ``brn`` is the job's BRN with another rate for its running averages
(``--momentum``; the job's is the paper's 0.01); ``--norm-batch`` is b (default 2, the
preset's; 32 is the whole SGD batch); ``--loss-trace N`` prints the mean training loss over
N equal parts of the run.  ``--lr`` is the job's peak learning rate (default: the job's, 0.2;
the README says which probe figures were taken at the job's earlier default, ``--lr 0.05``).
Probes, not product: they patch the job's norm factory, optimizer or loss for one run.
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


def _cbn_factory(window: int, burnin: float, compensate: bool = True, **extra: Any) -> Any:
    def factory(config: compare.RunConfig, sgd_steps: int) -> Any:
        groups = sgd_steps * (config.sgd_batch // config.norm_batch)
        options = {
            "window": window,
            "burnin": int(burnin * groups),
            "norm_batch_size": config.norm_batch,
            "compensate": compensate,
            **extra,
        }
        return lambda channels, **kw: build_norm("cbn", channels, **{**kw, **options})

    return factory


class _InBatchPooling(torch.nn.BatchNorm2d):
    """Statistics pooled over the last ``window`` groups of b samples *of the same SGD
    batch*, gradient through every pooled group unless ``detach_past`` (a diagnostic, not a
    method: groups of one batch share weights, so no compensation is needed)."""

    def __init__(self, channels: int, b: int, window: int, detach_past: bool, **kw: Any):
        super().__init__(channels, **kw)
        self.b, self.window, self.detach_past = b, window, detach_past

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        groups = x.shape[0] // self.b
        xg = x.reshape(groups, self.b, *x.shape[1:])
        dims = [1, *range(3, xg.dim())]
        mean, square = xg.mean(dims), xg.square().mean(dims)  # (G, C)
        pooled_mean, pooled_square = [], []
        for g in range(groups):
            lo = max(0, g - self.window + 1)
            m, q = mean[lo : g + 1], square[lo : g + 1]
            if self.detach_past:
                m = torch.cat([m[:-1].detach(), m[-1:]])
                q = torch.cat([q[:-1].detach(), q[-1:]])
            pooled_mean.append(m.mean(0))
            pooled_square.append(q.mean(0))
        mu, nu = torch.stack(pooled_mean), torch.stack(pooled_square)
        var = (nu - mu.square()).clamp_min(0)
        shape = (groups, 1, -1) + (1,) * (xg.dim() - 3)
        y = (xg - mu.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y.reshape_as(x) * self.weight.view(1, -1, *([1] * (x.dim() - 2)))
        y = y + self.bias.view(1, -1, *([1] * (x.dim() - 2)))
        assert self.running_mean is not None and self.running_var is not None
        with torch.no_grad():  # the job evaluates after PreciseBN; EMA kept for its EMA column
            self.running_mean.lerp_(x.mean([0, 2, 3]), self.momentum or 0.1)
            self.running_var.lerp_(x.var([0, 2, 3]), self.momentum or 0.1)
        return y


def _brn_factory(momentum: float) -> Any:
    """The job's own BRN layers (schedule, groups), with ``momentum`` for the running averages."""
    job_factory = compare._norm_factory

    def factory(config: compare.RunConfig, sgd_steps: int) -> Any:
        make = job_factory(config, sgd_steps)
        return lambda channels, **kw: make(channels, **{**kw, "momentum": momentum})

    return factory


def _pooled_factory(window: int, detach_past: bool) -> Any:
    def factory(config: compare.RunConfig, sgd_steps: int) -> Any:
        b = config.norm_batch
        return lambda channels, **kw: _InBatchPooling(channels, b, window, detach_past, **kw)

    return factory


class _MixtureScaledSGD(torch.optim.SGD):
    """SGD whose 3-element parameters (SN's mixture logits) get ``scale`` times the lr."""

    scale = 1.0

    def __init__(self, params: Any, **kwargs: Any) -> None:
        tensors: list[torch.Tensor] = list(params)
        mixture = [p for p in tensors if p.dim() == 1 and p.numel() == 3]
        rest = [p for p in tensors if all(p is not q for q in mixture)]
        groups: list[dict[str, Any]] = [{"params": rest}, {"params": mixture, "mixture": True}]
        super().__init__(groups, **kwargs)

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:  # the job sets every group's lr before each step
            if group.get("mixture"):
                group["lr"] *= self.scale
        return super().step(closure)


def _trace_losses() -> list[float]:
    """The job's training losses, step by step: ``torch.nn.functional.cross_entropy`` (the
    job's ``F``) wrapped for the rest of this process, which runs the one probe."""
    losses: list[float] = []
    cross_entropy = compare.F.cross_entropy

    def traced(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = cross_entropy(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    compare.F.cross_entropy = traced  # type: ignore[assignment]
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    cbn = sub.add_parser("cbn")
    cbn.add_argument("--window", type=int, default=8)
    cbn.add_argument("--burnin", type=float, default=0.25, help="fraction of the groups seen")
    cbn.add_argument("--no-compensate", action="store_true", help="naive pooling")
    cbn.add_argument("--burnin-mode", choices=("two_stage", "linear"), default="two_stage")
    cbn.add_argument("--aggregation", choices=("max", "drop"), default="max")
    cbn.add_argument("--eps-placement", choices=("inside", "outside"), default="inside")
    pooled = sub.add_parser("pooled")
    pooled.add_argument("--window", type=int, default=8)
    pooled.add_argument("--detach-past", action="store_true")
    sn = sub.add_parser("sn")
    sn.add_argument("--mixture-lr", type=float, default=1.0, help="scale of the mixture's lr")
    brn = sub.add_parser("brn")
    brn.add_argument("--momentum", type=float, default=0.01, help="rate of the running averages")
    for p in (cbn, pooled, sn, brn):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--norm-batch", type=int, default=2, help="b (32: the whole SGD batch)")
        p.add_argument("--train-samples", type=int, default=8_000)
        p.add_argument("--epochs", type=float, default=3.0)
        p.add_argument("--composition", choices=("correlated", "iid"), default="correlated")
        p.add_argument("--lr", type=float, default=compare.RunConfig.lr, help="peak lr")
        p.add_argument(
            "--loss-trace", type=int, default=0, help="print the mean training loss of N parts"
        )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe == "cbn":
        compare._norm_factory = _cbn_factory(  # type: ignore[assignment]
            args.window,
            args.burnin,
            not args.no_compensate,
            burnin_mode=args.burnin_mode,
            aggregation=args.aggregation,
            eps_placement=args.eps_placement,
        )
        method = "cbn"
    elif args.probe == "pooled":
        compare._norm_factory = _pooled_factory(args.window, args.detach_past)  # type: ignore[assignment]
        method = "cbn"  # the job's grouped CBN path; the factory replaces the layer
    elif args.probe == "brn":
        compare._norm_factory = _brn_factory(args.momentum)  # type: ignore[assignment]
        method = "brn"
    else:
        _MixtureScaledSGD.scale = args.mixture_lr
        compare.torch.optim.SGD = _MixtureScaledSGD  # type: ignore[misc, assignment]
        evaluate = compare.evaluate

        def evaluate_and_show(model: torch.nn.Module, *a: Any, **kw: Any) -> float:
            error = evaluate(model, *a, **kw)
            print(format_mixture_table(model))
            return error

        compare.evaluate = evaluate_and_show  # type: ignore[assignment]
        method = "sn"
    config = compare.RunConfig(
        method,
        args.norm_batch,
        args.composition,
        args.seed,
        epochs=args.epochs,
        train_samples=args.train_samples,
        lr=args.lr,
    )
    losses = _trace_losses() if args.loss_trace else None
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
    if losses is not None:
        parts = torch.tensor(losses[: row["steps"]]).tensor_split(args.loss_trace)
        print("training loss by part:", " ".join(f"{float(p.mean()):.3f}" for p in parts))
    settings = {k: v for k, v in vars(args).items() if k != "probe"}
    print(
        f"{args.probe} {settings}: test error {100 * row['error_ema']:.1f}% (EMA), "
        f"{100 * row['error_precise']:.1f}% (PreciseBN)"
    )


if __name__ == "__main__":
    main()
