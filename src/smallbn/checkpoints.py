"""The authors' released models in smallbn: Switchable Normalization, MABN and Cross-Iteration
BN checkpoints mapped onto torchvision's ResNet layout, with the releases' inference kept.

Each release saved its models in its own layout (module names, parameter shapes, extra
buffers, a training wrapper around the weights).  The functions here read such a file, rename
its keys to those of a torchvision ``resnet50``/``resnet101`` whose norm layers are smallbn's
(:func:`smallbn.convert`), reshape what differs, carry the method's state over, and say what
they dropped and why.  :func:`load_release` does it all on a torchvision model;
:func:`release_state_dict` returns the converted ``state_dict`` (``smallbn
import-checkpoint`` writes it), with the layer options that reproduce the release's inference;
:func:`sn_state_dict`, :func:`mabn_state_dict` and :func:`cbn_state_dict` are the same for one
release each (every layout of that release is recognised from its keys).

The layouts, read from the authors' public code (``switchablenorms/Switchable-Normalization``,
``switchablenorms/SwitchNorm_Detection``, ``megvii-model/MABN``,
``Howal/Cross-iterationBatchNorm``):

* **SN** (Luo et al., ICLR 2019), ImageNet ResNet-50/101 *v1* (``resnetv1sn50``, …).  Per
  layer ``weight``/``bias`` (1, C, 1, 1), ``running_mean``/``running_var`` (1, C, 1) (absent
  without the BN branch, ``using_bn=False``), ``mean_weight``/``var_weight``: logits in the
  order IN, LN, BN (3, or 2 without BN).  Module names are torchvision's with ``snK`` for
  ``bnK``; files are ``{"state_dict": …, "epoch", "best_prec1", "optimizer", …}`` with
  DataParallel's ``module.`` prefix.  SwitchNorm_Detection's ``convert.py`` output
  (``{"model": …}``, keys ``Conv_Body[.conv_body].res{1..5}…``) is read too.  Inference: IN's
  variance is ``torch.var``'s Bessel-corrected one (divisor M − 1) and LN's and BN's are built
  from it — smallbn's SN with ``unbiased_instance_var=True`` computes exactly that (eps after
  the mixture, inside the root, as smallbn's).  The *v2* (pre-activation) models have another
  topology (bare-conv shortcut, ``sn_out``) and are refused.
* **MABN** (Yan et al., ICLR 2020).  Per layer ``weight``/``bias`` (C,), ``running_var`` (C,)
  (classification) or (1, C, 1, 1) (detection, the "formal" ``MABN.py``) holding the moving
  average of E[x²], no ``running_mean``, and training-only SMA buffers (``sta_matrix``,
  ``pre_x2``, ``pre_gz``, ``iters``, ``buffer_x2``, ``buffer_gz``).  Every convolution is a
  weight-centred ``CenConv2d`` storing its *uncentred* weight and centring it in each forward,
  as smallbn's :class:`~smallbn.CenteredConv2d` does.  Classification files use torchvision's
  names (``{"model": …, "iteration", "optimizer", "scheduler"}``); detection files
  (maskrcnn-benchmark) name the backbone ``backbone.body.stem.conv1``, ``backbone.body.layer1…``
  and put the stride of a downsampling bottleneck on its 1×1 convolution (``STRIDE_IN_1X1``),
  which :func:`load_release` reproduces on the torchvision model (and reports).  Inference:
  ``y = γ x / sqrt(running_var + eps) + β``, smallbn's MABN eval exactly.
* **CBN** (Yao et al., CVPR 2021), mmdetection Faster/Mask R-CNN R-50-FPN.  The backbone is
  plain BN (frozen statistics, from torchvision), so ``backbone.*`` maps onto torchvision's
  names unchanged; CBN layers are in the FPN and the box/mask heads only (``neck.…bn``,
  ``bbox_head.shared_convs.k.bn``, ``mask_head.convs.k.bn``: ``weight``, ``bias``,
  ``running_mean``, ``running_var`` (C,), no ``num_batches_tracked``).  Inference:
  ``γ (x − running_mean)/(sqrt(running_var) + eps) + β``, eps *outside* the root:
  :class:`~smallbn.CrossIterationBatchNorm2d` with ``eps_placement="outside"``.
  ``part="detector"`` keeps every key under mmdetection's names for a detector built with
  smallbn's ``CBN`` (:mod:`smallbn.integrations.mmengine`), adding ``num_batches_tracked``.

Input conventions are the releases' and are not changed here (reported in the notes): SN
and CBN normalise RGB with ImageNet's mean and std; MABN's classification models take BGR
images in [0, 255] without normalisation, its detection models subtract Caffe2's BGR means.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smallbn.convert import ConversionWarning, convert
from smallbn.registry import NormSpec, resolve_norm

__all__ = [
    "ARCHS",
    "RELEASES",
    "ImportReport",
    "ReleaseLayoutError",
    "cbn_state_dict",
    "load_release",
    "mabn_state_dict",
    "read_release",
    "release_state_dict",
    "sn_state_dict",
]

#: torchvision ResNet name → bottleneck blocks per stage.
ARCHS: dict[str, tuple[int, ...]] = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
RELEASES = ("sn", "mabn", "cbn")
#: The releases' eps (every layer of every released model: 1e-5).
RELEASE_EPS = 1e-5

_NORM_STATE = ("weight", "bias", "running_mean", "running_var")
#: MABN's training-only buffers (SMA windows, their step counters) in the three implementations.
_MABN_TRAINING = ("sta_matrix", "pre_x2", "pre_gz", "iters", "buffer_x2", "buffer_gz")


class ReleaseLayoutError(ValueError):
    """A file that is not in the layout of the release it was loaded as: a missing key, an
    unexpected shape, another architecture.  The message names the key and the fix."""


@dataclass
class ImportReport:
    """What :func:`release_state_dict` did: ``mapped`` (release key → smallbn key),
    ``dropped`` (key or group → why), ``added`` (smallbn key → why: state the release does
    not store), the options of the norm layers that reproduce the release's inference
    (``norm`` a registry name, ``norm_options`` its keyword arguments), and ``notes`` (what
    the user must know: input convention, changed strides)."""

    release: str
    arch: str
    layout: str
    norm: str
    norm_options: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    added: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: maskrcnn-benchmark's backbones stride a downsampling block on its 1×1 convolution.
    stride_in_1x1: bool = False

    def norm_spec(self) -> NormSpec:
        """The norm layer to convert a torchvision ResNet to before loading."""
        return functools.partial(resolve_norm(self.norm, 2), **self.norm_options)

    def summary(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.norm_options.items())
        lines = [
            f"{self.release} release ({self.layout}) → torchvision {self.arch} with "
            f"{self.norm}({options})",
            f"mapped {len(self.mapped)} tensors",
        ]
        for key, why in _grouped(self.dropped):
            lines.append(f"dropped {key}: {why}")
        for key, why in _grouped(self.added):
            lines.append(f"added {key}: {why}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _grouped(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Entries with one reason collapsed to one line (``*.iters (53 keys)``)."""
    by_reason: dict[str, list[str]] = {}
    for key, why in entries:
        by_reason.setdefault(why, []).append(key)
    out = []
    for why, keys in by_reason.items():
        if len(keys) == 1:
            out.append((keys[0], why))
        else:
            suffixes = sorted({k.rsplit(".", 1)[-1] for k in keys})
            out.append((f"{', '.join('*.' + s for s in suffixes)} ({len(keys)} keys)", why))
    return out


