"""``smallbn compare``: test error against normalization batch size for every method.

A sweep over methods × normalization batch sizes × batch compositions × seeds trains
:class:`~smallbn.experiments.models.SmallResNet` on real data and records, per run, the test
error with the EMA running statistics and after PreciseBN, the training time and the config.

* **Normalization batch.** ``mode="groups"`` (default, as Yan et al. ICLR 2020 do): SGD batches
  of ``sgd_batch`` samples whose norm layers normalize consecutive groups of ``b`` samples
  (Ghost BN for BN; ``norm_batch_size=b`` for the others, vectorized over the groups), the
  groups acting as consecutive steps for the cross-iteration methods (CBN, MABN).
  ``mode="sgd"``: the SGD batch is ``b``.
* **Composition.** ``iid`` batches, or ``correlated``: batches made of runs of ``class_group``
  (default 2) samples of one class, in random order (:mod:`smallbn.experiments.sampling`), as
  the RoIs of one image in a detection head.  A normalization group of b = 2 is then a single
  class, while BN over 32 samples mixes 16 such runs.
* **Robustness.** Each finished run is appended atomically to ``results.jsonl``; a run in
  progress checkpoints atomically every ``checkpoint_every`` steps and when its training
  ends.  Rerunning the same command skips finished runs and resumes an interrupted one from
  its checkpoint: nothing lost, nothing duplicated.  A damaged line of ``results.jsonl`` is
  moved, verbatim and with a warning naming its line, to ``results.jsonl.damaged``; a
  checkpoint that does not fit its run is an error naming the file.
* **Concurrency.** Several invocations of the same sweep (or of overlapping ones) on the
  same output folder share the work: each run is claimed (``checkpoints/<tag>.lock``, an
  ``flock`` the OS releases when its holder dies) before it is trained, a run claimed
  elsewhere is left for last and then waited for, and it is trained, from its checkpoint,
  only if it still has no row: one row per run, even when one of the invocations is killed.
* **Scale-out.** Under ``torchrun`` every process trains its share of each SGD batch (whole
  groups) with DistributedDataParallel (gloo on CPU, NCCL on GPU); ``sync=True`` makes the
  norm layers pool statistics across processes.  Rank 0 writes the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from smallbn._io import atomic_write, claim, exclusive_lock
from smallbn._optional import require, tqdm
from smallbn.convert import ConversionWarning, bind_producers, uses_batch_stats
from smallbn.experiments.data import (
    DEFAULT_FASHION_MNIST,
    Dataset,
    OptionError,
    load_dataset,
    resolve_dataset,
)
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.sampling import (
    COMPOSITIONS,
    batch_indices,
    samples_for_one_batch,
    shortfall,
    steps_per_epoch,
)
from smallbn.experiments.train import evaluate
from smallbn.layers import ShuffleBatchNorm
from smallbn.population import precise_bn
from smallbn.registry import build_norm

__all__ = [
    "METHODS",
    "MODES",
    "PRESETS",
    "CheckpointError",
    "ResultsWarning",
    "RunConfig",
    "bind_data",
    "check_data",
    "format_tables",
    "plot_results",
    "preset_configs",
    "read_results",
    "run_sweep",
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


class CheckpointError(RuntimeError):
    """A run's checkpoint cannot be resumed from: damaged, from another version, written for
    another run, or past the end of this one."""


class ResultsWarning(UserWarning):
    """A line of ``results.jsonl`` cannot be used as a result and was set aside."""


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
    lr: float = 0.2  # the best of 0.05/0.1/0.2/0.4 for the BN@32 reference (README)
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

#: name → (composition → [(method, normalization batch sizes)], run settings)
PRESETS: dict[str, tuple[dict[str, list[tuple[str, tuple[int, ...]]]], dict[str, Any]]] = {
    "default": (
        {
            "correlated": [
                ("bn", (2, 32)),
                ("brn", (2,)),
                ("gn", (2,)),
                ("sn", (2,)),
                ("cbn", (2,)),
                ("mabn", (2,)),
            ],
            "iid": [("bn", (2, 32)), ("sn", (2,))],
        },
        {"epochs": 3.0, "train_samples": 8_000, "seeds": (0, 1, 2)},
    ),
    "full": (
        {
            composition: [
                (m, (2, 4, 8, 16, 32)) for m in ("bn", "brn", "gn", "sn", "naive", "cbn", "mabn")
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


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    """``values`` without repeats, first occurrences in order."""
    return tuple(dict.fromkeys(values))


# -- one run -----------------------------------------------------------------------------------


def _norm_factory(config: RunConfig, sgd_steps: int) -> Callable[..., nn.Module]:
    """The constructor the ResNet calls for each norm layer of this run.

    Schedules are in the layer's own steps: BRN counts forward calls (SGD steps), CBN counts
    iterations, i.e. groups (its burn-in is a quarter of the groups seen in training).  MABN's
    moving averages span 32 samples, the release's ``B = 32/b`` (16 at b = 2): a fixed window of
    16 steps would average over 16 weight updates at b = 32, stale enough to make training
    unstable (README, "Two processes").  ``naive`` is CBN without compensation and with CBN's
    window, so that the two differ in the compensation only.
    """
    spec, b = METHODS[config.method], config.norm_batch
    grouped = config.mode == "groups" and b < config.sgd_batch
    group_calls = sgd_steps * (config.sgd_batch // b if grouped else 1)
    options: dict[str, Any] = {}
    if config.method == "bn" and grouped:
        spec, options = "ghostbn", {"group_size": b}
    elif config.method == "brn":  # the paper's 5k/25k/40k-of-~100k ramp, scaled to this run
        options = {
            "warmup_steps": int(0.05 * sgd_steps),
            "d_max_ramp_end": int(0.25 * sgd_steps),
            "r_max_ramp_end": int(0.4 * sgd_steps),
        }
    elif config.method == "gn":
        options = {"channels_per_group": 8}
    elif config.method in ("cbn", "naive"):  # naive: CBN's window, without compensation
        options = {"window": min(math.ceil(16 / b), 8), "burnin": int(0.25 * group_calls)}
        if config.method == "naive":
            options["compensate"] = False
    elif config.method == "mabn":
        options = {"window": max(1, round(32 / b))}
    if grouped and config.method in _NATIVE_GROUPS:
        options["norm_batch_size"] = b
    if config.sync and spec not in ("gn", "ln", "in"):
        options["sync"] = True
        spec = "syncbn" if spec == "bn" else spec  # torch's BN cannot pool on CPU

    def make(channels: int, **kwargs: Any) -> nn.Module:
        return build_norm(spec, channels, **{**kwargs, **options})

    return make


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def _checkpoint_path(output_dir: Path, config: RunConfig) -> Path:
    return output_dir / "checkpoints" / f"{config.tag}.pt"


def _differences(key: str, other: str) -> str:
    """The fields in which two run keys differ, as ``field=theirs (this run: ours)``."""
    try:
        ours, theirs = json.loads(key), json.loads(other)
    except (TypeError, json.JSONDecodeError):
        return "an unreadable key"
    if not isinstance(theirs, dict):
        return "an unreadable key"
    fields = sorted(set(ours) | set(theirs))
    return ", ".join(
        f"{field}={theirs.get(field)!r} (this run: {ours.get(field)!r})"
        for field in fields
        if ours.get(field) != theirs.get(field)
    )


def _resume(
    checkpoint: Path,
    config: RunConfig,
    total: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[int, float, float]:
    """Load ``checkpoint`` into ``model`` and ``optimizer``; returns (step, seconds, loss).

    A checkpoint that does not fit its run raises :class:`CheckpointError` naming the file
    and saying to delete it; it is never discarded nor worked around.  Resuming from it would
    record a result trained for the wrong number of steps (a step past this run's end) or
    from another run's weights (a file copied or renamed by hand), and discarding it would
    silently throw away training the user may want back.  Checkpoints record the run
    (``key``) and the number of steps (``total``) they were written for; older ones, without
    those fields, are checked on their step alone.  A checkpoint at exactly ``total`` steps is
    a finished training whose result was not recorded yet: resuming evaluates it, no step is
    trained again.
    """

    def unusable(reason: str) -> CheckpointError:
        return CheckpointError(
            f"{checkpoint}: cannot resume {config.tag} from this checkpoint ({reason}); "
            f"delete the file to restart that run from scratch"
        )

    try:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        step = state["step"]
    except Exception as error:  # any failure to read it: the file is the problem
        raise unusable(f"{type(error).__name__}: {error}") from error
    if "key" in state and state["key"] != config.key:
        raise unusable(f"it was written for another run: {_differences(config.key, state['key'])}")
    if "total" in state and state["total"] != total:
        raise unusable(
            f"it was written for a run of {state['total']} steps and this run has {total}: "
            f"the training data or the code changed since"
        )
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise unusable(f"it is at step {step!r}, outside this run's {total} steps")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        _load_host_state(model, state.get("host_state"))
        return step, float(state["elapsed"]), float(state["loss"])
    except Exception as error:  # any failure to resume: the file is the problem
        raise unusable(f"{type(error).__name__}: {error}") from error


def _host_state(model: nn.Module) -> dict[str, int]:
    """What the checkpoint needs beside the ``state_dict`` to resume exactly: each Shuffle
    BN's step counter, which picks its next permutation (host state, kept out of the
    ``state_dict`` so that it stays BN's)."""
    return {
        name: m.shuffle_step for name, m in model.named_modules() if isinstance(m, ShuffleBatchNorm)
    }


def _load_host_state(model: nn.Module, state: dict[str, int] | None) -> None:
    """Restore :func:`_host_state`; a checkpoint written before it was kept (``None``) resumes
    with every Shuffle BN's permutations from step 0, said with a warning."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ShuffleBatchNorm)}
    if state is None:
        if layers:
            warnings.warn(
                f"the checkpoint does not hold Shuffle BN's step counters ({len(layers)} "
                f"layers, e.g. '{next(iter(layers))}'): the resumed run draws its permutations "
                f"from step 0 again, not those an uninterrupted run would draw",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    for name, module in layers.items():
        if name in state:
            module.shuffle_step = int(state[name])


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr(config: RunConfig, step: int, total: int) -> float:
    """Linear warm-up over the first 2% of steps, then cosine decay."""
    warmup = max(1, total // 50)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CPU, where oneDNN's convolutions run 15–40% faster in NHWC at these
    sizes (every layer computes the same in either layout: tests/layers/test_memory_format)."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def run_one(
    config: RunConfig,
    data: Dataset,
    checkpoint: Path,
    *,
    device: torch.device,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate one config, resuming from ``checkpoint`` if it exists.

    Rank 0 checkpoints every ``checkpoint_every`` steps and when training ends, so a run
    interrupted while it is evaluated resumes without training again.  A checkpoint that
    does not fit the run raises :class:`CheckpointError` (see :func:`_resume`).
    """
    rank, world = _rank()
    config.check()
    train_x, train_y = data.train_x[: config.train_samples], data.train_y[: config.train_samples]
    class_group = config.class_group  # check(): divides the batch where it is used (correlated)
    per_epoch = steps_per_epoch(train_y, config.batch, class_group, config.composition)
    total = max(1, int(round(config.epochs * per_epoch)))
    torch.manual_seed(config.seed)
    model = SmallResNet(
        data.num_classes,
        data.in_channels,
        config.widths,
        config.blocks,
        norm=_norm_factory(config, total),
    ).to(device)
    model.to(memory_format=_memory_format(device))  # type: ignore[call-overload]
    with warnings.catch_warnings():  # a model trained from scratch: no function to keep
        warnings.filterwarnings("ignore", "MABN centres", ConversionWarning)
        bind_producers(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    start, elapsed, loss_value = 0, 0.0, float("nan")
    if checkpoint.exists():
        start, elapsed, loss_value = _resume(checkpoint, config, total, model, optimizer, device)
        if rank == 0:
            print(
                f"resuming {config.tag} from its checkpoint at step {start} of {total}",
                file=sys.stderr,
                flush=True,
            )
    trained: nn.Module = model
    if world > 1:
        with warnings.catch_warnings():
            # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which (its own
            # warning says) still syncs buffers at init: rank-local running statistics (Shuffle
            # BN's) need broadcast_buffers=False until init_sync_buffers exists
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            trained = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    stream = batch_indices(
        train_y, config.batch, class_group, config.composition, config.seed, start
    )
    bar = tqdm(
        total=total,
        initial=start,
        desc=config.tag.rsplit("-", 1)[0],
        leave=False,
        disable=not progress or rank != 0,
    )
    model.train()
    began = time.perf_counter()
    for step in range(start, total):
        index = next(stream)
        if world > 1:  # each process trains on its share of whole groups
            index = index.reshape(world, -1)[rank]
        x, y = train_x[index].to(device), train_y[index].to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step, total)
        loss = F.cross_entropy(trained(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{config.tag}: training diverged at step {step} (loss {float(loss)}); lower "
                f"the learning rate (--lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        done = step + 1
        if rank == 0 and (done % checkpoint_every == 0 or done == total):
            loss_value = float(loss.detach())
            _save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "host_state": _host_state(model),
                    "step": done,
                    "elapsed": elapsed + time.perf_counter() - began,
                    "loss": loss_value,
                    "key": config.key,
                    "total": total,
                },
                checkpoint,
            )
        if done == total:
            loss_value = float(loss.detach())
    bar.close()
    elapsed += time.perf_counter() - began
    error_ema = evaluate(model, data.test_x, data.test_y, device=device)
    # PreciseBN sees batches composed as in training (groups of b), normalized as in training
    precise_stream = (
        (train_x[i].to(device), train_y[i])
        for i in batch_indices(
            train_y, config.batch, class_group, config.composition, config.seed + 7
        )
    )
    if any(uses_batch_stats(m) for m in model.modules()):
        precise_bn(model, precise_stream, config.precise_samples, progress=False)
        error_precise = evaluate(model, data.test_x, data.test_y, device=device)
    else:  # GN/LN/IN: no population statistics to recompute
        error_precise = error_ema
    return {
        **config.identity(),
        "key": config.key,
        "train_samples_used": len(train_y),  # train_samples caps it; a small dataset has fewer
        "steps": total,
        "error_ema": error_ema,
        "error_precise": error_precise,
        "train_seconds": elapsed,
        "final_loss": loss_value,
        "device": str(device),
        "torch": torch.__version__,
    }


# -- results -----------------------------------------------------------------------------------

#: What every row of ``results.jsonl`` needs, with its types: the run's identity (``key``,
#: which makes a finished run skipped) and what the tables read.  A line without them is no
#: result: skipping runs on it, or reporting it, would crash every later run.
_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "method": (str,),
    "composition": (str,),
    "norm_batch": (int,),
    "seed": (int,),
    "error_ema": (int, float),
    "error_precise": (int, float),
}


