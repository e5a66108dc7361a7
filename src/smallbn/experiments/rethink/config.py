"""What identifies one run of ``smallbn rethink``: the studies, their settings
(:class:`StudyConfig`) and the rules a run must satisfy to train as labelled
(:meth:`StudyConfig.check`).  The presets and the plan of runs are in :mod:`.planning`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from smallbn.experiments import compare

STUDIES = ("ema", "inconsistency", "domain", "leakage")
#: The leakage study's normalizations of correlated per-device batches
#: (:func:`.leakage._leakage_run_config`).
LEAKAGE_VARIANTS = ("per-device", "ghost", "shuffle", "sync")
#: The leakage study's Ghost BN normalizes the samples of this many devices together.
GHOST_DEVICES = 4


def _leakage_norm_batch(variant: str, device_batch: int, sgd_batch: int) -> int:
    """The samples a leakage variant normalizes together: one device's, :data:`GHOST_DEVICES`
    devices', a device's share of the shuffled batch, or the whole SGD batch (SyncBN)."""
    return {
        "per-device": device_batch,
        "ghost": GHOST_DEVICES * device_batch,
        "shuffle": device_batch,
        "sync": sgd_batch,
    }[variant]


#: Shifted copies of the test images (domain study): intensities inverted, contrast lowered
#: (u → 0.3 + 0.4 u on the [0, 1] pixel scale), Gaussian pixel noise (σ = 0.25, clipped).
SHIFTS = ("invert", "contrast", "noise")


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