# -- reading ------------------------------------------------------------------------------------


def read_release(
    source: str | Path | Mapping[str, Any],
) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    """The model tensors of a release file (or of an already loaded checkpoint object),
    unwrapped from the training wrapper (``state_dict``, ``model``) and without
    DataParallel's ``module.`` prefix, and the top-level entries left out, each with why.

    Files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers only.  A file that pickles other objects is refused, naming the option: load
    it yourself with ``weights_only=False`` if you trust it, and pass the object."""
    if isinstance(source, Mapping):
        checkpoint: Any = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure: say what to do
            raise ReleaseLayoutError(
                f"{path}: cannot be read as tensors only ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); if you trust the file, "
                f"load it with torch.load(path, weights_only=False) and pass the object"
            ) from error
    if not isinstance(checkpoint, Mapping):
        raise ReleaseLayoutError(
            f"a checkpoint is a dict of tensors (or holds one under 'state_dict' or 'model'); "
            f"got a {type(checkpoint).__name__}"
        )
    dropped: list[tuple[str, str]] = []
    state: Mapping[str, Any] = checkpoint
    for wrapper in ("state_dict", "model"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            state = inner
            for key in checkpoint:
                if key != wrapper:
                    dropped.append((key, _top_level_reason(key)))
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            dropped.append((key, f"not a tensor ({type(value).__name__})"))
    if not tensors:
        raise ReleaseLayoutError(
            f"no tensors found: the checkpoint's entries are {sorted(checkpoint)[:8]}; a "
            f"release file holds its weights at the top level or under 'state_dict' or 'model'"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors, dropped


def _top_level_reason(key: str) -> str:
    if key == "optimizer":
        return "optimizer state: training only"
    if key in ("scheduler", "lr_scheduler"):
        return "learning-rate schedule: training only"
    return "training metadata (not weights)"


# -- the shared ResNet layout ---------------------------------------------------------------------


def _blocks_per_stage(keys: set[str]) -> tuple[int, ...]:
    """Bottleneck blocks per stage in torchvision-named ``keys`` (from ``layerL.i.conv1``)."""
    counts = []
    for stage in range(1, 5):
        blocks = {
            int(m.group(1))
            for k in keys
            if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k)) is not None
        }
        counts.append(max(blocks) + 1 if blocks else 0)
    return tuple(counts)


