"""``smallbn rethink``: the findings of Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021),
tried again on real data (Fashion-MNIST) with :class:`~smallbn.experiments.models.SmallResNet`.

Four studies, each a set of runs (one per seed and setting) whose rows go to
``<output-dir>/<study>/results.jsonl``, with a Markdown report (``results.md``) and a plot
(``<study>.png``) beside them:

* ``ema`` — **EMA vs PreciseBN** (the paper's "whole population as a batch").  A BN
  network trained with a large SGD batch and a large, constant learning rate (after a
  warm-up), the setting in which the paper finds the EMA of batch statistics unstable.  After
  every epoch the test error is measured with the EMA statistics and with PreciseBN
  (:func:`smallbn.precise_bn`); the EMA is kept for several momenta at once (the EMA does not
  influence training in BN's training mode, so one run carries every momentum's EMA,
  exactly); after training, the error against the number of PreciseBN samples (several
  draws each).
* ``inconsistency`` — **train-test inconsistency at small batch** (the paper's "batch in
  training and testing").  Ghost BN over i.i.d. groups of b samples inside SGD batches of
  32; evaluated with population statistics (PreciseBN), with batch statistics of b
  (:func:`smallbn.batch_stats_eval`, test images in random groups of b) and, in a branch of
  the same run that restarts from the weights at the start of the last epochs, trained with
  FrozenBN for those epochs (:class:`smallbn.FreezeNormsAt`).
* ``domain`` — **domain shift** (the paper's "batch from different domains").  (a) trained
  on Fashion-MNIST, tested on shifted copies (inverted intensities, lower contrast, pixel
  noise) with the training domain's population statistics, with statistics recomputed by
  PreciseBN on unlabelled images of the target domain, and with batch statistics of the
  target batch.  (b) trained on two domains at once (the original images and a shifted copy
  of each, as two FPN levels sharing a head, one :class:`~smallbn.DomainBatchNorm` per
  norm): statistics shared by the domains or specific to each (:func:`smallbn.use_domain`),
  in training and, by PreciseBN, at test: the four combinations of the paper's Table 5;
  each with one affine shared by the domains and with one per domain
  (``per_domain_affine=True``), the paper's other choice.
* ``leakage`` — **information leakage** (the paper's §6, "batch from correlated samples").
  SGD batches of 32 made of simulated devices of 2 samples of one class each (the RoIs of one
  image in a detection head), normalized per device (BN on each device's batch), by Ghost BN
  over :data:`GHOST_DEVICES` devices, by Shuffle BN (each device normalizes a random share of
  the shuffled batch) and by SyncBN (the whole batch).  Trained by the comparison job's
  :func:`compare.run_one`; under ``torchrun`` every process holds half of each batch, and
  Shuffle BN exchanges samples, SyncBN statistics, across the processes.

Every report states what the paper found and whether the numbers of this run reproduce it,
decided from the numbers by the rules in :func:`findings` (with the tolerance
:data:`TOLERANCE`), never written in advance.

Robustness and concurrency are the comparison job's (:mod:`smallbn.experiments.compare`): a
run is claimed (``checkpoints/<tag>.lock``) before it is trained, checkpointed atomically
every ``checkpoint_every`` steps, at the end of every epoch (with what it has measured so far)
and between its stages; a rerun skips finished runs and resumes an interrupted one; damaged
lines of ``results.jsonl`` are set aside; invocations sharing an output folder train each run
once.  Single process, except the leakage study, which also runs under ``torchrun``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from smallbn._io import atomic_write
from smallbn._optional import require, tqdm
from smallbn.experiments import compare
from smallbn.experiments.compare import CheckpointError
from smallbn.experiments.data import Dataset, OptionError, load_dataset
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.sampling import batch_indices, shortfall, steps_per_epoch
from smallbn.experiments.train import evaluate
from smallbn.layers import GhostBatchNorm
from smallbn.layers.domain import use_domain
from smallbn.population import FreezeNormsAt, batch_stats_eval, precise_bn
from smallbn.registry import build_norm

__all__ = [
    "PRESETS",
    "SHIFTS",
    "STUDIES",
    "TOLERANCE",
    "Finding",
    "StudyConfig",
    "findings",
    "format_report",
    "plan",
    "plot_study",
    "read_study",
    "run_studies",
    "shift_images",
]

STUDIES = ("ema", "inconsistency", "domain", "leakage")
#: The leakage study's normalizations of correlated per-device batches
#: (:func:`_leakage_run_config`).
LEAKAGE_VARIANTS = ("per-device", "ghost", "shuffle", "sync")
#: The leakage study's Ghost BN normalizes the samples of this many devices together.
GHOST_DEVICES = 4
#: The domain study's part-b trainings: statistics shared or specific, ``+affine`` with one
#: affine per domain (:func:`_domain_variant`).
_DOMAIN_TRAININGS = ("shared", "specific", "shared+affine", "specific+affine")


def _leakage_norm_batch(variant: str, device_batch: int, sgd_batch: int) -> int:
    """The samples a leakage variant normalizes together: one device's, :data:`GHOST_DEVICES`
    devices', a device's share of the shuffled batch, or the whole SGD batch (SyncBN)."""
    return {
        "per-device": device_batch,
        "ghost": GHOST_DEVICES * device_batch,
        "shuffle": device_batch,
        "sync": sgd_batch,
    }[variant]


def _where(world: int) -> str:
    return "one process" if world == 1 else f"{world} processes (torchrun)"


#: Shifted copies of the test images (domain study): intensities inverted, contrast lowered
#: (u → 0.3 + 0.4 u on the [0, 1] pixel scale), Gaussian pixel noise (σ = 0.25, clipped).
SHIFTS = ("invert", "contrast", "noise")
#: Test-error differences (percentage points) within which two settings count as equal in
#: the verdicts: about twice the standard error of an error near 10% on 10,000 test images.
TOLERANCE = 0.5

_CHECKPOINT_VERSION = 1


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig(compare.RunIdentity):
    """Everything that determines one run of a study (its identity in results.jsonl).

    ``variant``: ``bn`` (ema), ``b<norm_batch>`` (inconsistency), ``shift`` (domain, part a:
    one source-trained network tested on every shift of ``shifts``) or ``shared`` /
    ``specific`` (domain, part b: statistics in training; the second domain is
    ``shifts[0]``)."""

    study: str
    variant: str
    seed: int
    dataset: str = "fashion-mnist"
    epochs: int = 3
    train_samples: int = 8_000
    sgd_batch: int = 32
    norm_batch: int = 32
    lr: float = 0.2
    #: ``cosine``: warm-up then cosine decay (the comparison job's); ``constant``: warm-up then
    #: the peak learning rate to the end.
    schedule: str = "cosine"
    #: Fraction of the steps of linear warm-up.
    warmup: float = 0.02
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    precise_samples: int = 4096
    eval_samples: int = 10_000
    momenta: tuple[float, ...] = ()
    sample_sweep: tuple[int, ...] = ()
    sweep_draws: int = 0
    frozen_epochs: int = 0
    shifts: tuple[str, ...] = ()
    #: The data folder the user passed (absolute); None for the dataset's default data.
    data_root: str | None = None
    #: leakage: the samples of one simulated device, all of one class (the RoIs of one image).
    device_batch: int = 0
    #: leakage: processes (torchrun) that share every SGD batch; 1 in a single process.
    world_size: int = 1
    #: domain, part b: one affine per domain (``DomainBatchNorm(per_domain_affine=True)``).
    domain_affine: bool = False

    KEY_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = (
        "data_root",
        "device_batch",
        "world_size",
        "domain_affine",
    )

    def tag_prefix(self) -> str:
        affine = "-affine" if self.domain_affine else ""
        world = f"-w{self.world_size}" if self.world_size > 1 else ""
        return f"{self.study}-{self.variant}{affine}{world}-s{self.seed}"

    @property
    def part(self) -> str:
        """The domain study's part: ``a`` (one domain, tested on shifts) or ``b`` (two)."""
        return "a" if self.variant == "shift" else "b"

    def check(self) -> None:
        """Raise ValueError, stating the rule, for a run that cannot train as labelled."""
        if self.study not in STUDIES:
            raise ValueError(f"unknown study '{self.study}' (one of {', '.join(STUDIES)})")
        for name in ("epochs", "train_samples", "sgd_batch", "norm_batch", "precise_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be at least 1, got {self.eval_samples}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number above 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule '{self.schedule}' (cosine or constant)")
        if self.sgd_batch % self.norm_batch:
            raise ValueError(
                f"normalization batch b={self.norm_batch} does not divide the SGD batch of "
                f"{self.sgd_batch}: every SGD batch is split into groups of b (pick --batch-sizes "
                f"among the divisors of {self.sgd_batch})"
            )
        if self.norm_batch < 2:
            raise ValueError("a normalization batch needs at least 2 samples (b >= 2)")
        if self.study == "ema":
            if not self.momenta or any(not 0 < m <= 1 for m in self.momenta):
                raise ValueError(f"EMA momenta must lie in (0, 1], got {self.momenta}")
            if 0.1 not in self.momenta:
                raise ValueError("the EMA momenta must include BN's default 0.1")
            if not self.sample_sweep or min(self.sample_sweep) < 1 or self.sweep_draws < 1:
                raise ValueError("the PreciseBN sample sweep needs sizes >= 1 and >= 1 draw")
        if self.study == "inconsistency" and not 1 <= self.frozen_epochs < self.epochs:
            raise ValueError(
                f"FrozenBN trains the last --frozen-epochs of the --epochs: need 1 <= "
                f"frozen_epochs < epochs, got {self.frozen_epochs} of {self.epochs}"
            )
        if self.study == "domain":
            if self.variant not in ("shift", "shared", "specific"):
                raise ValueError(f"unknown domain variant '{self.variant}'")
            if not self.shifts or any(s not in SHIFTS for s in self.shifts):
                raise ValueError(f"shifts must be among {', '.join(SHIFTS)}, got {self.shifts}")
        if self.domain_affine and not (self.study == "domain" and self.part == "b"):
            raise ValueError("a per-domain affine (domain_affine) is a setting of domain part b")
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.world_size > 1 and self.study != "leakage":
            raise ValueError(
                f"the {self.study} study runs in a single process; under torchrun only the "
                f"leakage study runs (--study leakage)"
            )
        if self.study == "leakage":
            self._check_leakage()

    def _check_leakage(self) -> None:
        """The leakage study trains with the comparison job's :func:`compare.run_one`: its
        schedule (cosine after 2% warm-up), and correlated SGD batches of whole devices."""
        if self.variant not in LEAKAGE_VARIANTS:
            raise ValueError(
                f"unknown leakage variant '{self.variant}' (one of {', '.join(LEAKAGE_VARIANTS)})"
            )
        if (self.schedule, self.warmup) != ("cosine", 0.02):
            raise ValueError("the leakage study trains with a cosine schedule after 2% warm-up")
        d = self.device_batch
        if d < 1 or self.sgd_batch % d:
            raise ValueError(
                f"a device's batch ({d} samples) must divide the SGD batch of {self.sgd_batch}"
            )
        expected = _leakage_norm_batch(self.variant, d, self.sgd_batch)
        if self.norm_batch != expected:
            raise ValueError(
                f"leakage variant {self.variant} normalizes {expected} samples, not "
                f"norm_batch={self.norm_batch}"
            )
        if self.variant == "ghost" and not d < expected < self.sgd_batch:
            raise ValueError(
                f"Ghost BN over {GHOST_DEVICES} devices of {d} needs an SGD batch above "
                f"{expected} samples (got {self.sgd_batch})"
            )
        share, rest = divmod(self.sgd_batch, self.world_size)
        if rest or share % d:
            raise ValueError(
                f"the SGD batch of {self.sgd_batch} does not split over {self.world_size} "
                f"processes in whole devices of {d} samples"
            )
        if self.variant != "sync" and share % self.norm_batch:
            raise ValueError(
                f"each of the {self.world_size} processes holds {share} samples of every SGD "
                f"batch, not a whole number of normalization batches of {self.norm_batch}"
            )