@dataclass(frozen=True)
class _Damaged:
    """A line of ``results.jsonl`` that is no result: its number (from 1), text and why."""

    number: int
    text: str
    problem: str


def _check_row(
    line: str, fields: dict[str, tuple[type, ...]] | None = None
) -> tuple[dict[str, Any] | None, str]:
    """``(row, "")`` for a usable line, else ``(None, what is wrong with it)``; ``fields``:
    the fields a row needs, with their types (default :data:`_ROW_FIELDS`; other jobs that
    share this machinery, such as ``smallbn rethink``, pass their own)."""
    fields = _ROW_FIELDS if fields is None else fields
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg} at column {error.colno})"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    missing = [field for field in fields if field not in row]
    if missing:
        return None, f"no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}"
    wrong = [
        f"{field}={row[field]!r}"
        for field, types in fields.items()
        if isinstance(row[field], bool) or not isinstance(row[field], types)
    ]
    if wrong:
        return None, f"field{'s' if len(wrong) > 1 else ''} of the wrong type: {', '.join(wrong)}"
    return row, ""


def _parse_results(
    path: Path, fields: dict[str, tuple[type, ...]] | None = None
) -> tuple[list[tuple[str, dict[str, Any]]], list[_Damaged]]:
    """The usable rows of ``path`` with their lines verbatim, and the damaged lines: not
    JSON, not an object, without the fields of :data:`_ROW_FIELDS`, or a second row of a
    run already recorded (it would count as one more seed in the tables).  Blank lines hold
    nothing and are neither."""
    if not path.exists():
        return [], []
    # surrogateescape: bytes that are not UTF-8 survive to results.jsonl.damaged unchanged
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    rows: list[tuple[str, dict[str, Any]]] = []
    damaged: list[_Damaged] = []
    first: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row, problem = _check_row(line, fields)
        if row is not None and row["key"] in first:
            problem = f"a second row for the run recorded at line {first[row['key']]}"
            row = None
        if row is None:
            damaged.append(_Damaged(number, line, problem))
            continue
        first[row["key"]] = number
        rows.append((line, row))
    return rows, damaged