@functools.cache
def _conv_norm_pairs(arch: str) -> tuple[tuple[str, str], ...]:
    """Every (convolution, the norm after it) of a torchvision bottleneck ResNet, by name."""
    pairs = [("conv1", "bn1")]
    for stage, blocks in enumerate(ARCHS[arch], start=1):
        for i in range(blocks):
            pairs += [(f"layer{stage}.{i}.conv{k}", f"layer{stage}.{i}.bn{k}") for k in (1, 2, 3)]
        pairs.append((f"layer{stage}.0.downsample.0", f"layer{stage}.0.downsample.1"))
    return tuple(pairs)


def _conv_keys(arch: str) -> list[str]:
    return [f"{conv}.weight" for conv, _ in _conv_norm_pairs(arch)]


def _check_arch(keys: set[str], arch: str, release: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}' (one of {', '.join(ARCHS)})")
    found = _blocks_per_stage(keys)
    if found != ARCHS[arch]:
        known = [name for name, blocks in ARCHS.items() if blocks == found]
        hint = (
            f"it is a {known[0]}: pass arch='{known[0]}'"
            if known
            else "it is not a bottleneck ResNet smallbn knows (resnet50, resnet101)"
        )
        raise ReleaseLayoutError(
            f"{release} release: the file's ResNet has {found} bottleneck blocks per stage, a "
            f"torchvision {arch} has {ARCHS[arch]}; {hint}"
        )
    missing = [k for k in _conv_keys(arch) if k not in keys]
    if missing:
        raise ReleaseLayoutError(
            f"{release} release: missing key '{missing[0]}' (a convolution of the {arch}; "
            f"{len(missing)} missing in all): is the file a {release} {arch} checkpoint?"
        )


def _take(
    state: dict[str, Tensor], key: str, release: str, shapes: tuple[tuple[int, ...], ...]
) -> Tensor:
    """``state[key]`` reshaped to (C,) from one of ``shapes`` (with C free: -1)."""
    if key not in state:
        raise ReleaseLayoutError(f"{release} release: missing key '{key}'")
    value = state[key]
    for shape in shapes:
        if value.dim() == len(shape) and all(
            s in (-1, d) for s, d in zip(shape, value.shape, strict=True)
        ):
            return value.reshape(-1)
    expected = " or ".join(str(tuple("C" if s == -1 else s for s in shape)) for shape in shapes)
    raise ReleaseLayoutError(
        f"{release} release: '{key}' has shape {tuple(value.shape)}, the release stores {expected}"
    )


def _copy_convs_and_fc(
    state: dict[str, Tensor],
    out: dict[str, Tensor],
    report: ImportReport,
    rename: Callable[[str], str],
) -> None:
    for key in _conv_keys(report.arch):
        out[key] = state[rename(key)]
        report.mapped.append((rename(key), key))
    fc = [rename("fc.weight"), rename("fc.bias")]
    if all(k in state for k in fc):
        for source, target in zip(fc, ("fc.weight", "fc.bias"), strict=True):
            out[target] = state[source]
            report.mapped.append((source, target))
    else:
        report.notes.append("the file has no classifier (fc): the model's own fc is kept")


