"""The stand-ins of ``_thirdparty`` for torchvision's compiled ops agree with references."""

from __future__ import annotations

import _thirdparty as thirdparty
import pytest
import torch

pytestmark = pytest.mark.zoo


def _reference_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Greedy NMS, one box at a time."""

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
        h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
        inter = w * h
        area = lambda t: float((t[2] - t[0]) * (t[3] - t[1]))  # noqa: E731
        return inter / (area(a) + area(b) - inter)

    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        if all(iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_greedy_reference(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(40, 2, generator=generator) * 50
    sizes = torch.rand(40, 2, generator=generator) * 20 + 1
    boxes = torch.cat([corners, corners + sizes], 1)
    scores = torch.rand(40, generator=generator)
    assert thirdparty.nms(boxes, scores, 0.3).tolist() == _reference_nms(boxes, scores, 0.3)
    assert thirdparty.nms(boxes[:0], scores[:0], 0.3).numel() == 0


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_torchvision_fallback(sampling_ratio: int, aligned: bool) -> None:
    tv = thirdparty.torchvision()
    if tv.extension._has_ops():
        pytest.skip("torchvision's compiled ops load here: nothing is replaced")
    reference = thirdparty.REPLACED["roi_align"]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 16, 20, generator=generator, requires_grad=True)
    corners = torch.rand(7, 2, generator=generator) * 12
    sizes = torch.rand(7, 2, generator=generator) * 10 + 0.5
    rois = torch.cat([torch.tensor([0, 1, 1, 0, 1, 0, 1.0])[:, None], corners, corners + sizes], 1)
    args = (0.5, 5, 4, sampling_ratio, aligned)
    got = thirdparty.roi_align(features, rois, *args)
    expected = reference(features, rois, *args)
    torch.testing.assert_close(got, expected)
    grad = torch.randn(got.shape, generator=generator)
    (got_grad,) = torch.autograd.grad(got, features, grad)
    (expected_grad,) = torch.autograd.grad(expected, features, grad)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.parametrize(
    "package", ["torchvision", "timm", "segmentation_models_pytorch", "mmengine", "lightning"]
)
def test_test_extra_imports(package: str) -> None:
    """Each package of the test extra imports here (lightning and timm import torchvision, so
    this needs the torchvision shim too), or the test is skipped naming the reason."""
    module = thirdparty.import_or_skip(package)
    assert module.__version__
