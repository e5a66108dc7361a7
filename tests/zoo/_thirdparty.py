"""Import the zoo's third-party libraries (torchvision, timm, segmentation_models_pytorch,
mmengine, lightning) for the tests, or skip with the reason.

This is test infrastructure only: smallbn itself never imports any of these packages.

torchvision on a CPU-only torch
-------------------------------
PyPI's torchvision 0.28.0 (the release for torch 2.13) is a CUDA build: its compiled ops,
``torchvision/_C.so``, do not load beside the CPU torch wheel (``OSError: Could not load this
library``).  torchvision itself copes with that (``torchvision.extension._has_ops()`` is then
False) except in one place: ``import torchvision`` imports ``torchvision._meta_registrations``,
which registers fake (meta) kernels for ``torchvision::nms``, ``roi_align`` and the other
compiled ops and fails with ``RuntimeError: operator torchvision::nms does not exist``.
Checked against torchvision 0.28.0, the only things needed are therefore:

* ``torchvision._meta_registrations`` replaced by an empty module in ``sys.modules`` before
  the first import (it only registers meta kernels for the compiled ops, which do not exist
  here).  ``torchvision._autograd_registrations`` needs no stub: its registrations are guarded
  by ``if torchvision.extension._has_ops():`` and are skipped.
* ``torchvision.ops.nms`` (and ``batched_nms``, which calls the module-level ``nms`` of
  ``torchvision.ops.boxes``) replaced by :func:`nms`, a pure-torch greedy NMS: the
  detection models' RPN and box heads call it.
* ``roi_align`` (the Faster/Mask R-CNN box and mask heads through ``MultiScaleRoIAlign``, and
  Mask R-CNN's mask targets): without compiled ops torchvision falls back to ``_roi_align``,
  its own pure-torch port of the CUDA kernel, wrapped in a lazy ``torch.compile`` (minutes of
  compilation on a 2-core CPU).  Uncompiled, its adaptive sampling (``sampling_ratio <= 0``,
  the mask targets) samples every pixel of the input for every RoI and masks the excess:
  ~10 s per Mask R-CNN step on a 64×64 image.  :func:`roi_align` computes the same samples
  with each RoI's own grid (RoIs grouped by grid size), through torchvision's own
  ``_bilinear_interpolate``; differentiable, and checked against the uncompiled fallback in
  ``test_thirdparty.py``.

Everything else the zoo uses (the classification, segmentation and detection models,
``torchvision.ops.FrozenBatchNorm2d``, ``misc.Conv2dNormActivation``, the FPN) is pure Python.
With a torchvision whose ops load (a CPU build, or CUDA), nothing is patched.

Packages that are missing or fail to import skip the tests that need them (like
``pytest.importorskip``), with the reason, so the rest of the suite runs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

__all__ = [
    "import_or_skip",
    "lightning",
    "mmengine",
    "nms",
    "roi_align",
    "smp",
    "timm",
    "torchvision",
]


#: What was replaced, by name (torchvision's uncompiled ``_roi_align``, for the tests).
REPLACED: dict[str, Any] = {}


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression in pure torch, ``torchvision.ops.nms``'s contract: the
    indices of the kept boxes (``(x1, y1, x2, y2)``), by decreasing score; a box is dropped
    when its IoU with a kept box of higher score exceeds ``iou_threshold``."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order].float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    iou = inter / (areas[:, None] + areas[None, :] - inter).clamp(min=torch.finfo(inter.dtype).tiny)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    overlaps = (iou > iou_threshold).tolist()
    removed = suppressed.tolist()
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        row = overlaps[i]
        for j in range(i + 1, len(order)):
            if row[j]:
                removed[j] = True
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def roi_align(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """``torchvision.ops.roi_align._roi_align`` (same arguments, ``rois`` as ``(K, 5)``:
    batch index, x1, y1, x2, y2) with each RoI sampled on its own grid (module docstring)."""
    interpolate = sys.modules["torchvision.ops.roi_align"]._bilinear_interpolate
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_w
    roi_h = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
    else:  # adaptive: ceil(roi size / pooled size) samples per bin and dimension
        grid_h = torch.ceil(roi_h / pooled_height).long()
        grid_w = torch.ceil(roi_w / pooled_width).long()
    output = input.new_zeros(len(rois), input.shape[1], pooled_height, pooled_width)
    ph = torch.arange(pooled_height, device=input.device, dtype=input.dtype)
    pw = torch.arange(pooled_width, device=input.device, dtype=input.dtype)
    for gh, gw in {(int(h), int(w)) for h, w in zip(grid_h.tolist(), grid_w.tolist(), strict=True)}:
        k = ((grid_h == gh) & (grid_w == gw)).nonzero().flatten()
        iy = torch.arange(gh, device=input.device, dtype=input.dtype)
        ix = torch.arange(gw, device=input.device, dtype=input.dtype)
        y = (
            start_h[k, None, None]
            + ph[None, :, None] * bin_h[k, None, None]
            + (iy[None, None, :] + 0.5) * (bin_h[k] / max(gh, 1))[:, None, None]
        )
        x = (
            start_w[k, None, None]
            + pw[None, :, None] * bin_w[k, None, None]
            + (ix[None, None, :] + 0.5) * (bin_w[k] / max(gw, 1))[:, None, None]
        )
        values = interpolate(input, rois[k, 0].int(), y, x, None, None)  # [k, C, PH, PW, gh, gw]
        output = output.index_copy(0, k, values.sum((-1, -2)) / max(gh * gw, 1))
    return output


def _skip(package: str, error: BaseException) -> None:
    first = f"{type(error).__name__}: {error}".splitlines()[0]
    pytest.skip(
        f"{package} is not importable ({first}); install the test extra: "
        f"pip install --constraint constraints.txt -e '.[test]'",
        allow_module_level=True,
    )


def import_or_skip(name: str) -> Any:
    """``importlib.import_module(name)``, or skip the calling test with the reason (any
    exception of the import, not only ``ImportError``: a broken binary raises others)."""
    torchvision()  # the other packages import torchvision: make it importable first
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any failure of the import means "skip"
        _skip(name, error)
        raise  # unreachable: pytest.skip raises


def _compiled_ops_load() -> bool:
    """Whether torchvision's ``_C`` extension loads, found and loaded the way
    ``torchvision.extension`` does, without importing torchvision (whose import fails here)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            library = Path(folder) / f"_C{suffix}"
            if library.is_file():
                try:
                    torch.ops.load_library(str(library))
                except (ImportError, OSError):
                    return False
                return True
    return False