def _carry(
    state: dict[str, Tensor],
    source: str,
    target: str,
    shapes: tuple[tuple[int, ...], ...],
    channels: int | None,
    out: dict[str, Tensor],
    report: ImportReport,
) -> None:
    """``out[target]`` ← the release's ``state[source]`` reshaped from one of ``shapes`` to
    (C,) (:func:`_take`), checked to have its convolution's ``channels`` (``None``: no
    check), and reported as mapped."""
    value = _take(state, source, report.release, shapes)
    if channels is not None and value.numel() != channels:
        raise ReleaseLayoutError(
            f"{report.release} release: '{source}' has {value.numel()} channels, its "
            f"convolution {channels}: the file is damaged or of another architecture"
        )
    out[target] = value
    report.mapped.append((source, target))


def _norms_with_channels(out: dict[str, Tensor], arch: str) -> list[tuple[str, int]]:
    """Every norm of ``arch`` with the output channels of the convolution that feeds it."""
    return [(norm, int(out[f"{conv}.weight"].shape[0])) for conv, norm in _conv_norm_pairs(arch)]


# -- the releases --------------------------------------------------------------------------------


def _sn(state: dict[str, Tensor], arch: str) -> tuple[dict[str, Tensor], ImportReport]:
    keys = set(state)
    if any(k.startswith("sn_out.") or re.search(r"downsample\.weight$", k) for k in keys):
        raise ReleaseLayoutError(
            "sn release: this is a ResNet v2 (pre-activation: a bare-convolution shortcut and "
            "'sn_out') model, whose topology is not torchvision's ResNet; only the v1 models "
            "(resnetv1sn50/101) load"
        )
    layout = "ImageNet classification v1"
    detectron = [k for k in keys if k.startswith("Conv_Body.")]
    if detectron:  # SwitchNorm_Detection's convert.py output
        layout = "SwitchNorm_Detection (Detectron.pytorch) v1"
        state = {_from_detectron(k): v for k, v in state.items()}
        keys = set(state)

    def rename(key: str) -> str:  # torchvision name → the release's
        return re.sub(r"(^|\.)bn(\d)", r"\1sn\2", key)

    _check_arch(keys, arch, "sn")
    logits = {state[k].numel() for k in keys if k.endswith(".mean_weight")}
    if logits not in ({3}, {2}):
        raise ReleaseLayoutError(
            f"sn release: every layer mixes 3 (IN, LN, BN) or 2 (IN, LN) statistics; the "
            f"file's mean_weight logits have sizes {sorted(logits) or 'none'}"
        )
    branches = ("in", "ln", "bn") if logits == {3} else ("in", "ln")
    report = ImportReport(
        "sn",
        arch,
        layout,
        "sn",
        {"branches": branches, "unbiased_instance_var": True, "eps": RELEASE_EPS},
    )
    out: dict[str, Tensor] = {}
    _copy_convs_and_fc(state, out, report, rename)
    for prefix, channels in _norms_with_channels(out, arch):
        source = rename(prefix)
        for name in ("weight", "bias"):
            shapes = ((1, -1, 1, 1), (-1,))
            _carry(state, f"{source}.{name}", f"{prefix}.{name}", shapes, channels, out, report)
        for name in ("mean_weight", "var_weight"):
            shapes = ((len(branches),),)
            _carry(state, f"{source}.{name}", f"{prefix}.{name}", shapes, None, out, report)
        for name, default in (("running_mean", 0.0), ("running_var", 1.0)):
            if "bn" in branches:
                shapes = ((1, -1, 1), (-1,))
                _carry(state, f"{source}.{name}", f"{prefix}.{name}", shapes, channels, out, report)
            else:
                out[f"{prefix}.{name}"] = torch.full((channels,), default)
                report.added.append((f"{prefix}.{name}", "no BN branch (using_bn=False): unused"))
        for extra in ("batch_mean", "batch_var"):  # the detection copy's batch-average sums
            if f"{source}.{extra}" in state:
                report.dropped.append((f"{source}.{extra}", "batch-average sums of training"))
    _drop_rest(state, report)
    report.notes.append(
        "input: RGB normalised with ImageNet's mean and std, 224×224 crops (the release's "
        "AvgPool2d(7) equals torchvision's adaptive pool there)"
    )
    return out, report