#: Preset → settings.  ``seeds``; per study the StudyConfig fields, and ``batch_sizes``
#: (inconsistency: one run per normalization batch) and ``domain_shift`` (domain b's second
#: domain).  Command-line options override them.
PRESETS: dict[str, dict[str, Any]] = {
    # about 20 minutes on 2 free CPU cores (docs/rethink.md)
    "default": {
        "seeds": (0, 1),
        "ema": {
            "epochs": 8,
            "train_samples": 10_000,
            "sgd_batch": 256,
            "norm_batch": 256,
            "lr": 1.6,
            "schedule": "constant",
            "warmup": 0.1,
            "momenta": (0.01, 0.03, 0.1, 0.3),
            "sample_sweep": (32, 128, 512, 1024, 2048, 8192),
            "sweep_draws": 3,
        },
        "inconsistency": {
            # 4, not 3: FrozenBN's last epoch then starts at a learning rate of 0.03; from 0.05
            # (3 epochs) the frozen network diverged (b = 4, seed 0), as BN-free nets do
            "epochs": 4,
            "train_samples": 8_000,
            "batch_sizes": (2, 4, 8, 32),
            "frozen_epochs": 1,
        },
        "domain": {
            "epochs": 3,
            "train_samples": 6_000,
            "shifts": SHIFTS,
            "domain_shift": "invert",
        },
        "leakage": {"epochs": 3, "train_samples": 6_000, "device_batch": 2},
    },
    # the same studies longer: all 60,000 training images, 3 seeds (about 15 hours on 2 CPU
    # cores, estimated: docs/rethink.md)
    "long": {
        "seeds": (0, 1, 2),
        "ema": {
            "epochs": 30,
            "train_samples": 60_000,
            "sgd_batch": 256,
            "norm_batch": 256,
            "lr": 1.6,
            "schedule": "constant",
            "warmup": 0.05,
            "momenta": (0.01, 0.03, 0.1, 0.3),
            "sample_sweep": (32, 128, 512, 2048, 8192, 32768),
            "sweep_draws": 5,
        },
        "inconsistency": {
            "epochs": 12,
            "train_samples": 60_000,
            "batch_sizes": (2, 4, 8, 16, 32),
            "frozen_epochs": 3,
        },
        "domain": {
            "epochs": 10,
            "train_samples": 60_000,
            "shifts": SHIFTS,
            "domain_shift": "invert",
        },
        "leakage": {"epochs": 10, "train_samples": 60_000, "device_batch": 2},
    },
    # seconds: for tests
    "smoke": {
        "seeds": (0,),
        "ema": {
            "epochs": 2,
            "train_samples": 256,
            "sgd_batch": 64,
            "norm_batch": 64,
            "lr": 0.4,
            "schedule": "constant",
            "warmup": 0.1,
            "momenta": (0.1, 0.3),
            "sample_sweep": (16, 64),
            "sweep_draws": 2,
            "precise_samples": 64,
            "eval_samples": 128,
        },
        "inconsistency": {
            "epochs": 2,
            "train_samples": 128,
            "batch_sizes": (2, 32),
            "frozen_epochs": 1,
            "precise_samples": 64,
            "eval_samples": 128,
        },
        "domain": {
            "epochs": 1,
            "train_samples": 128,
            "shifts": ("invert", "contrast"),
            "domain_shift": "invert",
            "precise_samples": 64,
            "eval_samples": 128,
        },
        "leakage": {
            "epochs": 1,
            "train_samples": 256,
            "device_batch": 2,
            "precise_samples": 64,
            "eval_samples": 128,
        },
    },
}