@functools.cache
def _import_torchvision() -> types.ModuleType | BaseException:
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        if not _compiled_ops_load():
            # Its meta kernels are for ops that did not load (module docstring).
            name = "torchvision._meta_registrations"
            stub = types.ModuleType(name)
            stub.__doc__ = "Empty: torchvision's compiled ops did not load (tests/zoo)."
            sys.modules.setdefault(name, stub)
    try:
        import torchvision
        import torchvision.ops
        import torchvision.ops.boxes
        import torchvision.ops.roi_align
    except Exception as error:  # noqa: BLE001 - any failure of the import means "skip"
        return error
    if not torchvision.extension._has_ops():
        # The modules, from sys.modules: torchvision.ops.roi_align is also the function's name.
        boxes = sys.modules["torchvision.ops.boxes"]
        boxes.nms = nms  # batched_nms looks it up here
        torchvision.ops.nms = nms
        module = sys.modules["torchvision.ops.roi_align"]
        uncompiled = getattr(module._roi_align, "__wrapped__", module._roi_align)
        REPLACED["roi_align"] = uncompiled
        # another torchvision without _bilinear_interpolate: at least not compiled
        module._roi_align = roi_align if hasattr(module, "_bilinear_interpolate") else uncompiled
    return torchvision


def torchvision() -> types.ModuleType:
    """torchvision, made importable on a CPU torch (module docstring), or skip."""
    module = _import_torchvision()
    if isinstance(module, BaseException):
        _skip("torchvision", module)
    assert isinstance(module, types.ModuleType)
    return module


def timm() -> types.ModuleType:
    return import_or_skip("timm")


def smp() -> types.ModuleType:
    return import_or_skip("segmentation_models_pytorch")


def mmengine() -> types.ModuleType:
    return import_or_skip("mmengine")


def lightning() -> types.ModuleType:
    return import_or_skip("lightning")