def _from_detectron(key: str) -> str:
    """SwitchNorm_Detection's ``Conv_Body[.conv_body].resK…`` name → the classification one."""
    key = re.sub(r"^Conv_Body\.(conv_body\.)?", "", key)
    key = re.sub(r"^res1\.", "", key)
    key = re.sub(r"^classifier\.", "fc.", key)
    return re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)


def _mabn(state: dict[str, Tensor], arch: str) -> tuple[dict[str, Tensor], ImportReport]:
    detection = any(k.startswith("backbone.body.") for k in state)

    def rename(key: str) -> str:  # torchvision name → the release's
        if not detection:
            return key
        return "backbone.body." + re.sub(r"^(conv1|bn1)(\.|$)", r"stem.\1\2", key)

    layout = (
        "maskrcnn-benchmark detection backbone (det/)"
        if detection
        else "ImageNet classification (cls/)"
    )
    torchvision_names = (
        {
            re.sub(r"^stem\.", "", k[len("backbone.body.") :])
            for k in state
            if k.startswith("backbone.body.")
        }
        if detection
        else set(state)
    )
    _check_arch(torchvision_names, arch, "mabn")
    report = ImportReport("mabn", arch, layout, "mabn", {"eps": RELEASE_EPS})
    report.stride_in_1x1 = detection
    if detection:
        for key in sorted(k for k in state if not k.startswith("backbone.body.")):
            report.dropped.append(
                (key, "FPN and heads of the detector: not a torchvision backbone")
            )
    out: dict[str, Tensor] = {}
    _copy_convs_and_fc(state, out, report, rename)
    for prefix, channels in _norms_with_channels(out, arch):
        source = rename(prefix)
        for name, shapes in (
            ("weight", ((-1,),)),
            ("bias", ((-1,),)),
            ("running_var", ((-1,), (1, -1, 1, 1))),
        ):
            _carry(state, f"{source}.{name}", f"{prefix}.{name}", shapes, channels, out, report)
        out[f"{prefix}.running_mean"] = torch.zeros(channels)
        report.added.append(
            (f"{prefix}.running_mean", "MABN does not centre: BN's eval map with a zero mean")
        )
        for extra in _MABN_TRAINING:
            if f"{source}.{extra}" in state:
                report.dropped.append(
                    (
                        f"{source}.{extra}",
                        "moving-average windows of training (eval reads running_var alone); "
                        "smallbn's start empty",
                    )
                )
    _drop_rest(state, report)
    report.notes.append(
        "every convolution is weight-centred (smallbn's CenteredConv2d centres the stored, "
        "uncentred weight in each forward, as the release's CenConv2d)"
    )
    if detection:
        report.notes.append(
            "maskrcnn-benchmark strides a downsampling block on its 1×1 convolution "
            "(STRIDE_IN_1X1): load_release moves each stride from conv2 to conv1"
        )
        report.notes.append("input: BGR in [0, 255] minus Caffe2's means (102.98, 115.95, 122.77)")
    else:
        report.notes.append("input: BGR images in [0, 255], without mean or std normalisation")
    return out, report


