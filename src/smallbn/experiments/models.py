"""A small ResNet whose every norm layer comes from :func:`smallbn.build_norm`, so any
method plugs in unchanged (He et al., 2016, CIFAR-style: 3 stages of basic blocks)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from smallbn.registry import NormSpec, build_norm

__all__ = ["BasicBlock", "SmallResNet"]


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus a (projected) shortcut, → ReLU."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        norm: NormSpec,
        norm_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = build_norm(norm, channels, **norm_kwargs)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = build_norm(norm, channels, **norm_kwargs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                build_norm(norm, channels, **norm_kwargs),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for small images: stem conv, stages of ``widths`` channels (strides 1, 2, 2…)
    with ``blocks`` basic blocks each, global average pooling and a linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: int = 1,
        norm: NormSpec = "bn",
        norm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(norm_kwargs or {})
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_norm = build_norm(norm, widths[0], **kwargs)
        stages = []
        channels = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(channels, width, stride, norm, kwargs))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))
