"""Study ``ema``: **EMA vs PreciseBN** (Wu & Johnson 2021, "whole population as a batch").

A BN network trained with a large SGD batch and a large, constant learning rate (after a
warm-up), the setting in which the paper finds the EMA of batch statistics unstable.  After
every epoch the test error is measured with the EMA statistics and with PreciseBN
(:func:`smallbn.precise_bn`); the EMA is kept for several momenta at once
(:class:`_EmaShadows`: the EMA does not influence training in BN's training mode, so one run
carries every momentum's EMA, exactly); after training, the error against the number of
PreciseBN samples (several draws each).  This module holds the run, its findings, its report
table and its figure."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn.experiments.rethink.evaluation import _error, _precise
from smallbn.experiments.rethink.images import _stream
from smallbn.experiments.rethink.training import _cross_entropy, _lr, _row, _Run, _total
from smallbn.experiments.rethink.verdicts import (
    TOLERANCE,
    Finding,
    _beats,
    _last,
    _pct,
    _settings,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class _EmaShadows:
    """The EMA of every BN layer's batch statistics for several momenta, kept beside
    training: in BN's training mode the running statistics do not change the forward or the
    gradients, so one training run yields the EMA of every momentum exactly (as torch
    computes it: ``r ← (1 − m) r + m s`` with the batch mean and the Bessel-corrected batch
    variance).  Updated in training forwards only (grad enabled, module in training mode):
    evaluation and PreciseBN passes run under ``no_grad``."""

    def __init__(self, model: nn.Module, momenta: Sequence[float]) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
        self.momenta = tuple(momenta)
        self.stats: dict[float, dict[str, tuple[Tensor, Tensor]]] = {
            momentum: {
                name: (
                    torch.zeros(layer.num_features, device=_device_of(layer)),
                    torch.ones(layer.num_features, device=_device_of(layer)),
                )
                for name, layer in self.layers.items()
            }
            for momentum in self.momenta
        }
        self.handles = [
            layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers.items()
        ]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            x = args[0].detach()
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.float(), dim=dims, correction=1)
            for momentum in self.momenta:
                running_mean, running_var = self.stats[momentum][name]
                running_mean.lerp_(mean, momentum)
                running_var.lerp_(var, momentum)

        return record

    def state(self) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
        return {
            f"{m:g}": {k: (a.clone(), b.clone()) for k, (a, b) in s.items()}
            for m, s in self.stats.items()
        }

    def load(self, state: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> None:
        for momentum in self.momenta:
            for name, (mean, var) in state[f"{momentum:g}"].items():
                self.stats[momentum][name][0].copy_(mean)
                self.stats[momentum][name][1].copy_(var)

    def model_with(self, model: nn.Module, momentum: float) -> nn.Module:
        """A copy of ``model`` whose BN layers hold the EMA of ``momentum``."""
        clone = copy.deepcopy(model)
        layers = dict(clone.named_modules())
        with torch.no_grad():
            for name, (mean, var) in self.stats[momentum].items():
                layer = layers[name]
                assert isinstance(layer, _BatchNorm)
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
        return clone


def _device_of(module: nn.Module) -> torch.device:
    return next(module.buffers()).device


def _run_ema(run: _Run) -> dict[str, Any]:
    """Train with BN, keeping the EMA of every momentum; after every epoch the test error
    with each EMA and with PreciseBN; on the final weights the PreciseBN sample sweep."""
    config, data, device = run.config, run.data, run.device
    per_epoch, total = _total(config, data)
    model, optimizer = run.model_and_optimizer()
    shadows = _EmaShadows(model, config.momenta)
    own = 0.1  # torch BN's momentum: the model's own running statistics
    history: list[dict[str, Any]] = []
    state = run.checkpoint.load(("train",))
    clock, start = run.resume(state, model, optimizer)
    if state is not None:
        shadows.load(state["shadows"])
        history = list(state["history"])
    record: dict[str, Any] = {"stage": "train", "history": history}

    def on_epoch(step: int) -> None:
        epoch = step // per_epoch
        errors = {}
        for momentum in config.momenta:
            if momentum == own:  # the model's own EMA, which the shadow of 0.1 equals
                errors[f"{momentum:g}"] = _error(model, data.test_x, data.test_y, device)
            else:
                errors[f"{momentum:g}"] = _error(
                    shadows.model_with(model, momentum), data.test_x, data.test_y, device
                )
        stream = _stream(
            data.train_x, data.train_y, config.sgd_batch, 7_919 * config.seed + epoch, device
        )
        precise = _precise(model, stream, config.precise_samples)
        history.append(
            {
                "epoch": epoch,
                "ema": errors,
                "precise": _error(precise, data.test_x, data.test_y, device),
                "lr": _lr(config, step - 1, total),
            }
        )
        record["history"] = history

    run.train(
        model,
        optimizer,
        start=start,
        loss=_cross_entropy(data.train_x, data.train_y, device),
        state=lambda: {**record, "shadows": shadows.state()},
        clock=clock,
        on_epoch=on_epoch,
    )
    clock.lap()
    # error against the number of PreciseBN samples, on the final weights; batches of the
    # training batch size (of n samples where n is smaller), each draw its own data order
    sweep: dict[str, list[float]] = {}
    for samples in config.sample_sweep:
        errors = []
        for draw in range(config.sweep_draws):
            stream = _stream(
                data.train_x,
                data.train_y,
                min(samples, config.sgd_batch),
                1_000_003 * config.seed + 101 * draw + samples,
                device,
            )
            precise = _precise(model, stream, samples)
            errors.append(_error(precise, data.test_x, data.test_y, device))
        sweep[str(samples)] = errors
    return _row(
        config,
        run,
        clock,
        total,
        error_ema=[h["ema"][f"{own:g}"] for h in history],
        error_precise=[h["precise"] for h in history],
        error_momentum={f"{m:g}": [h["ema"][f"{m:g}"] for h in history] for m in config.momenta},
        lr_per_epoch=[h["lr"] for h in history],
        precise_sample_sweep=sweep,
    )


def _ema_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method (``ema`` = BN's momentum 0.1, ``precise``, ``ema@m``): the mean and std of
    the error (%) over the last half of the epochs, averaged over seeds."""
    out: dict[str, Any] = {}
    series: dict[str, list[list[float]]] = {"ema": [], "precise": []}
    for row in rows:
        series["ema"].append(_pct(row["error_ema"]))
        series["precise"].append(_pct(row["error_precise"]))
        for m, values in row["error_momentum"].items():
            series.setdefault(f"ema@{m}", []).append(_pct(values))
    for name, runs in series.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        out[name] = {
            "mean": float(np.mean([np.mean(_last(r)) for r in runs])),
            "std": float(np.mean([np.std(_last(r)) for r in runs])),
            "epochs": len(_last(runs[0])),
        }
    sweep: dict[int, list[float]] = {}
    for row in rows:
        for n, values in row["precise_sample_sweep"].items():
            sweep.setdefault(int(n), []).extend(_pct(values))
    out["sweep"] = {n: (float(np.mean(v)), float(np.std(v))) for n, v in sorted(sweep.items())}
    return out


