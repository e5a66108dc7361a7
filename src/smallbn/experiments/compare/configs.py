"""The comparison job's runs: the methods, what identifies a run (:class:`RunConfig`, whose
``key`` names its row in ``results.jsonl``), the rules a run must meet to train what it is
labelled as, and the presets (:data:`PRESETS`, :func:`preset_configs`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from smallbn.experiments.sampling import COMPOSITIONS

__all__ = [
    "METHODS",
    "MODES",
    "PRESETS",
    "RunConfig",
    "RunIdentity",
    "batch_independent",
    "preset_configs",
]

#: Job method name → registry name.  In ``groups`` mode BN is Ghost BN with groups of b and
#: BRN/SN/MABN/CBN/Shuffle BN group natively (``norm_batch_size``; for CBN and MABN the groups are
#: consecutive iterations, exactly as calling the layer on each group in turn would be).
METHODS: dict[str, str] = {
    "bn": "bn",
    "brn": "brn",
    "gn": "gn",
    "ln": "ln",
    "in": "in",
    "sn": "sn",
    "naive": "cbn",  # cross-iteration pooling without compensation
    "cbn": "cbn",
    "mabn": "mabn",
    # groups of b drawn from the shuffled SGD batch (the simulated devices exchange samples)
    "shufflebn": "shufflebn",
}
_NATIVE_GROUPS = {"brn", "sn", "mabn", "cbn", "naive", "shufflebn"}
#: Methods that normalize each sample alone: the batch they see does not matter.
_SAMPLE_WISE = {"gn", "ln", "in"}
MODES = ("groups", "sgd")


class RunIdentity:
    """The identity of a job's run config (a dataclass with a ``data_root`` field), shared by
    the comparison job and ``smallbn rethink``: ``key`` names its row in results.jsonl, ``tag``
    its checkpoint and claim files."""

    #: Fields added after results were recorded: left out of :attr:`key` while they hold
    #: their default, so that the keys (and checkpoint tags) of the runs recorded before
    #: they existed stay the same (``data_root``: only when a folder was given).
    KEY_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = ("data_root",)

    def identity(self) -> dict[str, Any]:
        """The fields that make up :attr:`key`: every field, but those of
        :attr:`KEY_OMITS_DEFAULT` only when they differ from their default."""
        fields = dataclasses.asdict(self)  # type: ignore[call-overload]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name in self.KEY_OMITS_DEFAULT:
            if fields[name] == defaults[name]:
                del fields[name]
        return fields

    @property
    def key(self) -> str:
        return json.dumps(self.identity(), sort_keys=True)

    def tag_prefix(self) -> str:
        raise NotImplementedError

    @property
    def tag(self) -> str:
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        return f"{self.tag_prefix()}-{digest}"


@dataclass(frozen=True)
class RunConfig(RunIdentity):
    """Everything that determines one training run (its identity in results.jsonl)."""

    method: str
    norm_batch: int
    composition: str
    seed: int
    dataset: str = "fashion-mnist"
    mode: str = "groups"
    sgd_batch: int = 32
    epochs: float = 3.0
    train_samples: int = 10_000
    lr: float = 0.2  # the best of 0.05/0.1/0.2/0.4 for the BN@32 reference (docs/results.md)
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    precise_samples: int = 2048
    class_group: int = 2
    sync: bool = False
    world_size: int = 1
    #: The data folder the user passed (absolute); None for the dataset's default data.
    data_root: str | None = None

    def tag_prefix(self) -> str:
        return f"{self.method}-b{self.norm_batch}-{self.composition}-s{self.seed}"

    @property
    def batch(self) -> int:
        """SGD batch size."""
        return self.sgd_batch if self.mode == "groups" else self.norm_batch

    def check(self) -> None:
        """Raise ValueError, stating the rule, if this run would not train what it is
        labelled as (a short group, a normalization batch other than ``norm_batch``, i.i.d.
        batches labelled correlated, an SGD batch that does not split over the processes, a
        learning rate or a length that trains nothing)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}' (one of {', '.join(METHODS)})")
        if self.composition not in COMPOSITIONS:
            raise ValueError(
                f"unknown composition '{self.composition}' (one of {', '.join(COMPOSITIONS)})"
            )
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}' (one of {', '.join(MODES)})")
        for name in ("norm_batch", "sgd_batch", "class_group", "train_samples", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "epochs"):  # 0 trains nothing; NaN or inf make every weight NaN
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
        b = self.norm_batch
        if self.mode == "groups" and self.sgd_batch % b:
            effect = (
                f"normalize over {self.sgd_batch} samples, not {b}"
                if b > self.sgd_batch
                else "leave a short group in every batch"
            )
            raise ValueError(
                f"normalization batch b={b} does not divide the SGD batch of {self.sgd_batch}: "
                f"in --mode groups every SGD batch is split into groups of b, and b={b} would "
                f"{effect}; pick --batch-sizes among the divisors of {self.sgd_batch}, or "
                f"--mode sgd"
            )
        if self.composition == "correlated" and self.batch % self.class_group:
            raise ValueError(
                f"correlated batches are made of runs of class_group={self.class_group} "
                f"samples of one class, so class_group must divide the SGD batch "
                f"({self.batch}, b={b} in --mode {self.mode}); pick a multiple of "
                f"{self.class_group} for --batch-sizes, or --compositions iid"
            )
        if self.batch % self.world_size:
            raise ValueError(
                f"the SGD batch of {self.batch} does not split over {self.world_size} "
                f"processes: under torchrun the number of processes must divide the SGD batch "
                f"(the batch is b in --mode sgd, {self.sgd_batch} in --mode groups)"
            )
        share = self.batch // self.world_size
        if not self.sync and self.method not in _SAMPLE_WISE and share % b:
            raise ValueError(
                f"each of the {self.world_size} processes trains {share} samples of every SGD "
                f"batch, so without --sync it would normalize over {share}, not b={b}: pass "
                f"--sync to pool statistics across processes, or pick b dividing {share}"
            )