def _aside(path: Path) -> Path:
    return path.with_name(path.name + ".damaged")


def read_results(
    path: Path, fields: dict[str, tuple[type, ...]] | None = None
) -> list[dict[str, Any]]:
    """The finished runs in ``results.jsonl``.

    A damaged line (see :func:`_parse_results`) is skipped with a :class:`ResultsWarning`
    naming the file and the line; the job moves it verbatim to ``results.jsonl.damaged`` at
    its next write (:func:`_set_aside_damaged`), so it is never lost and never read as a
    result.  ``fields``: what a row needs (default :data:`_ROW_FIELDS`).
    """
    rows, damaged = _parse_results(path, fields)
    for line in damaged:
        warnings.warn(
            f"{path}:{line.number}: {line.problem}; skipped (the comparison job moves it "
            f"verbatim to {_aside(path)})",
            ResultsWarning,
            stacklevel=2,
        )
    return [row for _, row in rows]


def _encode(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8", errors="surrogateescape")


def _rewrite(
    path: Path, extra: Sequence[str] = (), fields: dict[str, tuple[type, ...]] | None = None
) -> None:
    """Rewrite ``path`` (the caller holds its lock) with its usable lines verbatim and
    ``extra`` after them, first moving its damaged lines, verbatim, to the end of
    ``<name>.damaged`` with a warning naming each.  Both files are written atomically, the
    damaged lines first: a kill in between leaves them in both files (moved again, so
    twice in the .damaged file, by the next rewrite), never in neither."""
    rows, damaged = _parse_results(path, fields)
    if damaged:
        aside = _aside(path)
        previous = aside.read_bytes() if aside.exists() else b""
        moved = _encode(line.text for line in damaged)
        atomic_write(aside, lambda handle: handle.write(previous + moved))
    if damaged or extra:
        lines = [line for line, _ in rows] + list(extra)
        atomic_write(path, lambda handle: handle.write(_encode(lines)))
    for line in damaged:
        warnings.warn(
            f"{path}:{line.number}: {line.problem}; moved verbatim to {_aside(path)}",
            ResultsWarning,
            stacklevel=3,
        )


def _results_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    return exclusive_lock(path.with_name(path.name + ".lock"))


def _set_aside_damaged(path: Path, fields: dict[str, tuple[type, ...]] | None = None) -> None:
    """Move the damaged lines of ``path`` to ``<name>.damaged`` (with a warning each), so
    that what follows reads results only."""
    if path.exists():
        with _results_lock(path):
            _rewrite(path, fields=fields)


def _append_result(
    path: Path, row: dict[str, Any], fields: dict[str, tuple[type, ...]] | None = None
) -> None:
    """Append one line atomically: the file is rewritten to a temporary and renamed, so a
    kill at any moment leaves either the old or the new file, never half a line.  The
    read-modify-write holds an exclusive lock on ``<name>.lock`` beside it, so concurrent
    invocations writing the same results never drop each other's rows; damaged lines found
    on the way are moved to ``<name>.damaged``, never dropped."""
    with _results_lock(path):
        _rewrite(path, [json.dumps(row, sort_keys=True)], fields)


def _recorded(path: Path, key: str, fields: dict[str, tuple[type, ...]] | None = None) -> bool:
    """Whether ``path`` holds a row of the run ``key``."""
    return any(row["key"] == key for row in read_results(path, fields))


# -- claims: one run, one process ---------------------------------------------------------------

_HELD, _RUN, _DONE = 0, 1, 2
#: Seconds between attempts to claim a run held elsewhere, under torchrun (see _attempt).
_POLL_SECONDS = 1.0


def _agree(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every process under torchrun, so that all ranks take the same
    branch (they train each run together); ``value`` itself in a single process."""
    rank, world = _rank()
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def _attempt(
    config: RunConfig,
    output_dir: Path,
    train: Callable[[], dict[str, Any]],
    *,
    wait: bool,
    device: torch.device,
    fields: dict[str, tuple[type, ...]] | None = None,
) -> bool:
    """Claim ``config``'s run, train it with ``train`` unless ``results.jsonl`` already has
    its row, record the row, and drop its checkpoint; ``False`` if another process holds the
    claim (``wait=False``: the caller comes back to it once its other runs are done).

    The claim (``checkpoints/<tag>.lock``, :func:`smallbn._io.claim`) is held until the row
    is recorded, and the results are read again once it is held: so a run is trained by one
    process at a time and recorded once, however many invocations share the folder.  When
    the holder dies, even by SIGKILL, the OS releases the claim and a waiting process takes
    the run over from its checkpoint.  Under torchrun rank 0 claims and writes and every rank
    follows its decision; a wait is then a poll (every :data:`_POLL_SECONDS`), so that the
    other ranks wait in short broadcasts rather than one that would time out.

    ``config`` needs only ``key`` and ``tag``; ``fields`` is what a row of the results needs
    (default :data:`_ROW_FIELDS`), so other jobs (``smallbn rethink``) claim their runs here too.
    """
    rank, world = _rank()
    results = output_dir / "results.jsonl"
    checkpoint = _checkpoint_path(output_dir, config)
    lock = checkpoint.with_suffix(".lock")
    with contextlib.ExitStack() as held:
        while True:
            state = _HELD
            if rank == 0:
                attempt = contextlib.ExitStack()
                if attempt.enter_context(claim(lock, wait=wait and world == 1)):
                    held.enter_context(attempt)  # held until the row is recorded
                    state = _DONE if _recorded(results, config.key, fields) else _RUN
                else:
                    attempt.close()
            state = _agree(state, device)
            if state != _HELD or not wait:
                break
            time.sleep(_POLL_SECONDS)
        if state == _HELD:
            return False
        if state == _RUN:
            row = train()
            if rank == 0:
                _append_result(results, row, fields)
        if rank == 0:
            checkpoint.unlink(missing_ok=True)
    return True


def _notice_waiting(config: RunConfig) -> None:
    print(
        f"waiting for run {config.tag}: another process is training it (its row is taken "
        f"when it ends; if that process dies, this one resumes the run from its checkpoint)",
        file=sys.stderr,
        flush=True,
    )


@functools.lru_cache(maxsize=2)
def _worker_dataset(name: str, root: str | None) -> Dataset:
    """A worker process reads (and checks) the data once, not once per run."""
    return load_dataset(name, root)


def _worker_run(config: RunConfig, output_dir: Path, checkpoint_every: int, wait: bool) -> bool:
    """One run in a worker process of a parallel sweep (one thread each), claimed, trained
    and recorded by the worker itself (:func:`_attempt`): the claim is then held until the
    row is in the file, which it would not be if the worker returned the row for the main
    process to write.  ``False``: another process holds the run."""
    torch.set_num_threads(1)

    def train() -> dict[str, Any]:
        return run_one(
            config,
            _worker_dataset(config.dataset, config.data_root),
            _checkpoint_path(output_dir, config),
            device=torch.device("cpu"),
            checkpoint_every=checkpoint_every,
            progress=False,
        )

    return _attempt(config, output_dir, train, wait=wait, device=torch.device("cpu"))


def _die_with_parent() -> None:
    """Pool initializer: a worker is killed when the sweep's process dies (Linux), so a
    killed sweep leaves no orphan training in the background to race its rerun."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_parallel(
    todo: Sequence[RunConfig],
    output_dir: Path,
    jobs: int,
    checkpoint_every: int,
    progress: bool,
    worker: Callable[[Any, Path, int, bool], bool] | None = None,
) -> None:
    """Run ``todo`` in ``jobs`` worker processes, each recording its result as it completes.

    A run that another process holds is submitted again, to wait for its claim, behind the
    runs submitted first.  When a run fails, the runs not yet started are cancelled, those in
    progress finish and are recorded (their work is not thrown away), and then the first
    failure is raised.  ``worker(config, output_dir, checkpoint_every, wait)`` (a module-level
    function, for the spawned processes; default :func:`_worker_run`) claims, trains and
    records one run and returns ``False`` when another process holds it (``smallbn rethink``
    passes its own).
    """
    work = _worker_run if worker is None else worker
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_die_with_parent)
    first_error: BaseException | None = None
    bar = tqdm(total=len(todo), desc="runs", disable=not progress)
    try:
        futures: dict[Future[bool], RunConfig] = {
            pool.submit(work, c, output_dir, checkpoint_every, False): c for c in todo
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                config = futures[future]
                error = future.exception()
                if error is None:
                    if future.result():
                        bar.update(1)
                    elif first_error is None:  # held elsewhere: wait for it after the others
                        _notice_waiting(config)
                        again = pool.submit(work, config, output_dir, checkpoint_every, True)
                        futures[again] = config
                        pending.add(again)
                    continue
                bar.update(1)
                if first_error is None:
                    first_error = error
                    error.add_note(
                        f"in run {config.tag}; runs in progress were finished and recorded, "
                        f"runs not started were cancelled: rerun the command to continue"
                    )
                    # Cancel here, not only through shutdown(cancel_futures=True): the pool
                    # cancels in its own thread later and never reports those futures as
                    # done, so waiting on them would hang.  Runs already handed to a worker
                    # cannot be cancelled; they stay pending and are recorded when they end.
                    pending = {f for f in pending if not f.cancel()}
                    pool.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()
        # on an interrupt, too: nothing new starts, and the pool's processes are reaped
        pool.shutdown(wait=True, cancel_futures=True)
    if first_error is not None:
        raise first_error


def _run_serial(
    todo: Sequence[RunConfig],
    output_dir: Path,
    device: torch.device,
    checkpoint_every: int,
    progress: bool,
) -> None:
    """Run ``todo`` in this process (every rank under torchrun), the runs that another
    process holds last, each once its claim is free (:func:`_attempt`)."""
    rank, world = _rank()
    datasets: dict[tuple[str, str | None], Dataset] = {}

    def trainer(config: RunConfig) -> Callable[[], dict[str, Any]]:
        def train() -> dict[str, Any]:
            source = (config.dataset, config.data_root)
            if source not in datasets:
                datasets[source] = load_dataset(*source)
            return run_one(
                config,
                datasets[source],
                _checkpoint_path(output_dir, config),
                device=device,
                checkpoint_every=checkpoint_every,
                progress=progress,
            )

        return train

    deferred = []
    for config in tqdm(todo, desc="runs", disable=not progress or rank != 0):
        if not _attempt(config, output_dir, trainer(config), wait=False, device=device):
            deferred.append(config)
        if world > 1:
            dist.barrier()
    for config in deferred:
        if rank == 0:
            _notice_waiting(config)
        _attempt(config, output_dir, trainer(config), wait=True, device=device)
        if world > 1:
            dist.barrier()


def bind_data(configs: Sequence[RunConfig], root: str | Path | None) -> list[RunConfig]:
    """``configs`` labelled with the data each run will actually read, before any key is
    computed: ``dataset="digits"`` where Fashion-MNIST falls back to the digits (with the
    visible notice), and ``data_root`` the absolute folder where one was given (``root``, else
    the config's own), left out for the dataset's default data and for the digits, which read
    no folder.  A given folder that does not exist raises :class:`DatasetError`."""
    resolved: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    bound = []
    for config in configs:
        given = str(root) if root is not None else config.data_root
        source = (config.dataset, given)
        if source not in resolved:
            dataset = resolve_dataset(config.dataset, given)
            folder = None
            if dataset != "digits" and given is not None:
                folder = Path(given).resolve()
                if dataset == "fashion-mnist" and folder == DEFAULT_FASHION_MNIST.resolve():
                    folder = None  # the default data named explicitly: the same runs
            resolved[source] = (dataset, None if folder is None else str(folder))
        dataset, data_root = resolved[source]
        bound.append(dataclasses.replace(config, dataset=dataset, data_root=data_root))
    return bound


def run_sweep(
    configs: Sequence[RunConfig],
    output_dir: Path,
    *,
    device: torch.device | str = "cpu",
    dataset_root: str | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run every config not yet in ``output_dir/results.jsonl``; write the tables and plot.

    ``jobs > 1`` runs that many configs at once in worker processes of one thread each (CPU,
    single process only): on small CPUs this beats several threads per run, whose small
    per-layer operations parallelize poorly.  Invocations sharing ``output_dir`` share the
    work, each run trained once (:func:`_attempt`).  Returns the result rows of ``configs``,
    which, when it returns, include those that other invocations trained.
    """
    device = torch.device(device)
    rank, world = _rank()
    results_path = output_dir / "results.jsonl"
    configs = bind_data([dataclasses.replace(c, world_size=world) for c in configs], dataset_root)
    for config in configs:
        config.check()
    unique: dict[str, RunConfig] = {}
    for config in configs:  # a repeated config would race itself on one checkpoint
        unique.setdefault(config.key, config)
    configs = list(unique.values())
    if rank == 0:
        _set_aside_damaged(results_path)  # warned about once, here, and never read as rows
    if world == 1:
        done = {row["key"] for row in read_results(results_path)}
        todo = [c for c in configs if c.key not in done]
    else:  # rank 0 decides for every run: the ranks may read the file as another writes it
        todo = configs
    if jobs > 1 and world == 1 and device.type == "cpu" and todo:
        _run_parallel(todo, output_dir, jobs, checkpoint_every, progress)
    else:
        _run_serial(todo, output_dir, device, checkpoint_every, progress)
    if world > 1:
        dist.barrier()  # rank 0 has written every row before any rank reads them
    keys = {c.key for c in configs}
    rows = [row for row in read_results(results_path) if row["key"] in keys]
    if rank == 0 and rows:
        tables = format_tables(rows)
        atomic_write(output_dir / "results.md", lambda handle: handle.write(f"{tables}\n".encode()))
        plot_results(rows, output_dir / "error_vs_batch.png")
    return rows


def check_data(configs: Sequence[RunConfig]) -> None:
    """Raise :class:`OptionError` naming ``--train-samples`` if the training data of a run
    (``configs`` as :func:`bind_data` returns them) make no batch: such a run would fail
    only once the runs before it are trained.  Reads each dataset once, and keeps none.

    The rule is that of :func:`smallbn.experiments.sampling.shortfall`: an i.i.d. batch
    needs as many samples as the batch, a correlated one whole runs of ``class_group``
    samples of one class, so each class's leftover samples do not count.
    """
    sources: dict[tuple[str, str | None], list[RunConfig]] = {}
    for config in configs:
        sources.setdefault((config.dataset, config.data_root), []).append(config)
    for source, group in sources.items():
        data = load_dataset(*source)
        seen = set()
        for config in group:
            case = (config.train_samples, config.batch, config.class_group, config.composition)
            if case in seen:
                continue
            seen.add(case)
            problem = shortfall(
                data.train_y,
                config.train_samples,
                config.batch,
                config.class_group,
                config.composition,
            )
            if problem:
                raise OptionError("--train-samples", _no_batch(problem, config, data))


def _no_batch(problem: str, config: RunConfig, data: Dataset) -> str:
    """The message for a run whose training samples make no batch, with every fix: the
    least ``--train-samples`` that makes one, and the options that change the batch."""
    fixes = []
    if config.composition == "correlated":
        fixes.append("--compositions iid")
    if config.mode == "sgd":
        fixes.append("smaller --batch-sizes")
    least = samples_for_one_batch(
        data.train_y, config.batch, config.class_group, config.composition
    )
    if least is not None:
        fixes.append(f"--train-samples {least} or more (the least that makes one batch)")
    else:
        fixes.append(f"more training data than {data.name}, all of which makes no such batch")
    return f"{problem}, of {data.name} (run {config.tag}); pass {', or '.join(fixes)}"


# -- report ------------------------------------------------------------------------------------


def _summary(
    rows: Iterable[dict[str, Any]], metric: str
) -> dict[tuple[str, str, int], list[float]]:
    cells: dict[tuple[str, str, int], list[float]] = {}
    for row in rows:
        cells.setdefault((row["composition"], row["method"], row["norm_batch"]), []).append(
            100 * row[metric]
        )
    return cells


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per composition, test error (%) mean ± std over seeds by method × batch,
    with EMA statistics and after PreciseBN, and how much of BN's small-batch gap each
    method recovers."""
    out = []
    seeds = sorted({row["seed"] for row in rows})
    for metric, label in (("error_precise", "after PreciseBN"), ("error_ema", "EMA statistics")):
        cells = _summary(rows, metric)
        for composition in sorted({row["composition"] for row in rows}):
            sizes = sorted({k[2] for k in cells if k[0] == composition})
            methods = [m for m in METHODS if any(k[:2] == (composition, m) for k in cells)]
            out.append(
                f"**{composition} groups — test error (%), {label}, mean ± std over "
                f"{len(seeds)} seed(s)**\n"
            )
            out.append("| method | " + " | ".join(f"b={s}" for s in sizes) + " |")
            out.append("|---|" + "---|" * len(sizes))
            for method in methods:
                out.append(
                    f"| {method} | "
                    + " | ".join(_cell(cells.get((composition, method, s))) for s in sizes)
                    + " |"
                )
            out.append("")
            gap = _gap_table(cells, composition)
            if gap:
                out.extend([gap, ""])
    return "\n".join(out)


def _gap_table(cells: dict[tuple[str, str, int], list[float]], composition: str) -> str:
    """Share of the gap BN(b) − BN(largest b) that each method closes at batch b."""
    sizes = sorted({k[2] for k in cells if k[0] == composition and k[1] == "bn"})
    if len(sizes) < 2:
        return ""
    if not any(k[0] == composition and k[1] != "bn" for k in cells):
        return ""
    large = float(np.mean(cells[(composition, "bn", sizes[-1])]))
    lines = [f"gap recovered vs BN (BN@{sizes[-1]} = 100%, BN@b = 0%):", ""]
    lines.append("| method | " + " | ".join(f"b={s}" for s in sizes[:-1]) + " |")
    lines.append("|---|" + "---|" * (len(sizes) - 1))
    for method in METHODS:
        if method == "bn" or not any(k[:2] == (composition, method) for k in cells):
            continue
        parts = []
        for s in sizes[:-1]:
            values = cells.get((composition, method, s))
            small = float(np.mean(cells[(composition, "bn", s)]))
            if values is None or small - large <= 0:
                parts.append("–")
            else:
                parts.append(f"{100 * (small - np.mean(values)) / (small - large):.0f}%")
        lines.append(f"| {method} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Error (after PreciseBN) against normalization batch size, one line per method, one
    panel per composition (the MABN paper's figure)."""
    matplotlib = require("matplotlib", "the comparison plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _summary(rows, "error_precise")
    compositions = sorted({row["composition"] for row in rows})
    figure, axes = plt.subplots(
        1, len(compositions), figsize=(6 * len(compositions), 4.2), squeeze=False
    )
    for ax, composition in zip(axes[0], compositions, strict=True):
        for method in METHODS:
            points = sorted((k[2], v) for k, v in cells.items() if k[:2] == (composition, method))
            if not points:
                continue
            xs = [p[0] for p in points]
            means = [float(np.mean(p[1])) for p in points]
            stds = [float(np.std(p[1])) for p in points]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("normalization batch size")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{composition} groups")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
    return path


def setup_distributed(device: str) -> torch.device:
    """Under torchrun: init the process group (NCCL on CUDA, else gloo) and return this
    process's device; otherwise the requested device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(device)