def _cbn(state: dict[str, Tensor], arch: str, part: str) -> tuple[dict[str, Tensor], ImportReport]:
    if not any(k.startswith("backbone.") for k in state):
        raise ReleaseLayoutError(
            "cbn release: an mmdetection detector checkpoint names its backbone 'backbone.…'; "
            "this file has no such key"
        )
    cbn_layers = sorted(
        {
            k.rsplit(".", 1)[0]
            for k in state
            if re.match(r"(neck|bbox_head|mask_head)\..*\.bn\.running_var$", k)
        }
    )
    if part == "detector":
        report = ImportReport(
            "cbn",
            arch,
            "mmdetection detector",
            "cbn",
            {"eps_placement": "outside", "eps": RELEASE_EPS},
        )
        out = dict(state)
        report.mapped.extend((k, k) for k in state)
        for layer in cbn_layers:
            if f"{layer}.num_batches_tracked" not in out:
                out[f"{layer}.num_batches_tracked"] = torch.tensor(0)
                report.added.append((f"{layer}.num_batches_tracked", "not stored by the release"))
        report.notes.append(
            f"{len(cbn_layers)} CBN layers (FPN and heads): build them with "
            f"norm_cfg=dict(type='CBN', eps_placement='outside') "
            f"(smallbn.integrations.mmengine.register()); the backbone is plain BN"
        )
        return out, report
    if part != "backbone":
        raise ValueError(f"part must be 'backbone' or 'detector', got {part!r}")
    _check_arch({k[len("backbone.") :] for k in state if k.startswith("backbone.")}, arch, "cbn")
    report = ImportReport("cbn", arch, "mmdetection detector, backbone", "bn")
    out = {}
    _copy_convs_and_fc(state, out, report, lambda key: f"backbone.{key}")
    for prefix, channels in _norms_with_channels(out, arch):
        for name in _NORM_STATE:
            source = f"backbone.{prefix}.{name}"
            _carry(state, source, f"{prefix}.{name}", ((-1,),), channels, out, report)
        tracked = f"backbone.{prefix}.num_batches_tracked"
        if tracked in state:  # a 0-dim count, kept as it is
            out[f"{prefix}.num_batches_tracked"] = state[tracked]
            report.mapped.append((tracked, f"{prefix}.num_batches_tracked"))
    for key in sorted(state):
        if not key.startswith("backbone."):
            report.dropped.append(
                (
                    key,
                    "FPN and heads of the detector (part='detector' keeps them for an "
                    "mmdetection model)",
                )
            )
    _drop_rest(state, report)  # backbone keys a torchvision ResNet has no place for
    report.notes.append(
        f"the backbone is plain BN (frozen ImageNet statistics): torch's BN inference; the "
        f"release's {len(cbn_layers)} CBN layers are in the FPN and the heads"
    )
    report.notes.append("input: RGB normalised with ImageNet's mean and std (mmdetection's)")
    return out, report


def _drop_rest(state: dict[str, Tensor], report: ImportReport) -> None:
    """Report the keys of ``state`` no entry used (the release's own training state)."""
    used = {source for source, _ in report.mapped} | {key for key, _ in report.dropped}
    for key in sorted(set(state) - used):
        report.dropped.append((key, "not part of the torchvision architecture"))


def release_state_dict(
    release: str,
    source: str | Path | Mapping[str, Any],
    arch: str = "resnet50",
    *,
    part: str = "backbone",
) -> tuple[dict[str, Tensor], ImportReport]:
    """The ``state_dict`` of a torchvision ``arch`` converted to the release's method (the
    layer and options in the report: :meth:`ImportReport.norm_spec`) holding ``source``'s
    weights, and the report of what was mapped, dropped and added.

    ``release``: ``"sn"``, ``"mabn"`` or ``"cbn"``; ``part`` (CBN only): ``"backbone"`` (the
    torchvision ResNet) or ``"detector"`` (every key, under mmdetection's names).  Keys the
    torchvision model has and the release does not store (``num_batches_tracked``, MABN's
    ``running_mean``) are added with the values that keep the release's inference, and
    reported.  Raises :class:`ReleaseLayoutError` naming the key for a file that is not in
    the release's layout."""
    if release not in RELEASES:
        raise ValueError(f"unknown release '{release}' (one of {', '.join(RELEASES)})")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}' (one of {', '.join(ARCHS)})")
    state, top_level = read_release(source)
    if release == "sn":
        out, report = _sn(state, arch)
    elif release == "mabn":
        out, report = _mabn(state, arch)
    else:
        out, report = _cbn(state, arch, part)
    report.dropped[:0] = top_level
    if part == "backbone":
        _add_layer_state(out, report)
    return out, report


def _add_layer_state(out: dict[str, Tensor], report: ImportReport) -> None:
    """Add the state each norm layer of :meth:`ImportReport.norm_spec` has and the release
    does not store (MABN's moving-average windows and their counts, ``num_batches_tracked``):
    a freshly built layer's values, reported, so that ``out`` loads strictly into the
    converted model."""
    spec = report.norm_spec()
    for prefix, channels in _norms_with_channels(out, report.arch):
        for name, value in spec(channels).state_dict().items():
            if f"{prefix}.{name}" not in out:
                out[f"{prefix}.{name}"] = value
                report.added.append(
                    (f"{prefix}.{name}", "training state the release does not store: initial value")
                )