# -- presets -----------------------------------------------------------------------------------

#: name → (composition → [(method, normalization batch sizes)], run settings).
#:
#: ``default`` draws the MABN authors' figure (Yan et al., ICLR 2020: error against the
#: normalization batch size, one line per method) in 9-16 minutes on 2 CPU cores: in
#: correlated groups every method over b = 2, 4, 8, where the methods part ways, BN also at 32
#: (the reference), GN once (:func:`batch_independent`: its runs at every b are the same run),
#: and BN in i.i.d. groups at 2 and 32 (the collapse at b = 2 is the correlation's, not the
#: small batch's); two seeds, 6,000 training images, 3 epochs (38 runs).
PRESETS: dict[str, tuple[dict[str, list[tuple[str, tuple[int, ...]]]], dict[str, Any]]] = {
    "default": (
        {
            "correlated": [
                ("bn", (2, 4, 8, 32)),
                ("brn", (2, 4, 8)),
                ("gn", (2,)),
                ("sn", (2, 4, 8)),
                ("cbn", (2, 4, 8)),
                ("mabn", (2, 4, 8)),
            ],
            "iid": [("bn", (2, 32))],
        },
        {"epochs": 3.0, "train_samples": 6_000, "seeds": (0, 1)},
    ),
    "full": (
        {
            composition: [
                *((m, (2, 4, 8, 16, 32)) for m in ("bn", "brn", "sn", "naive", "cbn", "mabn")),
                ("gn", (2,)),  # the same run at every b (batch_independent)
            ]
            for composition in ("correlated", "iid")
        },
        {"epochs": 10.0, "train_samples": 60_000, "seeds": (0, 1, 2)},
    ),
    "smoke": (
        {"correlated": [("bn", (2, 8))], "iid": [("bn", (2,))]},
        {"epochs": 1.0, "train_samples": 256, "seeds": (0,), "precise_samples": 64},
    ),
}


def preset_configs(preset: str, **overrides: Any) -> list[RunConfig]:
    """The run configs of a preset; ``overrides`` replace settings (``seeds``, ``epochs``,
    ``methods`` (a subset), ``batch_sizes``, ``compositions``, and any RunConfig field)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (one of {', '.join(PRESETS)})")
    plan, settings = PRESETS[preset]
    settings = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
    # a repeated value would make the same run twice (duplicate rows, two workers racing
    # on one checkpoint): keep the first of each, in order
    seeds = _unique(settings.pop("seeds"))
    methods = _unique(settings.pop("methods", None) or ())
    sizes = _unique(settings.pop("batch_sizes", None) or ())
    compositions = _unique(settings.pop("compositions", None) or tuple(plan))
    for composition in compositions:
        if composition not in COMPOSITIONS:
            raise ValueError(
                f"unknown composition '{composition}' (one of {', '.join(COMPOSITIONS)})"
            )
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}' (one of {', '.join(METHODS)})")
    configs: dict[str, RunConfig] = {}
    for composition in compositions:
        entries = plan.get(composition) or plan[next(iter(plan))]
        if methods:
            entries = [(m, sizes or (2, 32)) for m in methods]
        for method, batch_sizes in entries:
            for b in sizes or batch_sizes:
                for seed in seeds:
                    config = RunConfig(method, b, composition, seed, **settings)
                    config.check()
                    configs.setdefault(config.key, config)
    return list(configs.values())


def batch_independent(method: str, mode: str) -> bool:
    """Whether a run's numbers do not depend on its normalization batch b: in ``groups`` mode
    every run trains on SGD batches of ``sgd_batch`` whatever b is, and a method that
    normalizes each sample alone (GN, LN, IN: statistics of each sample's own channels, see
    docs/methods.md, "GN, LN, IN") sees no group, so its runs at every b are the same run,
    digit for digit (tests/experiments/test_compare.py checks it).  In ``sgd`` mode b is the
    SGD batch, and they differ."""
    return mode == "groups" and method in _SAMPLE_WISE


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    """``values`` without repeats, first occurrences in order."""
    return tuple(dict.fromkeys(values))