def _ema_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    s = _ema_summary(rows)
    if "ema" not in s or "precise" not in s:
        return []
    ema, precise, k = s["ema"], s["precise"], s["ema"]["epochs"]
    found = [
        Finding(
            "EMA vs PreciseBN: with a large batch and learning rate the EMA estimate is "
            "unstable: its test error jumps from epoch to epoch, PreciseBN's does not",
            f"std of the per-epoch error over the last {k} epochs: EMA {ema['std']:.2f}, "
            f"PreciseBN {precise['std']:.2f} points",
            **_beats(precise["std"], ema["std"]),
        ),
        Finding(
            "EMA vs PreciseBN: PreciseBN's population statistics give a lower error than the EMA "
            "during training",
            f"mean error over the last {k} epochs: EMA {ema['mean']:.2f}%, PreciseBN "
            f"{precise['mean']:.2f}%",
            **_beats(precise["mean"], ema["mean"]),
        ),
    ]
    sweep = s["sweep"]
    if sweep:
        largest = max(sweep)
        enough = [n for n in sweep if n >= 1000]
        if enough and min(enough) < largest:
            n = min(enough)
            gap = sweep[n][0] - sweep[largest][0]
            found.append(
                Finding(
                    f"PreciseBN samples: 10³–10⁴ samples are enough (the error at {n} "
                    f"samples is within {TOLERANCE} points of the error at {largest})",
                    f"{n} samples: {sweep[n][0]:.2f} ± {sweep[n][1]:.2f}%, {largest}: "
                    f"{sweep[largest][0]:.2f} ± {sweep[largest][1]:.2f}%",
                    gap <= TOLERANCE,
                )
            )
        smallest = min(sweep)
        if smallest < 1000 and smallest < largest:
            found.append(
                Finding(
                    f"PreciseBN samples: too few samples give a worse estimate (the error at "
                    f"{smallest} samples is more than {TOLERANCE} points above the error at "
                    f"{largest})",
                    f"{smallest} samples: {sweep[smallest][0]:.2f} ± {sweep[smallest][1]:.2f}%",
                    sweep[smallest][0] - sweep[largest][0] > TOLERANCE,
                )
            )
    momenta = {name[4:]: v for name, v in s.items() if name.startswith("ema@")}
    if len(momenta) > 1:
        best = min(momenta, key=lambda m: momenta[m]["mean"])
        found.append(
            Finding(
                "EMA momentum: the EMA depends on its momentum (slow ones lag behind the "
                "weights, fast ones follow the last noisy batches); PreciseBN, which has none, "
                f"is within {TOLERANCE} points of the best momentum or better",
                f"best momentum {best}: {momenta[best]['mean']:.2f}% (others: "
                + ", ".join(f"{m}: {v['mean']:.2f}%" for m, v in momenta.items() if m != best)
                + f"); PreciseBN {precise['mean']:.2f}%",
                precise["mean"] <= momenta[best]["mean"] + TOLERANCE,
            )
        )
    return found