def sn_state_dict(
    source: str | Path | Mapping[str, Any], arch: str = "resnet50"
) -> tuple[dict[str, Tensor], ImportReport]:
    """Switchable Normalization's ResNet v1 release (or SwitchNorm_Detection's converted
    file): :func:`release_state_dict` with ``release="sn"``."""
    return release_state_dict("sn", source, arch)


def mabn_state_dict(
    source: str | Path | Mapping[str, Any], arch: str = "resnet50"
) -> tuple[dict[str, Tensor], ImportReport]:
    """MABN's classification (``cls/``) or maskrcnn-benchmark backbone release:
    :func:`release_state_dict` with ``release="mabn"``."""
    return release_state_dict("mabn", source, arch)


def cbn_state_dict(
    source: str | Path | Mapping[str, Any], arch: str = "resnet50", *, part: str = "backbone"
) -> tuple[dict[str, Tensor], ImportReport]:
    """Cross-Iteration BN's mmdetection release: :func:`release_state_dict` with
    ``release="cbn"``."""
    return release_state_dict("cbn", source, arch, part=part)


# -- into a model --------------------------------------------------------------------------------


def _arch_of(model: nn.Module) -> str:
    blocks = tuple(len(getattr(model, f"layer{s}", ())) for s in range(1, 5))
    for name, counts in ARCHS.items():
        if blocks == counts and hasattr(model, "conv1") and hasattr(model, "fc"):
            return name
    raise ValueError(
        f"load_release expects a torchvision bottleneck ResNet (resnet50 or resnet101, e.g. "
        f"torchvision.models.resnet50()); this {type(model).__name__} has {blocks} blocks "
        f"per stage"
    )


def _stride_in_1x1(model: nn.Module) -> None:
    """maskrcnn-benchmark's layout: a downsampling bottleneck strides its 1×1 convolution."""
    for stage in range(1, 5):
        for block in getattr(model, f"layer{stage}"):
            stride = block.conv2.stride
            if stride != (1, 1):
                block.conv1.stride, block.conv2.stride = stride, (1, 1)


def load_release(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    release: str,
) -> tuple[nn.Module, ImportReport]:
    """Convert a torchvision ResNet (``torchvision.models.resnet50()`` or ``resnet101()``,
    any weights) to the release's method and load ``source`` into it; returns the model and
    the :class:`ImportReport`.

    ``model`` is changed in place, as :func:`smallbn.convert` changes it: its norm layers
    become :meth:`ImportReport.norm_spec` (SN with the release's variance, MABN with centred
    convolutions, BN for CBN's backbone), and for a maskrcnn-benchmark MABN file every
    downsampling block's stride moves to its 1×1 convolution (a note of the report says so).
    The load is strict: every tensor of the model comes from the file or is one the report
    lists as added; a backbone file without a classifier keeps the model's ``fc`` (listed
    too).  The classifier must have the file's number of classes."""
    arch = _arch_of(model)
    state, report = release_state_dict(release, source, arch)
    if report.norm != "bn":
        with warnings.catch_warnings():
            # MABN's warning that centring changes what a pretrained conv computes: the
            # release's convolutions centre these very weights in every forward too
            warnings.filterwarnings("ignore", "MABN centres", ConversionWarning)
            model = convert(model, report.norm_spec())
    if report.stride_in_1x1:
        _stride_in_1x1(model)
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    for key in missing:
        if key not in ("fc.weight", "fc.bias") or "fc.weight" in state:
            raise ReleaseLayoutError(
                f"{release} release: the model has '{key}', which the file does not provide"
            )
        state[key] = current[key]  # a backbone file
        report.added.append((key, "the file has no classifier: the model's own"))
    for key, value in state.items():
        if key in current and current[key].shape != value.shape:
            hint = (
                f"a classifier of another number of classes: build the model with "
                f"num_classes={value.shape[0]}"
                if key.startswith("fc.")
                else "a model of another architecture"
            )
            raise ReleaseLayoutError(
                f"{release} release: '{key}' has shape {tuple(value.shape)} in the file and "
                f"{tuple(current[key].shape)} in the model ({hint})"
            )
    model.load_state_dict(state, strict=True)
    return model, report
