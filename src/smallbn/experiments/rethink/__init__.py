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

Where things are: :mod:`.config` (a run's settings and rules), :mod:`.planning` (the presets
and the plan), :mod:`.running` (running, skipping and resuming runs), :mod:`.training` (the
network, the schedule and the training loop every study uses), :mod:`.checkpoint`,
:mod:`.images` (subsets, shifted copies, streams), :mod:`.evaluation`; one module per study
(:mod:`.ema`, :mod:`.inconsistency`, :mod:`.domain`, :mod:`.leakage`: its runs, findings,
report table and figure); :mod:`.verdicts` (findings and their verdicts) and :mod:`.report`
(the reports and figures).

Robustness and concurrency are the comparison job's (:mod:`smallbn.experiments.compare`): a
run is claimed (``checkpoints/<tag>.lock``) before it is trained, checkpointed atomically
every ``checkpoint_every`` steps, at the end of every epoch (with what it has measured so far)
and between its stages; a rerun skips finished runs and resumes an interrupted one; damaged
lines of ``results.jsonl`` are set aside; invocations sharing an output folder train each run
once.  Single process, except the leakage study, which also runs under ``torchrun``.
"""

from smallbn.experiments.rethink.config import (
    GHOST_DEVICES,
    LEAKAGE_VARIANTS,
    SHIFTS,
    STUDIES,
    StudyConfig,
)
from smallbn.experiments.rethink.images import shift_images
from smallbn.experiments.rethink.planning import PRESETS, check_data, plan
from smallbn.experiments.rethink.report import findings, format_report, plot_study, write_report
from smallbn.experiments.rethink.running import ROW_FIELDS, read_study, run_one, run_studies
from smallbn.experiments.rethink.verdicts import TOLERANCE, Finding

__all__ = [
    "GHOST_DEVICES",
    "LEAKAGE_VARIANTS",
    "PRESETS",
    "ROW_FIELDS",
    "SHIFTS",
    "STUDIES",
    "TOLERANCE",
    "Finding",
    "StudyConfig",
    "check_data",
    "findings",
    "format_report",
    "plan",
    "plot_study",
    "read_study",
    "run_one",
    "run_studies",
    "shift_images",
    "write_report",
]
