"""smallbn: batch normalization that works when the batch is small.

Layers (:mod:`smallbn.layers`) are built on one statistics core (:mod:`smallbn.stats`);
:func:`build_norm` makes one by name and :func:`convert` swaps every norm layer of a model.
"""

from smallbn.convert import (
    Converted,
    bind_producers,
    convert,
    convert_with_report,
    freeze_norms,
    is_norm_layer,
    uses_batch_stats,
)
from smallbn.fold import FoldReport, fold, fold_with_report
from smallbn.layers import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    DomainBatchNorm,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    SwitchableNorm,
    SwitchableNorm1d,
    SwitchableNorm2d,
    SwitchableNorm3d,
    SyncBatchNorm,
    set_finite_check,
    use_domain,
)
from smallbn.population import FreezeNormsAt, batch_stats_eval, precise_bn
from smallbn.recorder import Recording, StatsRecorder, plot_stats
from smallbn.registry import available_norms, build_norm, register_norm, resolve_norm

__version__ = "0.1.0"

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "Converted",
    "FoldReport",
    "FreezeNormsAt",
    "DomainBatchNorm",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "Recording",
    "StatsRecorder",
    "SwitchableNorm",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
    "SyncBatchNorm",
    "available_norms",
    "bind_producers",
    "batch_stats_eval",
    "build_norm",
    "convert",
    "convert_with_report",
    "fold",
    "fold_with_report",
    "freeze_norms",
    "is_norm_layer",
    "plot_stats",
    "precise_bn",
    "register_norm",
    "resolve_norm",
    "set_finite_check",
    "use_domain",
    "uses_batch_stats",
]
