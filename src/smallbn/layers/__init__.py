"""Normalization layers: one file per method, all on the shared statistics core."""

from smallbn.layers._base import BatchStatsNorm, NormBase, check_finite, set_finite_check
from smallbn.layers.batch_renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from smallbn.layers.centered_conv import CenteredConv1d, CenteredConv2d, CenteredConv3d
from smallbn.layers.cross_iteration import (
    CrossIterationBatchNorm,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
)
from smallbn.layers.domain import (
    DomainBatchNorm,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    use_domain,
)
from smallbn.layers.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from smallbn.layers.ghost import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
from smallbn.layers.group_norm import GroupNorm, InstanceNorm, LayerNorm
from smallbn.layers.grouped import GroupedNorm
from smallbn.layers.moving_average import (
    MovingAverageBatchNorm,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)
from smallbn.layers.shuffle import (
    ShuffleBatchNorm,
    ShuffleBatchNorm1d,
    ShuffleBatchNorm2d,
    ShuffleBatchNorm3d,
)
from smallbn.layers.switchable import (
    SwitchableNorm,
    SwitchableNorm1d,
    SwitchableNorm2d,
    SwitchableNorm3d,
)
from smallbn.layers.sync import SyncBatchNorm

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchStatsNorm",
    "CenteredConv1d",
    "CenteredConv2d",
    "CenteredConv3d",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
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
    "GroupedNorm",
    "InstanceNorm",
    "LayerNorm",
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "NormBase",
    "ShuffleBatchNorm",
    "ShuffleBatchNorm1d",
    "ShuffleBatchNorm2d",
    "ShuffleBatchNorm3d",
    "SwitchableNorm",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
    "SyncBatchNorm",
    "check_finite",
    "set_finite_check",
    "use_domain",
]