def plan(
    studies: Sequence[str],
    preset: str = "default",
    *,
    seeds: Sequence[int] | None = None,
    world_size: int = 1,
    **overrides: Any,
) -> list[StudyConfig]:
    """The runs of ``studies`` under ``preset``.  ``overrides`` (None: the preset's) apply to
    every study that has the setting: ``epochs``, ``train_samples``, ``precise_samples``,
    ``eval_samples``, ``dataset``; ``ema_batch``, ``ema_lr``, ``momenta``, ``sample_sweep``,
    ``sweep_draws`` (ema); ``batch_sizes``, ``frozen_epochs`` (inconsistency); ``lr``
    (inconsistency, domain and leakage); ``shifts``, ``domain_shift`` (domain);
    ``device_batch`` (leakage).  ``world_size``: the processes under torchrun, where only the
    leakage study runs (every other study is single-process: a ValueError says so)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (one of {', '.join(PRESETS)})")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {
        "epochs",
        "train_samples",
        "precise_samples",
        "eval_samples",
        "dataset",
        "ema_batch",
        "ema_lr",
        "momenta",
        "sample_sweep",
        "sweep_draws",
        "batch_sizes",
        "frozen_epochs",
        "lr",
        "shifts",
        "domain_shift",
        "device_batch",
    }
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    settings = PRESETS[preset]
    seeds = tuple(dict.fromkeys(seeds if seeds is not None else settings["seeds"]))
    configs: dict[str, StudyConfig] = {}
    for study in dict.fromkeys(studies):
        if study not in STUDIES:
            raise ValueError(f"unknown study '{study}' (one of {', '.join(STUDIES)})")
        base = {**settings[study], "world_size": world_size}
        for name in ("epochs", "train_samples", "precise_samples", "eval_samples", "dataset"):
            if name in given:
                base[name] = given[name]
        variants: list[tuple[str, dict[str, Any]]]
        if study == "ema":
            for name, field in (("ema_batch", "sgd_batch"), ("ema_lr", "lr")):
                if name in given:
                    base[field] = given[name]
            base["norm_batch"] = base["sgd_batch"]  # BN over the whole SGD batch
            for name in ("momenta", "sample_sweep", "sweep_draws"):
                if name in given:
                    base[name] = given[name]
            base["momenta"] = tuple(sorted({*base["momenta"], 0.1}))  # BN's own EMA, always
            base["sample_sweep"] = tuple(sorted(set(base["sample_sweep"])))
            variants = [("bn", {})]
        elif study == "inconsistency":
            sizes = tuple(sorted(set(given.get("batch_sizes", base.pop("batch_sizes")))))
            base.pop("batch_sizes", None)
            for name in ("frozen_epochs", "lr"):
                if name in given:
                    base[name] = given[name]
            variants = [(f"b{b}", {"norm_batch": b}) for b in sizes]
        elif study == "leakage":
            for name in ("lr", "device_batch"):
                if name in given:
                    base[name] = given[name]
            sgd_batch = base.get("sgd_batch", StudyConfig.sgd_batch)
            variants = [
                (v, {"norm_batch": _leakage_norm_batch(v, base["device_batch"], sgd_batch)})
                for v in LEAKAGE_VARIANTS
            ]
        else:
            shifts = tuple(dict.fromkeys(given.get("shifts", base.pop("shifts"))))
            base.pop("shifts", None)
            second = given.get("domain_shift", base.pop("domain_shift"))
            base.pop("domain_shift", None)
            if "lr" in given:
                base["lr"] = given["lr"]
            variants = [("shift", {"shifts": shifts})] + [
                (v, {"shifts": (second,), "domain_affine": affine})
                for affine in (False, True)
                for v in ("shared", "specific")
            ]
        for variant, extra in variants:
            for seed in seeds:
                config = StudyConfig(study, variant, seed, **{**base, **extra})
                config.check()
                configs.setdefault(config.key, config)
    return list(configs.values())


# -- data --------------------------------------------------------------------------------------


def _pixel_range(data: Dataset) -> tuple[float, float]:
    """The standardized values of the darkest and brightest pixel of the training images: the
    affine map back to the [0, 1] pixel scale on which the shifts are defined."""
    return float(data.train_x.min()), float(data.train_x.max())


def shift_images(x: Tensor, shift: str, bounds: tuple[float, float], seed: int = 0) -> Tensor:
    """``x`` (standardized images) under ``shift`` (one of :data:`SHIFTS`), standardized as the
    training images were: ``invert`` maps a pixel u on the [0, 1] scale (``bounds``: the
    standardized values of 0 and 1) to 1 − u, ``contrast`` to 0.3 + 0.4 u, ``noise`` adds
    Gaussian noise of σ = 0.25 (drawn from ``seed``, the same for every run) and clips to
    [0, 1]."""
    low, high = bounds
    u = (x - low) / (high - low)
    if shift == "invert":
        u = 1 - u
    elif shift == "contrast":
        u = 0.3 + 0.4 * u
    elif shift == "noise":
        generator = torch.Generator().manual_seed(seed)
        u = (u + 0.25 * torch.randn(u.shape, generator=generator)).clamp(0, 1)
    else:
        raise ValueError(f"unknown shift '{shift}' (one of {', '.join(SHIFTS)})")
    return low + u * (high - low)


@dataclass
class _Data:
    """One run's view of the dataset: its training subset and its test subset."""

    dataset: Dataset
    config: StudyConfig
    train_x: Tensor = dataclasses.field(init=False)
    train_y: Tensor = dataclasses.field(init=False)
    test_x: Tensor = dataclasses.field(init=False)
    test_y: Tensor = dataclasses.field(init=False)
    bounds: tuple[float, float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        n, m = self.config.train_samples, self.config.eval_samples
        self.train_x, self.train_y = self.dataset.train_x[:n], self.dataset.train_y[:n]
        self.test_x, self.test_y = self.dataset.test_x[:m], self.dataset.test_y[:m]
        self.bounds = _pixel_range(self.dataset)

    def unlabelled_target(self, shift: str) -> Tensor:
        """Unlabelled images of the shifted domain for PreciseBN on the target: shifted
        training images that the run did not train on (up to 4 × ``precise_samples`` of them)
        where the dataset has enough (``precise_samples``), else the training images
        themselves."""
        rest = self.dataset.train_x[self.config.train_samples :][: 4 * self.config.precise_samples]
        pool = rest if len(rest) >= self.config.precise_samples else self.dataset.train_x
        return shift_images(pool, shift, self.bounds, seed=2)

    def shifted_test(self, shift: str) -> Tensor:
        return shift_images(self.test_x, shift, self.bounds, seed=1)

    def shifted_train(self, shift: str) -> Tensor:
        return shift_images(self.train_x, shift, self.bounds, seed=3)


def _stream(
    x: Tensor, y: Tensor | None, batch: int, seed: int, device: torch.device
) -> Iterator[Tensor]:
    """Endless i.i.d. batches of ``x`` (on ``device``), in an order drawn from ``seed``."""
    labels = y if y is not None else torch.zeros(len(x), dtype=torch.long)
    for index in batch_indices(labels, min(batch, len(x)), 1, "iid", seed):
        yield x[index].to(device)


# -- models, schedule, evaluation ----------------------------------------------------------------


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def _model(config: StudyConfig, data: Dataset, device: torch.device) -> nn.Module:
    """The study's network: BN over the SGD batch (ema, domain a), Ghost BN over groups of b
    (inconsistency), two-domain domain BN (domain b)."""
    options: dict[str, Any] = {}
    spec = "bn"
    if config.study == "inconsistency" and config.norm_batch < config.sgd_batch:
        spec, options = "ghostbn", {"group_size": config.norm_batch}
    elif config.study == "domain" and config.part == "b":
        spec, options = "domainbn", {"num_domains": 2}
        if config.domain_affine:
            options["per_domain_affine"] = True

    def make(channels: int, **kwargs: Any) -> nn.Module:
        return build_norm(spec, channels, **{**kwargs, **options})

    torch.manual_seed(config.seed)
    model = SmallResNet(
        data.num_classes, data.in_channels, config.widths, config.blocks, norm=make
    ).to(device)
    model.to(memory_format=_memory_format(device))  # type: ignore[call-overload]
    return model


def _optimizer(model: nn.Module, config: StudyConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )


def _lr(config: StudyConfig, step: int, total: int) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay or constant."""
    warmup = max(1, int(config.warmup * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@torch.no_grad()
def _predictions(model: nn.Module, x: Tensor, batch: int, device: torch.device) -> Tensor:
    """Class predictions for ``x`` in batches of ``batch``, in the model's current modes."""
    out = [model(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def _error(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    return evaluate(model, x, y, device=device)


def _error_batch_stats(
    model: nn.Module, x: Tensor, y: Tensor, group: int, seed: int, device: torch.device
) -> float:
    """Test error when every batch-statistics layer normalizes each test image with the
    statistics of its random group of ``group`` test images (Ghost BN's groups of b, or the
    whole batch for BN): :func:`smallbn.batch_stats_eval`.  The images are shuffled (groups
    are i.i.d., as in training) and the last group is completed with images from the start,
    which are scored once only."""
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    padded = torch.cat([order, order[: (-n) % group]]) if n % group else order
    # Ghost BN normalizes groups of b inside any batch; any other layer the whole batch
    ghost = any(isinstance(m, GhostBatchNorm) for m in model.modules())
    batch = group * max(1, 128 // group) if ghost else group
    with batch_stats_eval(model):
        predictions = _predictions(model, x[padded], batch, device)[:n]
    return float((predictions != y[order]).float().mean())


def _precise(
    model: nn.Module,
    batches: Iterable[Any],
    samples: int,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    size: Callable[[Any], int] | None = None,
) -> nn.Module:
    """A copy of ``model`` with PreciseBN statistics (``model`` is left as it is)."""
    clone = copy.deepcopy(model)
    precise_bn(clone, batches, samples, forward=forward, batch_size=size, progress=False)
    return clone


# -- checkpoints --------------------------------------------------------------------------------


class _Checkpoint:
    """A run's checkpoint: its stage, training state and what it has measured so far.  A file
    that does not fit the run raises :class:`CheckpointError` naming it (never discarded)."""

    def __init__(self, path: Path, config: StudyConfig, total: int) -> None:
        self.path, self.config, self.total = path, config, total

    def _unusable(self, reason: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: cannot resume {self.config.tag} from this checkpoint ({reason}); "
            f"delete the file to restart that run from scratch"
        )

    def load(self, stages: Sequence[str]) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            step, stage = state["step"], state["stage"]
            key, total, version = state["key"], state["total"], state["version"]
        except Exception as error:  # any failure to read it: the file is the problem
            raise self._unusable(f"{type(error).__name__}: {error}") from error
        if version != _CHECKPOINT_VERSION:
            raise self._unusable(f"it is of checkpoint version {version!r}")
        if key != self.config.key:
            raise self._unusable(
                f"it was written for another run: {compare._differences(self.config.key, key)}"
            )
        if total != self.total:
            raise self._unusable(
                f"it was written for a run of {total} steps and this run has {self.total}: "
                f"the training data or the code changed since"
            )
        if stage not in stages:
            raise self._unusable(f"unknown stage {stage!r}")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.total:
            raise self._unusable(f"it is at step {step!r}, outside this run's {self.total} steps")
        return state  # type: ignore[no-any-return]

    def save(self, state: dict[str, Any]) -> None:
        state = {
            **state,
            "key": self.config.key,
            "total": self.total,
            "version": _CHECKPOINT_VERSION,
        }
        atomic_write(self.path, lambda handle: torch.save(state, handle))

    def restore(
        self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        except Exception as error:
            raise self._unusable(f"{type(error).__name__}: {error}") from error


@dataclass
class _Clock:
    """Wall and CPU seconds of a run's training, summed over resumes."""

    wall: float = 0.0
    cpu: float = 0.0

    def __post_init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        now, cpu = time.perf_counter(), time.process_time()
        self.wall += now - self._wall
        self.cpu += cpu - self._cpu
        self._wall, self._cpu = now, cpu
        return self.wall, self.cpu


@dataclass
class _Run:
    """What every study's run shares: config, data, device, checkpoint, progress."""

    config: StudyConfig
    data: _Data
    device: torch.device
    checkpoint: _Checkpoint
    checkpoint_every: int
    progress: bool

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        start: int,
        end: int,
        per_epoch: int,
        loss: Callable[[nn.Module, Tensor], Tensor],
        state: Callable[[], dict[str, Any]],
        clock: _Clock,
        on_epoch: Callable[[int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """SGD steps ``start`` … ``end − 1`` of the run's ``checkpoint.total`` on i.i.d.
        batches of ``sgd_batch`` training samples (the order a pure function of the seed and
        the step, so a resumed run sees the batches it would have seen).  ``loss(model,
        index)`` computes a batch's loss; ``on_epoch(step)`` runs at the end of every epoch
        and ``on_step(step)`` after every step, both before the checkpoint of that step;
        ``state()`` is what the run has to keep beside the weights (its stage, what it has
        measured), taken at every checkpoint."""
        config, total = self.config, self.checkpoint.total
        stream = batch_indices(self.data.train_y, config.sgd_batch, 1, "iid", config.seed, start)
        bar = tqdm(
            total=end,
            initial=start,
            desc=self.config.tag.rsplit("-", 1)[0],
            leave=False,
            disable=not self.progress,
        )
        model.train()
        for step in range(start, end):
            index = next(stream)
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step, total)
            value = loss(model, index)
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"{config.tag}: training diverged at step {step} (loss {float(value)}); "
                    f"lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            bar.update(1)
            done = step + 1
            if on_step is not None:
                on_step(done)
            epoch_end = done % per_epoch == 0
            if epoch_end and on_epoch is not None:
                on_epoch(done)
            if epoch_end or done % self.checkpoint_every == 0 or done == end:
                wall, cpu = clock.lap()
                self.checkpoint.save(
                    {
                        **state(),
                        "step": done,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(),
                        "wall": wall,
                        "cpu": cpu,
                    }
                )
        bar.close()


def _cross_entropy(
    x: Tensor, y: Tensor, device: torch.device
) -> Callable[[nn.Module, Tensor], Tensor]:
    def loss(model: nn.Module, index: Tensor) -> Tensor:
        return F.cross_entropy(model(x[index].to(device)), y[index].to(device))

    return loss


def _total(config: StudyConfig, data: _Data) -> tuple[int, int]:
    """(steps per epoch, steps) of a run."""
    per_epoch = steps_per_epoch(data.train_y, config.sgd_batch, 1, "iid")
    return per_epoch, per_epoch * config.epochs


def _row(
    config: StudyConfig, run: _Run, clock: _Clock, steps: int, **measured: Any
) -> dict[str, Any]:
    return {
        **config.identity(),
        "key": config.key,
        "train_samples_used": len(run.data.train_y),
        "steps": steps,
        "train_seconds": clock.wall,
        "train_cpu_seconds": clock.cpu,
        "device": str(run.device),
        "torch": torch.__version__,
        **measured,
    }


# -- study 1: EMA vs PreciseBN ------------------------------------------------------------------


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
    config, data, device = run.config, run.data, run.device
    per_epoch, total = _total(config, data)
    model = _model(config, data.dataset, device)
    optimizer = _optimizer(model, config)
    shadows = _EmaShadows(model, config.momenta)
    own = 0.1  # torch BN's momentum: the model's own running statistics
    history: list[dict[str, Any]] = []
    clock, start = _Clock(), 0
    state = run.checkpoint.load(("train",))
    if state is not None:
        run.checkpoint.restore(state, model, optimizer)
        shadows.load(state["shadows"])
        history = list(state["history"])
        clock, start = _Clock(state["wall"], state["cpu"]), state["step"]
        _say_resuming(run, start, total)
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
        end=total,
        per_epoch=per_epoch,
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


# -- study 2: train-test inconsistency -----------------------------------------------------------


def _run_inconsistency(run: _Run) -> dict[str, Any]:
    """Stage ``main`` trains all epochs (keeping the weights at the start of the FrozenBN
    epochs) and measures EMA, PreciseBN and batch statistics; stage ``frozen`` restarts from
    the kept weights, takes PreciseBN statistics and trains the last epochs with FrozenBN
    (:class:`smallbn.FreezeNormsAt`) on the same batches."""
    config, data, device = run.config, run.data, run.device
    per_epoch, total = _total(config, data)
    frozen_from = config.epochs - config.frozen_epochs
    freeze_step = per_epoch * frozen_from
    model = _model(config, data.dataset, device)
    optimizer = _optimizer(model, config)
    clock, start = _Clock(), 0
    record: dict[str, Any] = {"stage": "main", "branch": None, "main": None, "frozen": False}
    state = run.checkpoint.load(("main", "frozen"))
    if state is not None:
        if state["frozen"]:  # the checkpoint holds the FrozenBN model
            model = _freeze(model)
        run.checkpoint.restore(state, model, optimizer)
        record = {k: state[k] for k in ("stage", "branch", "main", "frozen")}
        clock, start = _Clock(state["wall"], state["cpu"]), state["step"]
        _say_resuming(run, start, total, record["stage"])
    loss = _cross_entropy(data.train_x, data.train_y, device)
    group = config.norm_batch

    def precise_stream(seed: int) -> Iterator[Tensor]:
        return _stream(data.train_x, data.train_y, config.sgd_batch, seed, device)

    if record["stage"] == "main":

        def keep_branch(step: int) -> None:
            if step == freeze_step:
                record["branch"] = {
                    "model": copy.deepcopy(model.state_dict()),
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                }

        run.train(
            model,
            optimizer,
            start=start,
            end=total,
            per_epoch=per_epoch,
            loss=loss,
            state=lambda: record,
            clock=clock,
            on_step=keep_branch,
        )
        precise = _precise(model, precise_stream(config.seed + 7), config.precise_samples)
        record["main"] = {
            "error_ema": _error(model, data.test_x, data.test_y, device),
            "error_precise": _error(precise, data.test_x, data.test_y, device),
            "error_batch_stats": _error_batch_stats(
                model, data.test_x, data.test_y, group, config.seed, device
            ),
        }
        # stage frozen: back to the weights at the start of the FrozenBN epochs
        branch = record["branch"]
        model.load_state_dict(branch["model"])
        optimizer.load_state_dict(branch["optimizer"])
        record.update(stage="frozen", branch=None)
        start = freeze_step
        wall, cpu = clock.lap()
        run.checkpoint.save(
            {
                **record,
                "step": start,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "wall": wall,
                "cpu": cpu,
            }
        )
    if not record["frozen"]:
        freeze = FreezeNormsAt(
            frozen_from,
            precise_data=lambda: precise_stream(config.seed + 11),
            num_samples=config.precise_samples,
            progress=False,
        )
        model = freeze(model, frozen_from)
        record["frozen"] = True
    run.train(
        model,
        optimizer,
        start=start,
        end=total,
        per_epoch=per_epoch,
        loss=loss,
        state=lambda: record,
        clock=clock,
    )
    clock.lap()
    error_frozen = _error(model, data.test_x, data.test_y, device)
    return _row(config, run, clock, total, **record["main"], error_frozen=error_frozen)


def _freeze(model: nn.Module) -> nn.Module:
    from smallbn.convert import freeze_norms

    return freeze_norms(model)


# -- study 3: domain shift -----------------------------------------------------------------------


def _run_domain_shift(run: _Run) -> dict[str, Any]:
    """Part a: train on the original images; test on each shift with the training domain's
    population statistics, with statistics recomputed on unlabelled target images, and with
    the target batch's own statistics."""
    config, data, device = run.config, run.data, run.device
    per_epoch, total = _total(config, data)
    model = _model(config, data.dataset, device)
    optimizer = _optimizer(model, config)
    clock, start = _Clock(), 0
    state = run.checkpoint.load(("train",))
    if state is not None:
        run.checkpoint.restore(state, model, optimizer)
        clock, start = _Clock(state["wall"], state["cpu"]), state["step"]
        _say_resuming(run, start, total)
    run.train(
        model,
        optimizer,
        start=start,
        end=total,
        per_epoch=per_epoch,
        loss=_cross_entropy(data.train_x, data.train_y, device),
        state=lambda: {"stage": "train"},
        clock=clock,
    )
    clock.lap()
    samples = config.precise_samples
    source = _precise(
        model,
        _stream(data.train_x, data.train_y, config.sgd_batch, config.seed + 7, device),
        samples,
    )
    errors = {"original/source": _error(source, data.test_x, data.test_y, device)}
    for shift in config.shifts:
        test_x = data.shifted_test(shift)
        target = _precise(
            model,
            _stream(
                data.unlabelled_target(shift), None, config.sgd_batch, config.seed + 13, device
            ),
            samples,
        )
        errors[f"{shift}/source"] = _error(source, test_x, data.test_y, device)
        errors[f"{shift}/target"] = _error(target, test_x, data.test_y, device)
        errors[f"{shift}/batch_stats"] = _error_batch_stats(
            source, test_x, data.test_y, config.sgd_batch, config.seed, device
        )
    return _row(config, run, clock, total, errors=errors)


def _run_two_domains(run: _Run) -> dict[str, Any]:
    """Part b: every step trains on a batch of original images and the same images shifted,
    as two FPN levels through one head: one forward over both with the statistics of both
    (``shared``), or one forward per domain with its own statistics (``specific``).  At test,
    PreciseBN statistics shared by the domains (one population of both) or per domain."""
    config, data, device = run.config, run.data, run.device
    shift = config.shifts[0]
    per_epoch, total = _total(config, data)
    model = _model(config, data.dataset, device)
    optimizer = _optimizer(model, config)
    clock, start = _Clock(), 0
    state = run.checkpoint.load(("train",))
    if state is not None:
        run.checkpoint.restore(state, model, optimizer)
        clock, start = _Clock(state["wall"], state["cpu"]), state["step"]
        _say_resuming(run, start, total)
    shifted = data.shifted_train(shift)
    x, y = data.train_x, data.train_y

    def shared(model: nn.Module, pair: tuple[Tensor, Tensor]) -> Tensor:
        with use_domain(model, 0):
            return model(torch.cat(pair))  # type: ignore[no-any-return]

    def specific(model: nn.Module, pair: tuple[Tensor, Tensor]) -> Tensor:
        outputs = []
        for domain, images in enumerate(pair):
            with use_domain(model, domain):
                outputs.append(model(images))
        return torch.cat(outputs)

    forward = shared if config.variant == "shared" else specific

    def loss(model: nn.Module, index: Tensor) -> Tensor:
        pair = (x[index].to(device), shifted[index].to(device))
        labels = y[index].to(device)
        return F.cross_entropy(forward(model, pair), torch.cat([labels, labels]))

    run.train(
        model,
        optimizer,
        start=start,
        end=total,
        per_epoch=per_epoch,
        loss=loss,
        state=lambda: {"stage": "train"},
        clock=clock,
    )
    clock.lap()

    def pairs(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        for index in batch_indices(y, config.sgd_batch, 1, "iid", seed):
            yield x[index].to(device), shifted[index].to(device)

    tests = {"original": data.test_x, "shifted": data.shifted_test(shift)}
    errors = {}
    for population, pass_forward in (("shared", shared), ("specific", specific)):
        precise = _precise(
            model,
            pairs(config.seed + 7),
            config.precise_samples,
            forward=pass_forward,
            size=lambda pair: 2 * len(pair[0]),
        )
        for domain, (name, test_x) in enumerate(tests.items()):
            with use_domain(precise, 0 if population == "shared" else domain):
                errors[f"{population}/{name}"] = _error(precise, test_x, data.test_y, device)
    return _row(config, run, clock, total, errors=errors)


# -- study 4: information leakage ----------------------------------------------------------------


def _leakage_run_config(config: StudyConfig) -> compare.RunConfig:
    """The comparison job's run that trains a leakage variant: SGD batches of ``sgd_batch``
    made of whole simulated devices of ``device_batch`` samples of one class each
    (``correlated`` batches with ``class_group = device_batch``), normalized

    * ``per-device``: over each device's own samples (Ghost BN, groups of ``device_batch``);
    * ``ghost``: over :data:`GHOST_DEVICES` devices together (Ghost BN, larger groups);
    * ``shuffle``: over groups of ``device_batch`` drawn from the shuffled batch (Shuffle BN:
      under torchrun the samples cross processes before they are grouped);
    * ``sync``: over the whole SGD batch (one process: BN; under torchrun: SyncBN across the
      processes).

    Under torchrun every process holds ``sgd_batch / world_size`` samples, whole devices."""
    method = "shufflebn" if config.variant == "shuffle" else "bn"
    return compare.RunConfig(
        method,
        config.norm_batch,
        "correlated",
        config.seed,
        dataset=config.dataset,
        sgd_batch=config.sgd_batch,
        epochs=float(config.epochs),
        train_samples=config.train_samples,
        lr=config.lr,
        widths=config.widths,
        blocks=config.blocks,
        precise_samples=config.precise_samples,
        class_group=config.device_batch,
        sync=config.variant == "sync" and config.world_size > 1,
        world_size=config.world_size,
        data_root=config.data_root,
    )


def _run_leakage(
    config: StudyConfig,
    dataset: Dataset,
    checkpoint: Path,
    device: torch.device,
    checkpoint_every: int,
    progress: bool,
) -> dict[str, Any]:
    """One leakage run: trained, checkpointed and measured by the comparison job's
    :func:`compare.run_one` (EMA and PreciseBN statistics, PreciseBN on batches composed and
    normalized as in training), on the first ``eval_samples`` test images."""
    run_config = _leakage_run_config(config)
    m = config.eval_samples
    view = dataclasses.replace(dataset, test_x=dataset.test_x[:m], test_y=dataset.test_y[:m])
    clock = _Clock()
    row = compare.run_one(
        run_config,
        view,
        checkpoint,
        device=device,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )
    _, cpu = clock.lap()
    measured = ("train_samples_used", "steps", "error_ema", "error_precise", "train_seconds")
    return {
        **config.identity(),
        "key": config.key,
        "world_size": config.world_size,
        **{name: row[name] for name in measured},
        "cpu_seconds": cpu,  # of this process: training and the evaluations
        "method": run_config.method,
        "sync": run_config.sync,
        "device": str(device),
        "torch": torch.__version__,
    }


# -- running -------------------------------------------------------------------------------------

_COMMON_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "study": (str,),
    "variant": (str,),
    "seed": (int,),
}
#: What a row of each study's results.jsonl needs (with the types), as the comparison job's
#: ``_ROW_FIELDS``: a line without them is set aside as damaged.
ROW_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ema": {
        **_COMMON_FIELDS,
        "error_ema": (list,),
        "error_precise": (list,),
        "error_momentum": (dict,),
        "precise_sample_sweep": (dict,),
    },
    "inconsistency": {
        **_COMMON_FIELDS,
        "norm_batch": (int,),
        "error_ema": (int, float),
        "error_precise": (int, float),
        "error_batch_stats": (int, float),
        "error_frozen": (int, float),
    },
    "domain": {**_COMMON_FIELDS, "errors": (dict,)},
    "leakage": {
        **_COMMON_FIELDS,
        "norm_batch": (int,),
        "world_size": (int,),
        "error_ema": (int, float),
        "error_precise": (int, float),
    },
}


def _say_resuming(run: _Run, step: int, total: int, stage: str | None = None) -> None:
    where = f" (stage {stage})" if stage else ""
    print(
        f"resuming {run.config.tag} from its checkpoint at step {step} of {total}{where}",
        file=sys.stderr,
        flush=True,
    )


def run_one(
    config: StudyConfig,
    dataset: Dataset,
    checkpoint: Path,
    *,
    device: torch.device | str = "cpu",
    checkpoint_every: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and measure one run, resuming from ``checkpoint`` if it exists; its row."""
    config.check()
    if config.study == "leakage":
        return _run_leakage(
            config, dataset, checkpoint, torch.device(device), checkpoint_every, progress
        )
    data = _Data(dataset, config)
    per_epoch, total = _total(config, data)
    if per_epoch < 1:
        raise OptionError(
            "--train-samples",
            f"the {len(data.train_y)} training samples of {config.tag} make no SGD batch of "
            f"{config.sgd_batch}",
        )
    run = _Run(
        config,
        data,
        torch.device(device),
        _Checkpoint(checkpoint, config, total),
        checkpoint_every,
        progress,
    )
    if config.study == "ema":
        return _run_ema(run)
    if config.study == "inconsistency":
        return _run_inconsistency(run)
    return _run_domain_shift(run) if config.part == "a" else _run_two_domains(run)


def _study_dir(output_dir: Path, study: str) -> Path:
    return output_dir / study


def _worker(config: StudyConfig, output_dir: Path, checkpoint_every: int, wait: bool) -> bool:
    """One run in a worker process of a parallel invocation (one thread), claimed, trained
    and recorded by the worker (the comparison job's :func:`~compare._attempt`)."""
    torch.set_num_threads(1)
    return _attempt(config, output_dir, torch.device("cpu"), checkpoint_every, False, wait)


def _attempt(
    config: StudyConfig,
    output_dir: Path,
    device: torch.device,
    checkpoint_every: int,
    progress: bool,
    wait: bool,
) -> bool:
    folder = _study_dir(output_dir, config.study)

    def train() -> dict[str, Any]:
        dataset = compare._worker_dataset(config.dataset, config.data_root)
        return run_one(
            config,
            dataset,
            compare._checkpoint_path(folder, config),  # type: ignore[arg-type]
            device=device,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )

    return compare._attempt(
        config,  # type: ignore[arg-type]
        folder,
        train,
        wait=wait,
        device=device,
        fields=ROW_FIELDS[config.study],
    )


def _cost(config: StudyConfig) -> float:
    """A rough relative cost, to start the longest runs first (two workers finish together)."""
    images = config.epochs * config.train_samples
    if config.study == "inconsistency":
        images *= (1 + config.frozen_epochs / config.epochs) * (1 + 4 / config.norm_batch)
    if config.study == "domain" and config.part == "b":
        images *= 2
    if config.study == "ema":
        images += config.epochs * config.eval_samples * (len(config.momenta) + 1)
    if config.study == "leakage":  # compare.run_one's small batches: slower per image
        images *= 1.5 if config.variant == "shuffle" else 1.2
    return float(images)


def read_study(output_dir: Path, study: str) -> list[dict[str, Any]]:
    """The rows of ``study`` in ``output_dir/<study>/results.jsonl`` (damaged lines warned
    about and skipped, as the comparison job does)."""
    return compare.read_results(_study_dir(output_dir, study) / "results.jsonl", ROW_FIELDS[study])


def run_studies(
    configs: Sequence[StudyConfig],
    output_dir: Path,
    *,
    device: torch.device | str = "cpu",
    dataset_root: str | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Run every config not yet recorded, then write each study's report and plot; returns
    the rows of ``configs`` by study (including those other invocations trained).

    ``jobs > 1`` runs that many at once in worker processes of one thread each (CPU, single
    process).  Under torchrun (the leakage study only: :meth:`StudyConfig.check`) every
    process trains every run together, rank 0 deciding which to train and writing the rows
    and reports, as the comparison job does."""
    device = torch.device(device)
    rank, world = compare._rank()
    configs = compare.bind_data(configs, dataset_root)  # type: ignore[arg-type,assignment]
    unique: dict[str, StudyConfig] = {}
    for config in configs:
        config.check()
        if config.world_size != world:
            raise ValueError(
                f"run {config.tag} is planned for {config.world_size} process(es), and "
                f"{world} are running: plan(..., world_size={world})"
            )
        unique.setdefault(config.key, config)
    studies = list(dict.fromkeys(c.study for c in unique.values()))
    if rank == 0:
        for study in studies:
            path = _study_dir(output_dir, study) / "results.jsonl"
            compare._set_aside_damaged(path, ROW_FIELDS[study])
    if world == 1:
        done = {row["key"] for study in studies for row in read_study(output_dir, study)}
    else:  # rank 0 decides for every run: the ranks may read a file as another writes it
        done = set()
    todo = sorted((c for c in unique.values() if c.key not in done), key=_cost, reverse=True)
    if jobs > 1 and world == 1 and device.type == "cpu" and len(todo) > 1:
        compare._run_parallel(
            todo,  # type: ignore[arg-type]
            output_dir,
            jobs,
            checkpoint_every,
            progress,
            worker=_worker,  # type: ignore[arg-type]
        )
    else:
        deferred = []
        for config in tqdm(todo, desc="runs", disable=not progress or rank != 0):
            if not _attempt(config, output_dir, device, checkpoint_every, progress, False):
                deferred.append(config)
            if world > 1:
                dist.barrier()
        for config in deferred:
            if rank == 0:
                compare._notice_waiting(config)  # type: ignore[arg-type]
            _attempt(config, output_dir, device, checkpoint_every, progress, True)
            if world > 1:
                dist.barrier()
    keys = set(unique)
    results: dict[str, list[dict[str, Any]]] = {}
    for study in studies:
        rows = [row for row in read_study(output_dir, study) if row["key"] in keys]
        results[study] = rows
        if rows and rank == 0:
            write_report(study, rows, _study_dir(output_dir, study))
    return results


def write_report(study: str, rows: Sequence[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    """``results.md`` and ``<study>.png`` of ``rows`` in ``folder``."""
    text = format_report(study, rows)
    report = atomic_write(folder / "results.md", lambda handle: handle.write(f"{text}\n".encode()))
    return report, plot_study(study, rows, folder / f"{study}.png")


# -- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One finding of the paper and what this run measured: ``reproduced`` is computed from
    the numbers (None: the rows cannot decide it, e.g. a setting that was not run).  A claim
    that one setting beats another is reproduced only when the difference exceeds
    :data:`TOLERANCE`; ``tie`` marks a difference within it (not reproduced: no effect)."""

    paper: str
    measured: str
    reproduced: bool | None
    tie: bool = False


def _beats(lower: float, higher: float) -> dict[str, bool]:
    """``reproduced``/``tie`` of the claim "``lower`` is below ``higher``" (percentage points):
    reproduced when by more than :data:`TOLERANCE`, a tie when within it."""
    return {"reproduced": lower < higher - TOLERANCE, "tie": abs(lower - higher) <= TOLERANCE}


def _pct(values: Iterable[float]) -> list[float]:
    return [100 * v for v in values]


def _last(values: Sequence[float], epochs: int | None = None) -> list[float]:
    """The last half of the epochs (at least 2), where the spread is measured."""
    count = max(2, len(values) // 2) if epochs is None else epochs
    return list(values[-count:])


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


def _by_batch(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, tuple[float, float]]]:
    """norm batch → method → (mean, std) of the error (%) over seeds."""
    cells: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        cell = cells.setdefault(row["norm_batch"], {})
        for method in ("ema", "precise", "batch_stats", "frozen"):
            cell.setdefault(method, []).append(100 * row[f"error_{method}"])
    return {
        b: {m: (float(np.mean(v)), float(np.std(v))) for m, v in cell.items()}
        for b, cell in sorted(cells.items())
    }


def _inconsistency_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    cells = _by_batch(rows)
    if not cells:
        return []
    small, large = min(cells), max(cells)
    s = {m: v[0] for m, v in cells[small].items()}
    found = [
        Finding(
            "Mini-batch statistics at inference: at a small normalization batch, evaluating "
            "with mini-batch statistics (of the same size) beats population statistics "
            f"(b = {small} here)",
            f"b = {small}: batch statistics {s['batch_stats']:.2f}%, population "
            f"(PreciseBN) {s['precise']:.2f}%",
            **_beats(s["batch_stats"], s["precise"]),
        ),
        Finding(
            f"FrozenBN: training the last epochs with FrozenBN (population statistics) "
            f"beats population statistics after BN training at a small batch (b = {small})",
            f"b = {small}: FrozenBN {s['frozen']:.2f}%, population {s['precise']:.2f}%",
            **_beats(s["frozen"], s["precise"]),
        ),
    ]
    if large > small:
        g = {m: v[0] for m, v in cells[large].items()}
        reference = g["precise"]
        found.append(
            Finding(
                "Train-test inconsistency: both remedies narrow the gap to the large-batch "
                f"error at small b (gap to b = {large} with population statistics, "
                f"b = {small})",
                f"gap: population {s['precise'] - reference:+.2f}, batch statistics "
                f"{s['batch_stats'] - reference:+.2f}, FrozenBN {s['frozen'] - reference:+.2f} "
                f"points",
                _beats(s["batch_stats"], s["precise"])["reproduced"]
                and _beats(s["frozen"], s["precise"])["reproduced"],
            )
        )
        found.append(
            Finding(
                "Mini-batch statistics at inference: at a large normalization batch, "
                "population statistics are as good as mini-batch statistics or better "
                f"(b = {large}, within {TOLERANCE} points)",
                f"b = {large}: population {g['precise']:.2f}%, batch statistics "
                f"{g['batch_stats']:.2f}%",
                g["precise"] <= g["batch_stats"] + TOLERANCE,
            )
        )
    return found


def _domain_cells(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float]]:
    """(variant, error name) → (mean, std) of the error (%) over seeds."""
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        for name, value in row["errors"].items():
            cells.setdefault((_domain_variant(row), name), []).append(100 * value)
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in cells.items()}


def _domain_variant(row: dict[str, Any]) -> str:
    """A domain row's training statistics, ``+affine`` with one affine per domain (rows
    recorded before that setting existed have none: a shared affine)."""
    return row["variant"] + ("+affine" if row.get("domain_affine", False) else "")


def _domain_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    cells = _domain_cells(rows)
    found = []
    shifts = [s for s in SHIFTS if ("shift", f"{s}/target") in cells]
    for shift in shifts:
        source, target = (
            cells[("shift", f"{shift}/source")][0],
            cells[("shift", f"{shift}/target")][0],
        )
        found.append(
            Finding(
                f"Domain shift: under a domain shift, population statistics recomputed on "
                f"the target domain beat those of the training domain ({shift})",
                f"{shift}: target statistics {target:.2f}%, training-domain statistics "
                f"{source:.2f}%",
                **_beats(target, source),
            )
        )

    def mean_error(train: str, population: str) -> float | None:
        values = [cells.get((train, f"{population}/{d}")) for d in ("original", "shifted")]
        if any(v is None for v in values):
            return None
        return float(np.mean([v[0] for v in values if v is not None]))

    grid = {
        (t, p): mean_error(t, p) for t in ("shared", "specific") for p in ("shared", "specific")
    }
    for train in ("shared", "specific"):
        other = "specific" if train == "shared" else "shared"
        same, cross = grid[(train, train)], grid[(train, other)]
        if same is None or cross is None:
            continue
        found.append(
            Finding(
                f"RetinaNet head, Table 5: with {train} statistics in training, {train} "
                f"population statistics at test beat {other} ones (training and test should "
                f"agree)",
                f"train {train}: test {train} {same:.2f}%, test {other} {cross:.2f}% (mean of "
                f"the two domains)",
                **_beats(same, cross),
            )
        )
    affine_differences = []
    for train in ("shared", "specific"):
        shared_affine, own_affine = grid[(train, train)], mean_error(f"{train}+affine", train)
        if shared_affine is not None and own_affine is not None:
            affine_differences.append((train, own_affine, shared_affine))
    if affine_differences:
        found.append(
            Finding(
                "Table 5: whether the domains share the affine layer matters little (training "
                "and test statistics agreeing; a tie within the tolerance counts as reproduced)",
                "; ".join(
                    f"{train} statistics: per-domain affine {own:.2f}%, shared {shared:.2f}%"
                    for train, own, shared in affine_differences
                ),
                reproduced=all(abs(o - sh) <= TOLERANCE for _, o, sh in affine_differences),
            )
        )
    if all(v is not None for v in grid.values()):
        values = {k: v for k, v in grid.items() if v is not None}
        ours = values[("specific", "specific")]
        others = {k: v for k, v in values.items() if k != ("specific", "specific")}
        runner_up = min(others, key=lambda k: others[k])
        found.append(
            Finding(
                "RetinaNet head, Table 5: domain-specific statistics in training and at test "
                "are the best of the four",
                f"train specific, test specific {ours:.2f}%; best of the others: train "
                f"{runner_up[0]}, test {runner_up[1]} {others[runner_up]:.2f}%",
                **_beats(ours, others[runner_up]),
            )
        )
    return found


#: How each leakage variant reads in the reports.
_LEAKAGE_LABELS = {
    "per-device": "per-device BN",
    "ghost": f"Ghost BN over {GHOST_DEVICES} devices",
    "shuffle": "Shuffle BN",
    "sync": "SyncBN (all devices)",
}


def _leakage_cells(
    rows: Sequence[dict[str, Any]],
) -> dict[int, dict[str, dict[str, tuple[float, float, int]]]]:
    """world size → variant → ``precise``/``ema`` → (mean, std, seeds) of the error (%)."""
    values: dict[int, dict[str, dict[str, list[float]]]] = {}
    for row in rows:
        cell = values.setdefault(row["world_size"], {}).setdefault(row["variant"], {})
        for name in ("precise", "ema"):
            cell.setdefault(name, []).append(100 * row[f"error_{name}"])
    return {
        world: {
            variant: {
                name: (float(np.mean(v)), float(np.std(v)), len(v)) for name, v in cell.items()
            }
            for variant, cell in sorted(
                variants.items(), key=lambda item: LEAKAGE_VARIANTS.index(item[0])
            )
        }
        for world, variants in sorted(values.items())
    }


def _leakage_findings(rows: Sequence[dict[str, Any]]) -> list[Finding]:
    found = []
    for world, cells in _leakage_cells(rows).items():
        where = _where(world)
        if "per-device" not in cells:
            continue
        leaky = cells["per-device"]["precise"][0]
        for variant in ("sync", "shuffle"):
            if variant not in cells:
                continue
            error = cells[variant]["precise"][0]
            found.append(
                Finding(
                    f"Mask R-CNN head, §6: {_LEAKAGE_LABELS[variant]} alleviates the leakage "
                    f"of per-device BN on correlated per-device batches ({where})",
                    f"{_LEAKAGE_LABELS[variant]} {error:.2f}%, per-device BN {leaky:.2f}%",
                    **_beats(error, leaky),
                )
            )
        if "sync" in cells and "shuffle" in cells:
            sync, shuffle = cells["sync"]["precise"][0], cells["shuffle"]["precise"][0]
            gap = leaky - sync
            recovered = f"; {100 * (leaky - shuffle) / gap:.0f}% of the gap" if gap > 0 else ""
            found.append(
                Finding(
                    f"§6: shuffling alleviates leakage as much as SyncBN does ({where}; a tie "
                    f"within the tolerance counts as reproduced)",
                    f"Shuffle BN {shuffle:.2f}%, SyncBN {sync:.2f}%{recovered}",
                    reproduced=shuffle <= sync + TOLERANCE,
                )
            )
    return found


def findings(study: str, rows: Sequence[dict[str, Any]]) -> list[Finding]:
    """What the paper found in ``study`` and whether ``rows`` reproduce it, each decided from
    the numbers (means over seeds): "A beats B" when A is better by more than
    :data:`TOLERANCE` points (a smaller difference is a tie, not an effect); "enough" and "as
    good as" claims hold within the tolerance."""
    if study == "ema":
        return _ema_findings(rows)
    if study == "inconsistency":
        return _inconsistency_findings(rows)
    if study == "domain":
        return _domain_findings(rows)
    if study == "leakage":
        return _leakage_findings(rows)
    raise ValueError(f"unknown study '{study}' (one of {', '.join(STUDIES)})")


# -- reports -------------------------------------------------------------------------------------


def _verdict(finding: Finding) -> str:
    if finding.reproduced is None:
        return "–"
    if finding.reproduced:
        return "yes"
    return f"**no** (a tie, within {TOLERANCE} points)" if finding.tie else "**no**"


def _findings_table(study: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| the paper found | this run | reproduced |", "|---|---|---|"]
    for f in findings(study, rows):
        out.append(f"| {f.paper} | {f.measured} | {_verdict(f)} |")
    return out


def _settings(rows: Sequence[dict[str, Any]]) -> str:
    row = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    return (
        f"{row['dataset']}, {row['train_samples_used']} training images, {row['epochs']} "
        f"epochs, SGD batch {row['sgd_batch']}, peak learning rate {row['lr']} "
        f"({row['schedule']} after {row['warmup']:.0%} warm-up), SmallResNet "
        f"{'/'.join(map(str, row['widths']))}, PreciseBN over {row['precise_samples']} "
        f"samples, test error on {row['eval_samples']} test images, seeds "
        f"{', '.join(map(str, seeds))}"
    )


def _cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def format_report(study: str, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: the settings, the numbers, and the paper's findings with the verdicts."""
    if not rows:
        return f"**{study}**: no results"
    seeds = len({r["seed"] for r in rows})
    out = []
    if study == "ema":
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
    elif study == "inconsistency":
        out.append(
            f"**Train-test inconsistency** — {_settings(rows)}; i.i.d. groups of b inside each "
            f"SGD batch (Ghost BN; BN at b = {rows[0]['sgd_batch']}), FrozenBN for the last "
            f"{rows[0]['frozen_epochs']} epoch(s)"
        )
        out.append("")
        out.append(f"test error (%), mean ± std over {seeds} seed(s):")
        out.append("")
        cells = _by_batch(rows)
        names = {
            "precise": "population (PreciseBN)",
            "batch_stats": "batch statistics of b",
            "frozen": "FrozenBN last epochs",
            "ema": "population (EMA)",
        }
        out.append("| evaluation | " + " | ".join(f"b={b}" for b in cells) + " |")
        out.append("|---|" + "---|" * len(cells))
        for method, label in names.items():
            out.append(
                f"| {label} | " + " | ".join(_cell(*cells[b][method], seeds) for b in cells) + " |"
            )
    elif study == "leakage":
        row = rows[0]
        out.append(
            f"**Information leakage** — {_settings(rows)}; correlated batches: each SGD batch "
            f"is {row['sgd_batch'] // row['device_batch']} simulated devices of "
            f"{row['device_batch']} samples of one class (the RoIs of one image)"
        )
        for world, cells in _leakage_cells(rows).items():
            out.append("")
            device = next(r.get("device", "cpu") for r in rows if r["world_size"] == world)
            backend = "gloo on CPU" if device.startswith("cpu") else f"NCCL on {device}"
            where = (
                "one process, the devices simulated as groups of the batch"
                if world == 1
                else f"{world} processes under torchrun ({backend}), "
                f"{row['sgd_batch'] // world} samples each: Shuffle BN exchanges samples and "
                f"SyncBN statistics across them"
            )
            out.append(f"test error (%), mean ± std over the seeds ({where}):")
            out.append("")
            out.append("| normalization | samples normalized together | PreciseBN | EMA |")
            out.append("|---|---|---|---|")
            for variant, cell in cells.items():
                size = next(r["norm_batch"] for r in rows if r["variant"] == variant)
                spread = (
                    "random, from the shuffled batch"
                    if variant == "shuffle"
                    else f"{size // row['device_batch']} device"
                    + ("s" if size > row["device_batch"] else "")
                )
                out.append(
                    f"| {_LEAKAGE_LABELS[variant]} | {size} ({spread}) | "
                    + " | ".join(_cell(*cell[name]) for name in ("precise", "ema"))
                    + " |"
                )
    else:
        cells = _domain_cells(rows)
        out.append(f"**Domain shift** — {_settings(rows)}")
        shifts = sorted(
            {n.split("/")[0] for (v, n) in cells if v == "shift"} - {"original"},
            key=lambda s: SHIFTS.index(s),
        )
        if shifts:
            out.append("")
            out.append(
                f"(a) trained on the original images; test error (%) on shifted test images, "
                f"mean ± std over {seeds} seed(s); original test images with training-domain "
                f"statistics: {_cell(*cells[('shift', 'original/source')], seeds)}"
            )
            out.append("")
            out.append(
                "| test domain | training-domain statistics | target statistics (PreciseBN "
                "on unlabelled target images) | target batch statistics |"
            )
            out.append("|---|---|---|---|")
            for shift in shifts:
                out.append(
                    f"| {shift} | "
                    + " | ".join(
                        _cell(*cells[("shift", f"{shift}/{m}")], seeds)
                        for m in ("source", "target", "batch_stats")
                    )
                    + " |"
                )
        trained = [v for v in _DOMAIN_TRAININGS if any(k[0] == v for k in cells)]
        if trained:
            second = next(r for r in rows if r["variant"] != "shift")["shifts"][0]
            out.append("")
            out.append(
                f"(b) trained on two domains at once (original and {second}, the same images, "
                f"as two FPN levels through one head, DomainBatchNorm), one affine shared by "
                f"the domains or one per domain; test error (%) per test domain, mean ± std "
                f"over {seeds} seed(s):"
            )
            out.append("")
            out.append(
                "| training statistics | test statistics | affine | original | "
                + second
                + " | mean |"
            )
            out.append("|---|---|---|---|---|---|")
            for variant in trained:
                train, _, affine = variant.partition("+")
                for population in ("shared", "specific"):
                    values = [
                        cells[(variant, f"{population}/{d}")] for d in ("original", "shifted")
                    ]
                    mean = float(np.mean([v[0] for v in values]))
                    out.append(
                        f"| {train} | {population} | {'per domain' if affine else 'shared'} | "
                        + " | ".join(_cell(*v, seeds) for v in values)
                        + f" | {mean:.2f} |"
                    )
    out.append("")
    out.append(
        f"What the paper (Wu & Johnson 2021) found, and whether this run reproduces it, decided "
        f"from the numbers above (means over seeds): a claim that one setting beats another "
        f"counts as reproduced when the difference exceeds {TOLERANCE} points:"
    )
    out.append("")
    out.extend(_findings_table(study, rows))
    return "\n".join(out)


def plot_study(study: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The study's figure (PNG)."""
    matplotlib = require("matplotlib", "the rethink plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if study == "ema":
        figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        epochs = np.arange(1, max(len(r["error_ema"]) for r in rows) + 1)
        for row in rows:
            seed = row["seed"]
            n = len(row["error_ema"])
            axes[0].plot(
                epochs[:n],
                _pct(row["error_ema"]),
                "o-",
                color="C1",
                alpha=0.7,
                label=f"EMA (m=0.1), seed {seed}",
            )
            axes[0].plot(
                epochs[:n],
                _pct(row["error_precise"]),
                "s-",
                color="C0",
                alpha=0.7,
                label=f"PreciseBN, seed {seed}",
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
    elif study == "inconsistency":
        figure, ax = plt.subplots(figsize=(6.5, 4.2))
        cells = _by_batch(rows)
        sizes = list(cells)
        for method, label, marker in (
            ("precise", "population (PreciseBN)", "o"),
            ("batch_stats", "batch statistics of b", "s"),
            ("frozen", "FrozenBN last epochs", "^"),
            ("ema", "population (EMA)", "x"),
        ):
            ax.errorbar(
                sizes,
                [cells[b][method][0] for b in sizes],
                yerr=[cells[b][method][1] for b in sizes],
                marker=marker,
                capsize=3,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("normalization batch b")
        ax.set_ylabel("test error (%)")
        ax.set_title("train-test inconsistency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    elif study == "leakage":
        grid = _leakage_cells(rows)
        figure, axes = plt.subplots(1, len(grid), figsize=(6.5 * len(grid), 4.2), squeeze=False)
        for ax, (world, cells) in zip(axes[0], grid.items(), strict=True):
            variants = list(cells)
            for i, (name, label) in enumerate((("precise", "PreciseBN"), ("ema", "EMA"))):
                ax.bar(
                    np.arange(len(variants)) + (i - 0.5) * 0.4,
                    [cells[v][name][0] for v in variants],
                    0.4,
                    yerr=[cells[v][name][1] for v in variants],
                    capsize=3,
                    label=f"{label} statistics",
                )
            ax.set_xticks(
                np.arange(len(variants)),
                [_LEAKAGE_LABELS[v].replace(" over ", "\nover ") for v in variants],
                fontsize=8,
            )
            ax.set_ylabel("test error (%)")
            ax.set_title(f"correlated per-device batches, {_where(world)}")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
    else:
        cells = _domain_cells(rows)
        figure, axes = plt.subplots(
            1, 2, figsize=(16, 4.4), squeeze=False, gridspec_kw={"width_ratios": [1, 1.6]}
        )
        ax = axes[0][0]
        shifts = [s for s in SHIFTS if ("shift", f"{s}/source") in cells]
        width = 0.27
        for i, (method, label) in enumerate(
            (
                ("source", "training-domain statistics"),
                ("target", "target statistics"),
                ("batch_stats", "target batch statistics"),
            )
        ):
            values = [cells[("shift", f"{s}/{method}")] for s in shifts]
            ax.bar(
                np.arange(len(shifts)) + (i - 1) * width,
                [v[0] for v in values],
                width,
                yerr=[v[1] for v in values],
                capsize=3,
                label=label,
            )
        if ("shift", "original/source") in cells:
            ax.axhline(
                cells[("shift", "original/source")][0],
                color="k",
                ls="--",
                lw=1,
                label="original test images",
            )
        ax.set_xticks(np.arange(len(shifts)), shifts)
        ax.set_ylabel("test error (%)")
        ax.set_title("(a) trained on the original domain, tested on shifts")
        ax.legend(fontsize=8)
        ax = axes[0][1]
        combos = [
            (t, p)
            for t in _DOMAIN_TRAININGS
            for p in ("shared", "specific")
            if (t, f"{p}/original") in cells
        ]
        second = next((r["shifts"][0] for r in rows if r["variant"] != "shift"), "shifted")
        for i, domain in enumerate(("original", "shifted")):
            values = [cells[(t, f"{p}/{domain}")] for t, p in combos]
            ax.bar(
                np.arange(len(combos)) + (i - 0.5) * 0.4,
                [v[0] for v in values],
                0.4,
                yerr=[v[1] for v in values],
                capsize=3,
                label=f"{second if domain == 'shifted' else domain} test images",
            )
        ax.set_xticks(
            np.arange(len(combos)),
            [
                f"train {t.partition('+')[0]}\ntest {p}"
                + ("\naffine/domain" if t.endswith("+affine") else "")
                for t, p in combos
            ],
            fontsize=8 if len(combos) > 4 else None,
        )
        ax.set_ylabel("test error (%)")
        ax.set_title(f"(b) trained on original + {second}: shared vs per-domain statistics")
        ax.legend(fontsize=8)
        for a in axes[0]:
            a.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path


def check_data(configs: Sequence[StudyConfig]) -> None:
    """Raise :class:`OptionError` naming ``--train-samples`` if a run's training data make no
    SGD batch (found before any run is trained)."""
    sources: dict[tuple[str, str | None], list[StudyConfig]] = {}
    for config in configs:
        sources.setdefault((config.dataset, config.data_root), []).append(config)
    for (name, root), group in sources.items():
        dataset = load_dataset(name, root)
        for config in group:
            if config.study == "leakage":  # correlated batches: whole devices of one class
                problem = shortfall(
                    dataset.train_y,
                    config.train_samples,
                    config.sgd_batch,
                    config.device_batch,
                    "correlated",
                )
                if problem:
                    raise OptionError(
                        "--train-samples",
                        f"run {config.tag}: {problem}; pass a larger --train-samples",
                    )
                continue
            used = min(config.train_samples, len(dataset.train_y))
            if used < config.sgd_batch:
                raise OptionError(
                    "--train-samples",
                    f"the {used} training samples of {dataset.name} make no SGD batch of "
                    f"{config.sgd_batch} (run {config.tag}); pass --train-samples "
                    f"{config.sgd_batch} or more",
                )
