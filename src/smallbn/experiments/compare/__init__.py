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

The job is split by concern: :mod:`.configs` (the runs and presets), :mod:`.training` (one
run), :mod:`.results` (``results.jsonl``), :mod:`.sweep` (which runs, where, claimed how) and
:mod:`.report` (tables and plot); every name is importable from here.
"""

from __future__ import annotations

# The private names re-exported below (``_attempt``, ``_run_parallel``, ...) are the machinery
# `smallbn rethink` shares (claims, checkpoints, workers, results), by the names it has always
# imported from here.
from smallbn.experiments.compare import configs, report, results, sweep, training
from smallbn.experiments.compare.configs import *  # noqa: F403
from smallbn.experiments.compare.report import *  # noqa: F403
from smallbn.experiments.compare.results import *  # noqa: F403
from smallbn.experiments.compare.results import _set_aside_damaged as _set_aside_damaged
from smallbn.experiments.compare.sweep import *  # noqa: F403
from smallbn.experiments.compare.sweep import _attempt as _attempt
from smallbn.experiments.compare.sweep import _run_parallel as _run_parallel
from smallbn.experiments.compare.sweep import _run_serial as _run_serial
from smallbn.experiments.compare.sweep import _worker_dataset as _worker_dataset
from smallbn.experiments.compare.training import *  # noqa: F403
from smallbn.experiments.compare.training import _checkpoint_path as _checkpoint_path
from smallbn.experiments.compare.training import _differences as _differences
from smallbn.experiments.compare.training import _rank as _rank
from smallbn.experiments.compare.training import _save_checkpoint as _save_checkpoint
from smallbn.experiments.data import DEFAULT_FASHION_MNIST as DEFAULT_FASHION_MNIST

__all__ = [*configs.__all__, *training.__all__, *results.__all__, *sweep.__all__, *report.__all__]