def _report(rows: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    """The study's part of :func:`~.report.format_report`: its settings and numbers
    (``rows`` of ``seeds`` seeds) as Markdown lines."""
    out: list[str] = []
    out.append(f"**EMA vs PreciseBN** — {_settings(rows)}; EMA momentum 0.1 (BN's default)")
    out.append("")
    epochs = max(len(r["error_ema"]) for r in rows)
    out.append("test error (%) per epoch, mean over seeds:")
    out.append("")
    momenta = sorted({m for r in rows for m in r["error_momentum"]}, key=float)
    header = ["epoch", "lr", "EMA", "PreciseBN"] + [f"EMA m={m}" for m in momenta if m != "0.1"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|---" * len(header) + "|")
    for e in range(epochs):
        got = [r for r in rows if len(r["error_ema"]) > e]
        line = [str(e + 1), f"{got[0]['lr_per_epoch'][e]:g}"]
        line.append(f"{np.mean([100 * r['error_ema'][e] for r in got]):.2f}")
        line.append(f"{np.mean([100 * r['error_precise'][e] for r in got]):.2f}")
        for m in momenta:
            if m != "0.1":
                line.append(f"{np.mean([100 * r['error_momentum'][m][e] for r in got]):.2f}")
        out.append("| " + " | ".join(line) + " |")
    s = _ema_summary(rows)
    out.append("")
    out.append(
        f"over the last {s['ema']['epochs']} epochs (mean over seeds of each run's mean and "
        f"std across those epochs):"
    )
    out.append("")
    out.append("| statistics | mean error (%) | std across epochs (points) |")
    out.append("|---|---|---|")
    out.append(f"| EMA (m=0.1) | {s['ema']['mean']:.2f} | {s['ema']['std']:.2f} |")
    out.append(f"| PreciseBN | {s['precise']['mean']:.2f} | {s['precise']['std']:.2f} |")
    for m in momenta:
        if m == "0.1":  # the EMA row above
            continue
        v = s[f"ema@{m}"]
        out.append(f"| EMA m={m} | {v['mean']:.2f} | {v['std']:.2f} |")
    out.append("")
    draws = rows[0]["sweep_draws"]
    out.append(
        f"error (%) of the final weights against the number of PreciseBN samples, mean ± "
        f"std over {draws} draws × {seeds} seed(s):"
    )
    out.append("")
    out.append("| samples | " + " | ".join(str(n) for n in s["sweep"]) + " |")
    out.append("|---|" + "---|" * len(s["sweep"]))
    out.append(
        "| error | " + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in s["sweep"].values()) + " |"
    )
    return out


def _plot(rows: Sequence[dict[str, Any]]) -> Figure:
    """The study's figure for :func:`~.report.plot_study` (which has chosen matplotlib's
    Agg backend)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    epochs = np.arange(1, max(len(r["error_ema"]) for r in rows) + 1)
    for row in rows:
        seed = row["seed"]
        n = len(row["error_ema"])
        for key, style, colour, label in (
            ("error_ema", "o-", "C1", "EMA (m=0.1)"),
            ("error_precise", "s-", "C0", "PreciseBN"),
        ):
            axes[0].plot(
                epochs[:n],
                _pct(row[key]),
                style,
                color=colour,
                alpha=0.7,
                label=f"{label}, seed {seed}",
            )
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test error (%)")
    axes[0].set_title("EMA vs PreciseBN after every epoch")
    s = _ema_summary(rows)
    sizes = list(s["sweep"])
    axes[1].errorbar(
        sizes,
        [v[0] for v in s["sweep"].values()],
        yerr=[v[1] for v in s["sweep"].values()],
        marker="o",
        capsize=3,
    )
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("PreciseBN samples")
    axes[1].set_ylabel("test error (%)")
    axes[1].set_title("final weights: error vs PreciseBN samples")
    momenta = sorted({m for r in rows for m in r["error_momentum"]}, key=float)
    for i, m in enumerate(momenta):
        curves = [r["error_momentum"][m] for r in rows]
        n = min(len(c) for c in curves)
        axes[2].plot(
            epochs[:n],
            np.mean([_pct(c[:n]) for c in curves], axis=0),
            "o-",
            color=f"C{i + 2}",
            label=f"EMA m={m}",
        )
    n = min(len(r["error_precise"]) for r in rows)
    axes[2].plot(
        epochs[:n],
        np.mean([_pct(r["error_precise"][:n]) for r in rows], axis=0),
        "s-",
        color="C0",
        label="PreciseBN",
    )
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("test error (%), mean over seeds")
    axes[2].set_title("EMA momentum sweep")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure
