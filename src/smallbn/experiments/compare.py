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
  progress checkpoints atomically every ``checkpoint_every`` steps.  Rerunning the same
  command skips finished runs and resumes an interrupted one from its checkpoint: nothing
  lost, nothing duplicated.
* **Scale-out.** Under ``torchrun`` every process trains its share of each SGD batch (whole
  groups) with DistributedDataParallel (gloo on CPU, NCCL on GPU); ``sync=True`` makes the
  norm layers pool statistics across processes.  Rank 0 writes the results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from smallbn._io import atomic_write, exclusive_lock
from smallbn.convert import bind_producers, uses_batch_stats
from smallbn.experiments.data import (
    DEFAULT_FASHION_MNIST,
    Dataset,
    load_dataset,
    resolve_dataset,
)
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.sampling import COMPOSITIONS, batch_indices, steps_per_epoch
from smallbn.experiments.train import evaluate
from smallbn.population import precise_bn
from smallbn.registry import build_norm

__all__ = [
    "METHODS",
    "MODES",
    "PRESETS",
    "CheckpointError",
    "RunConfig",
    "bind_data",
    "format_tables",
    "plot_results",
    "preset_configs",
    "read_results",
    "run_sweep",
]

#: Job method name → registry name.  In ``groups`` mode BN is Ghost BN with groups of b and
#: BRN/SN/MABN/CBN group natively (``norm_batch_size``; for CBN and MABN the groups are
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
}
_NATIVE_GROUPS = {"brn", "sn", "mabn", "cbn", "naive"}
#: Methods that normalize each sample alone: the batch they see does not matter.
_SAMPLE_WISE = {"gn", "ln", "in"}
MODES = ("groups", "sgd")


class CheckpointError(RuntimeError):
    """A run's checkpoint cannot be resumed from (damaged, or from another version)."""


@dataclass(frozen=True)
class RunConfig:
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

    def identity(self) -> dict[str, Any]:
        """The fields that make up :attr:`key`: every field, but ``data_root`` only when one
        was given, so the keys (and checkpoint tags) of runs on the default data stay those
        of the results recorded before the field existed."""
        fields = dataclasses.asdict(self)
        if fields["data_root"] is None:
            del fields["data_root"]
        return fields

    @property
    def key(self) -> str:
        return json.dumps(self.identity(), sort_keys=True)

    @property
    def tag(self) -> str:
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        return f"{self.method}-b{self.norm_batch}-{self.composition}-s{self.seed}-{digest}"

    @property
    def batch(self) -> int:
        """SGD batch size."""
        return self.sgd_batch if self.mode == "groups" else self.norm_batch

    def check(self) -> None:
        """Raise ValueError, stating the rule, if this run would not train what it is
        labelled as (a short group, a normalization batch other than ``norm_batch``, i.i.d.
        batches labelled correlated, an SGD batch that does not split over the processes)."""
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
    """Train and evaluate one config, resuming from ``checkpoint`` if it exists."""
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
    bind_producers(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    start, elapsed, loss_value = 0, 0.0, float("nan")
    if checkpoint.exists():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start, elapsed, loss_value = state["step"], state["elapsed"], state["loss"]
        except Exception as error:  # any failure to resume: the file is the problem
            raise CheckpointError(
                f"{checkpoint}: cannot resume {config.tag} from this checkpoint "
                f"({type(error).__name__}: {error}); delete the file to restart that run "
                f"from scratch"
            ) from error
    trained: nn.Module = model
    if world > 1:
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
        if rank == 0 and (done % checkpoint_every == 0 and done < total):
            loss_value = float(loss.detach())
            _save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": done,
                    "elapsed": elapsed + time.perf_counter() - began,
                    "loss": loss_value,
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


def read_results(path: Path) -> list[dict[str, Any]]:
    """The finished runs in ``results.jsonl`` (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one line atomically: the file is rewritten to a temporary and renamed, so a
    kill at any moment leaves either the old or the new file, never half a line.  The
    read-modify-write holds an exclusive lock on ``<name>.lock`` beside it, so concurrent
    invocations writing the same results never drop each other's rows."""
    with exclusive_lock(path.with_name(path.name + ".lock")):
        lines = [json.dumps(r, sort_keys=True) for r in read_results(path)]
        lines.append(json.dumps(row, sort_keys=True))
        atomic_write(path, lambda handle: handle.write(("\n".join(lines) + "\n").encode()))


@functools.lru_cache(maxsize=2)
def _worker_dataset(name: str, root: str | None) -> Dataset:
    """A worker process reads (and checks) the data once, not once per run."""
    return load_dataset(name, root)


def _worker_run(config: RunConfig, output_dir: Path, checkpoint_every: int) -> dict[str, Any]:
    """One run in a worker process of a parallel sweep (one thread each)."""
    torch.set_num_threads(1)
    data = _worker_dataset(config.dataset, config.data_root)
    checkpoint = output_dir / "checkpoints" / f"{config.tag}.pt"
    row = run_one(
        config,
        data,
        checkpoint,
        device=torch.device("cpu"),
        checkpoint_every=checkpoint_every,
        progress=False,
    )
    return row


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
) -> None:
    """Run ``todo`` in ``jobs`` worker processes, recording each result as it completes.

    When a run fails, the runs not yet started are cancelled, those in progress finish and
    are recorded (their work is not thrown away), and then the first failure is raised.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_die_with_parent)
    first_error: BaseException | None = None
    bar = tqdm(total=len(todo), desc="runs", disable=not progress)
    try:
        futures: dict[Future[dict[str, Any]], RunConfig] = {
            pool.submit(_worker_run, c, output_dir, checkpoint_every): c for c in todo
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                bar.update(1)
                config = futures[future]
                error = future.exception()
                if error is None:
                    _append_result(output_dir / "results.jsonl", future.result())
                    (output_dir / "checkpoints" / f"{config.tag}.pt").unlink(missing_ok=True)
                    continue
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
    per-layer operations parallelize poorly.  Returns the result rows of ``configs``.
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
    done = {row["key"] for row in read_results(results_path)}
    todo = [c for c in configs if c.key not in done]
    datasets: dict[tuple[str, str | None], Dataset] = {}
    if jobs > 1 and world == 1 and device.type == "cpu" and todo:
        _run_parallel(todo, output_dir, jobs, checkpoint_every, progress)
        todo = []
    for config in tqdm(todo, desc="runs", disable=not progress or rank != 0):
        source = (config.dataset, config.data_root)
        if source not in datasets:
            datasets[source] = load_dataset(*source)
        checkpoint = output_dir / "checkpoints" / f"{config.tag}.pt"
        row = run_one(
            config,
            datasets[source],
            checkpoint,
            device=device,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
        if rank == 0:
            _append_result(results_path, row)
            checkpoint.unlink(missing_ok=True)
        if world > 1:
            dist.barrier()
    keys = {c.key for c in configs}
    rows = [row for row in read_results(results_path) if row["key"] in keys]
    if rank == 0 and rows:
        tables = format_tables(rows)
        (output_dir / "results.md").write_text(tables + "\n")
        plot_results(rows, output_dir / "error_vs_batch.png")
    return rows


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
    import matplotlib

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
