"""The plan of a ``smallbn rethink`` invocation: the presets (:data:`PRESETS`), the runs of
the chosen studies under a preset with the user's settings (:func:`plan`), and the check that
their training data make SGD batches (:func:`check_data`), before any run trains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smallbn.experiments.data import OptionError, load_dataset
from smallbn.experiments.rethink.config import (
    LEAKAGE_VARIANTS,
    SHIFTS,
    STUDIES,
    StudyConfig,
    _leakage_norm_batch,
)
from smallbn.experiments.sampling import shortfall

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


#: Each setting ``plan`` takes (its command-line option: ``--`` and the name with dashes) →
#: the studies it changes; ``None``: every study.
_APPLIES_TO: dict[str, tuple[str, ...] | None] = {
    "epochs": None,
    "train_samples": None,
    "precise_samples": None,
    "eval_samples": None,
    "dataset": None,
    "ema_batch": ("ema",),
    "ema_lr": ("ema",),
    "momenta": ("ema",),
    "sample_sweep": ("ema",),
    "sweep_draws": ("ema",),
    "batch_sizes": ("inconsistency",),
    "frozen_epochs": ("inconsistency",),
    "lr": ("inconsistency", "domain", "leakage"),
    "shifts": ("domain",),
    "domain_shift": ("domain",),
    "device_batch": ("leakage",),
}


def _refuse_unused(given: dict[str, Any], studies: Sequence[str]) -> None:
    """Raise ValueError for a setting that none of ``studies`` takes (``--lr`` with
    ``--study ema``, whose learning rate is ``--ema-lr``): it would change nothing, and the
    runs would not be the ones asked for."""
    for name in given:
        targets = _APPLIES_TO[name]
        if targets is None or set(targets) & set(studies):
            continue
        option = "--" + name.replace("_", "-")
        which = f"the {', '.join(targets)} stud{'y' if len(targets) == 1 else 'ies'}"
        raise ValueError(
            f"{option} sets {which} only, none of which runs here (--study "
            f"{','.join(studies)}): it would change nothing; leave {option} out, or run "
            f"{' or '.join(targets)} (--study)"
        )


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
    ``device_batch`` (leakage); one that none of ``studies`` has is a ValueError, not
    ignored.  ``world_size``: the processes under torchrun, where only the leakage study runs
    (every other study is single-process: a ValueError says so)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (one of {', '.join(PRESETS)})")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(_APPLIES_TO)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    settings = PRESETS[preset]
    seeds = tuple(dict.fromkeys(seeds if seeds is not None else settings["seeds"]))
    configs: dict[str, StudyConfig] = {}
    for study in dict.fromkeys(studies):
        if study not in STUDIES:
            raise ValueError(f"unknown study '{study}' (one of {', '.join(STUDIES)})")
        base = {**settings[study], "world_size": world_size}
        for name, targets in _APPLIES_TO.items():
            if targets is None and name in given:  # the settings of every study
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
    _refuse_unused(given, studies)
    return list(configs.values())


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
