"""The zoo: third-party architectures as people train them, at toy sizes.

``ARCHITECTURES`` maps a name to an :class:`Architecture`: a factory that builds the model with
random weights (``weights=None``, ``weights_backbone=None``, ``pretrained=False``,
``encoder_weights=None``: nothing is downloaded), and the *task* that says how a batch is made,
how the training loss is computed and which tensors an eval forward is compared on.  Inputs
are 64×64 (stride-32 backbones end at 2×2, so a batch of one still has several values per
channel in the last stage).

Families (``family``): ``torchvision`` (classification and segmentation), ``detection``
(torchvision's R-CNNs: lists of images, target dicts, a dict of losses), ``timm`` and ``smp``.
``ci=True`` marks the one architecture per family that ``make test`` runs with every method;
``make test-zoo`` runs them all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _thirdparty as thirdparty
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = 64
CLASSES = 3  # classification logits, segmentation classes, detection classes (background included)


# -- tasks: batches, losses, compared outputs -------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    #: batch(n, generator) -> (input, target); the input is what the model is called with
    batch: Callable[[int, torch.Generator], tuple[Any, Any]]
    #: loss(model, input, target) -> scalar, the model in training mode
    loss: Callable[[nn.Module, Any, Any], Tensor]
    #: outputs(model, input) -> tensors an eval forward is compared on, the model in eval mode
    outputs: Callable[[nn.Module, Any], list[Tensor]]


def _images(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=generator)


def _classification_batch(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return _images(n, generator), torch.randint(0, CLASSES, (n,), generator=generator)


def _segmentation_batch(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return _images(n, generator), torch.randint(0, CLASSES, (n, SIZE, SIZE), generator=generator)


def _logits(output: Any) -> Tensor:
    # torchvision's segmentation models return {"out": ..., ("aux": ...)}
    return output["out"] if isinstance(output, dict) else output


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(_logits(model(x)), y)


def _dense_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    return [_logits(model(x))]


# Detection: the model takes a list of images (values in [0, 1]) and, in training mode, one
# target dict per image; it returns a dict of losses in training and detections in eval.
_BOXES = torch.tensor([[6.0, 8.0, 38.0, 44.0], [24.0, 20.0, 60.0, 58.0]])


def _detection_batch(
    n: int, generator: torch.Generator, *, masks: bool
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images = [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(n)]
    targets = []
    for i in range(n):
        boxes = _BOXES + i  # distinct targets per image
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if masks:
            mask = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                mask[k, y1:y2, x1:x2] = 1
            target["masks"] = mask
        targets.append(target)
    return images, targets


def _detection_loss(model: nn.Module, images: list[Tensor], targets: list[dict]) -> Tensor:
    losses = model(images, targets)
    return sum(losses.values())  # type: ignore[return-value]


def _detection_outputs(model: nn.Module, images: list[Tensor]) -> list[Tensor]:
    """The dense tensors of an eval forward: every feature map the backbone (where all the
    norms are) returns and the RPN head's objectness and box deltas.  The final detections
    go through top-k and NMS, where a last-digit change can swap two boxes, so they are not
    compared."""
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        leaves = output.values() if isinstance(output, dict) else output
        for leaf in leaves:
            captured.extend(leaf if isinstance(leaf, (list, tuple)) else [leaf])

    handles = [
        model.backbone.register_forward_hook(keep),
        model.rpn.head.register_forward_hook(keep),
    ]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


CLASSIFICATION = Task("classification", _classification_batch, _cross_entropy, _dense_outputs)
SEGMENTATION = Task("segmentation", _segmentation_batch, _cross_entropy, _dense_outputs)
DETECTION = Task(
    "detection",
    functools.partial(_detection_batch, masks=False),
    _detection_loss,
    _detection_outputs,
)
INSTANCE_SEGMENTATION = Task(
    "instance segmentation",
    functools.partial(_detection_batch, masks=True),
    _detection_loss,
    _detection_outputs,
)


# -- architectures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    build: Callable[[], nn.Module]
    task: Task
    ci: bool = False


def _torchvision_classifier(name: str) -> nn.Module:
    tv = thirdparty.torchvision()
    return tv.models.get_model(name, weights=None, num_classes=CLASSES)


def _deeplabv3() -> nn.Module:
    tv = thirdparty.torchvision()
    return tv.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False
    )


# Small proposal and RoI budgets and narrow heads: the heads have no norms, the backbones are
# what is tested.
_RCNN_OPTIONS: dict[str, Any] = {
    "min_size": SIZE,
    "max_size": SIZE,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
}
_HIDDEN = 64


def _box_heads(channels: int) -> dict[str, nn.Module]:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    return {
        "box_head": TwoMLPHead(channels * 7 * 7, _HIDDEN),
        "box_predictor": FastRCNNPredictor(_HIDDEN, CLASSES),
    }


def _fasterrcnn_mobilenet() -> nn.Module:
    tv = thirdparty.torchvision()
    # weights_backbone defaults to ImageNet weights: None, or it would download them.  With
    # no weights the backbone has BatchNorm2d (FrozenBatchNorm2d with them) and every layer
    # trains.
    model = tv.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=CLASSES, **_RCNN_OPTIONS
    )
    for name, head in _box_heads(256).items():  # the builder takes no box head
        setattr(model.roi_heads, name, head)
    return model


def _maskrcnn_resnet18_frozen() -> nn.Module:
    """Mask R-CNN on a ResNet-18-FPN whose norms are torchvision's FrozenBatchNorm2d, as
    torchvision builds every detection backbone from pretrained weights (conv1 and layer1
    frozen, as ``trainable_layers=3``).  The frozen statistics are those of a BN ResNet-18 on
    random images (what a pretrained backbone brings: statistics that match its
    activations).  The FPN and heads are narrow (64 channels)."""
    tv = thirdparty.torchvision()
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d

    generator = torch.Generator().manual_seed(0)
    source = tv.models.resnet18(weights=None)
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of these batches
    with torch.no_grad():
        source.train()
        for _ in range(2):
            source(torch.randn(4, 3, SIZE, SIZE, generator=generator))
    body = tv.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    body.load_state_dict(source.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked
    for name, parameter in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            parameter.requires_grad_(False)
    layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    backbone = BackboneWithFPN(body, layers, [64, 128, 256, 512], _HIDDEN)
    return tv.models.detection.MaskRCNN(
        backbone,
        num_classes=None,
        **_box_heads(_HIDDEN),
        mask_head=MaskRCNNHeads(_HIDDEN, [_HIDDEN, _HIDDEN], 1),
        mask_predictor=MaskRCNNPredictor(_HIDDEN, _HIDDEN, CLASSES),
        **_RCNN_OPTIONS,
    )


def _timm(name: str) -> nn.Module:
    timm = thirdparty.timm()
    return timm.create_model(name, pretrained=False, num_classes=CLASSES)


def _smp(kind: str, encoder: str) -> nn.Module:
    smp = thirdparty.smp()
    return getattr(smp, kind)(encoder_name=encoder, encoder_weights=None, classes=CLASSES)


def _zoo() -> list[Architecture]:
    tv, timm, smp, p = "torchvision", "timm", "smp", functools.partial
    zoo = [
        Architecture(f"tv_{name}", tv, p(_torchvision_classifier, name), CLASSIFICATION)
        for name in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0")
    ]
    zoo += [
        Architecture(
            "tv_regnet_y_400mf", tv, p(_torchvision_classifier, "regnet_y_400mf"), CLASSIFICATION
        ),
        Architecture("tv_deeplabv3_mobilenet_v3_large", tv, _deeplabv3, SEGMENTATION),
        Architecture(
            "tv_fasterrcnn_mobilenet_v3_large_fpn", "detection", _fasterrcnn_mobilenet, DETECTION
        ),
        Architecture(
            "tv_maskrcnn_resnet18_fpn_frozenbn",
            "detection",
            _maskrcnn_resnet18_frozen,
            INSTANCE_SEGMENTATION,
        ),
    ]
    zoo += [
        Architecture(f"timm_{name}", timm, p(_timm, name), CLASSIFICATION)
        for name in (
            "resnet18",
            "efficientnet_b0",
            "mobilenetv3_small_050",
            "regnetx_002",
            "cs3darknet_s",
            "tf_efficientnet_b0",
            "convnext_atto",
        )
    ]
    zoo += [
        Architecture("smp_unet_resnet18", smp, p(_smp, "Unet", "resnet18"), SEGMENTATION),
        Architecture("smp_fpn_resnet18", smp, p(_smp, "FPN", "resnet18"), SEGMENTATION),
        Architecture(
            "smp_unet_tu_efficientnet_b0", smp, p(_smp, "Unet", "tu-efficientnet_b0"), SEGMENTATION
        ),
    ]
    return [dataclasses.replace(a, ci=a.name in CI) for a in zoo]


#: One architecture per family runs in ``make test``: the cheapest of each that exercises its
#: family's own code path (timm: BatchNormAct2d; detection: image lists, targets, loss dicts).
CI = {
    "tv_resnet18",
    "tv_fasterrcnn_mobilenet_v3_large_fpn",
    "timm_mobilenetv3_small_050",
    "smp_unet_resnet18",
}
_ZOO = _zoo()
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _ZOO}
assert len(ARCHITECTURES) == len(_ZOO), "duplicate architecture names"
