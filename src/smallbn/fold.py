"""Fold eval-mode normalization layers into the convolution or linear layer that feeds them.

In eval mode a BN-style layer applies a fixed per-channel affine map (Ioffe & Szegedy,
ICML 2015, §3.1: "the normalization is simply a linear transform applied to each
activation"),

    y = a ⊙ z + b,   a = γ / sqrt(running_var + eps),   b = β − running_mean · a,

and when ``z = W x + c`` is the output of a convolution or linear layer read by nothing else,
the pair is one layer with

    W'_o = a_o · W_o   (every weight of output channel o),   c' = a ⊙ c + b   (c = 0 without bias)

(Jacob et al., CVPR 2018, §3.2; ``torch.nn.utils.fusion`` does the same for torch's BN).
The norm is replaced by ``nn.Identity`` and the producer gets a bias.  Inference then costs
what the bare convolutions cost: the norm's extra pass over the activations disappears.

Weight layouts and where output channel o lives:

* ``Conv{1,2,3}d``: ``(C_out, C_in/groups, *k)``: row o.
* ``ConvTranspose{1,2,3}d``: ``(C_in, C_out/groups, *k)``: output channel ``o = g·(C_out/groups)
  + j`` is column j of the rows of group g, ``W[g·C_in/groups : (g+1)·C_in/groups, j]``.
* ``Linear``: ``(out, in)``: row o.

Which norms fold: torch ``BatchNorm{1,2,3}d``/``SyncBatchNorm`` that use running statistics in
eval mode, and smallbn layers whose :meth:`~smallbn.layers.NormBase.eval_affine` is not
``None`` (for :class:`~smallbn.layers.DomainBatchNorm`, the statistics of its
``active_domain``, and its γ, β rows with ``per_domain_affine=True``: fold one copy of the
model per domain).  Each needs a producer found by
:func:`smallbn.graph.trace_producers` (an unshared ``Conv``/``ConvTranspose``/``Linear`` whose
output only the norm reads); the others stay in place and :func:`fold_with_report` says why.
Products are formed in float64 (torch BN's map too; smallbn layers' ``eval_affine`` in their
own dtype) and rounded once to the producer's dtype.

Like ``torch.nn.utils.fusion.fuse_linear_bn_eval``, a ``Linear`` → ``BatchNorm1d`` pair is
folded when the channel counts agree; the pair is then assumed to see ``(N, C)`` inputs.  A
``Linear`` applied to ``(N, L, in)`` followed by a BN over dim 1 with ``L == out_features``
normalizes positions, not features, and must not be folded; fx cannot see shapes, so exclude
such a model (or check its outputs after folding).

The folded model's ``state_dict`` differs (no norm entries, producer biases added) and it is
for inference only: training it would train a network without normalization.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.modules.lazy import LazyModuleMixin

from smallbn.convert import is_frozen_batch_norm, is_norm_layer
from smallbn.graph import trace_producers
from smallbn.layers import NormBase
from smallbn.layers.centered_conv import CenteredConv1d, CenteredConv2d, CenteredConv3d
from smallbn.layers.norm_act import NormActivation, post_ops_of

__all__ = ["FoldReport", "FoldedNorm", "KeptNorm", "fold", "fold_with_report"]

# torch BN classes whose eval forward is known to be ``F.batch_norm`` with running statistics.
_TORCH_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@dataclass(frozen=True)
class FoldedNorm:
    """A norm folded into its producer (both named by their path in the model)."""

    norm: str
    producer: str


@dataclass(frozen=True)
class KeptNorm:
    """A norm left in place, and why."""

    norm: str
    reason: str


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_with_report` did.

    Attributes:
        folded: the (norm, producer) pairs folded, in module order.
        kept: the norms left in place with the reason.
        method: how producers were found: ``"fx"`` (the whole forward traced) or
            ``"submodules"`` (the whole model could not be traced; its traceable submodules
            were, one by one: :func:`smallbn.graph.trace_producers`).
        trace_error: the tracing error behind the fallback, else ``None``.
    """

    folded: tuple[FoldedNorm, ...]
    kept: tuple[KeptNorm, ...]
    method: str
    trace_error: str | None = None


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 makes the folded weight the correctly rounded product; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _bn_forward(norm: _BatchNorm) -> Any:
    """The forward that normalizes: for a norm with a drop/act after it (smallbn's
    ``...Act`` classes, timm's ``BatchNormAct2d``, whose forward is BN's followed by them),
    BN's own; otherwise the class's."""
    if isinstance(norm, NormActivation):
        return super(NormActivation, norm).forward.__func__  # type: ignore[misc]
    if post_ops_of(norm) is not None:
        return _BatchNorm.forward
    return type(norm).forward


def _torch_bn_affine(norm: _BatchNorm, dtype: torch.dtype) -> tuple[Tensor, Tensor] | str:
    """``(a, b)`` of a torch BN in eval mode, or why it has none."""
    if _bn_forward(norm) not in _TORCH_BN_FORWARDS:
        return f"{type(norm).__name__} overrides BatchNorm's forward: its eval map is unknown"
    # torch's eval forward uses batch statistics when the running buffers are absent
    if norm.running_mean is None or norm.running_var is None:
        return (
            f"{type(norm).__name__} has no running statistics (track_running_stats=False), "
            f"so it normalizes with batch statistics in eval mode too"
        )
    scale = torch.rsqrt(norm.running_var.detach().to(dtype) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(dtype)
    shift = -norm.running_mean.detach().to(dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().to(dtype)
    return scale, shift


def _eval_affine(norm: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor] | str:
    """The per-channel ``(a, b)`` of ``y = a ⊙ z + b`` in eval mode, or why there is none."""
    if isinstance(norm, LazyModuleMixin):
        return f"{type(norm).__name__} is uninitialized (run one forward pass first)"
    if isinstance(norm, NormBase):
        affine = norm.eval_affine()
        if affine is None:
            return (
                f"{type(norm).__name__} is not a per-channel affine map in eval mode "
                f"(batch-independent statistics, or no running statistics)"
            )
        scale, shift = affine
        return scale.detach().to(dtype), shift.detach().to(dtype)
    if isinstance(norm, _BatchNorm):
        return _torch_bn_affine(norm, dtype)
    if is_frozen_batch_norm(norm):  # torchvision's/detectron2's/timm's: BN's eval map
        eps = float(getattr(norm, "eps", 1e-5))
        weight, bias = norm.weight.detach().to(dtype), norm.bias.detach().to(dtype)
        scale = weight * torch.rsqrt(norm.running_var.detach().to(dtype) + eps)
        return scale, bias - norm.running_mean.detach().to(dtype) * scale
    return f"{type(norm).__name__} is not a known norm layer"


def _out_channels(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    return int(producer.out_channels)  # type: ignore[arg-type]


def _pair_problem(
    norm: nn.Module, producer: nn.Module, name: str, scale: Tensor, references: Counter[int]
) -> str | None:
    """Why ``norm`` cannot be folded into ``producer`` (named ``name``), or ``None``."""
    if norm._forward_hooks or norm._forward_pre_hooks:
        return "the norm has forward hooks, which replacing it would drop"
    if producer._forward_hooks or producer._forward_pre_hooks:
        # e.g. torch.nn.utils.weight_norm recomputes the weight in a pre-hook, and a forward
        # hook may read the un-normalized output
        return f"producer '{name}' has forward hooks"
    if _out_channels(producer) != scale.numel():
        return (
            f"the norm has {scale.numel()} channels but producer '{name}' outputs "
            f"{_out_channels(producer)}"
        )
    for tensor_name in ("weight", "bias"):
        tensor = getattr(producer, tensor_name)
        # tied weights: rescaling them would change the other module too
        if tensor is not None and references[id(tensor)] > 1:
            return f"the {tensor_name} of producer '{name}' is shared with another module"
    return None


def _fold_into(producer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Rewrite ``producer`` so that it outputs ``scale ⊙ (its output) + shift``."""
    weight: Tensor = producer.weight  # type: ignore[assignment]
    bias: Tensor | None = producer.bias  # type: ignore[assignment]
    dtype = _compute_dtype(weight.device)
    scale = scale.to(device=weight.device, dtype=dtype)
    shift = shift.to(device=weight.device, dtype=dtype)
    w = weight.detach().to(dtype)
    trailing = [1] * (w.dim() - 2)
    if isinstance(producer, _ConvTransposeNd):
        # (C_in, C_out/g, *k) viewed as (g, C_in/g, C_out/g, *k): output channel g·(C_out/g) + j
        # is [g, :, j]; scale reshaped to (g, 1, C_out/g, 1, ...) meets it there.
        groups = producer.groups
        grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        w = (grouped * scale.reshape(groups, 1, -1, *trailing)).reshape(w.shape)
    else:
        # Conv (C_out, C_in/g, *k) and Linear (out, in): output channel o is row o.
        w = w * scale.reshape(-1, 1, *trailing)
    c = torch.zeros_like(scale) if bias is None else bias.detach().to(dtype)
    new_bias = (scale * c + shift).to(weight.dtype)
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
        if bias is None:
            producer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
        else:
            bias.copy_(new_bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_eval(model: nn.Module) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(f"'{n}'" for n in training[:4]) + (", ..." if len(training) > 4 else "")
        raise ValueError(
            f"fold: the model is in training mode ({len(training)} module(s) have "
            f".training=True: {shown}). Folding bakes in the running statistics that eval "
            f"mode uses and gives an inference-only model; call model.eval() before fold()."
        )


_CENTERED = (CenteredConv1d, CenteredConv2d, CenteredConv3d)


def _bake_centered_convs(model: nn.Module) -> None:
    """Replace weight-centred convs (MABN's producers) by plain convs holding the centred
    weight: the same function, foldable, and no centring at inference."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _CENTERED) and not (
            module._forward_hooks or module._forward_pre_hooks
        ):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if name:
                setattr(parent, child, module.to_plain())


def _fold(model: nn.Module, inplace: bool, stacklevel: int) -> tuple[nn.Module, FoldReport]:
    _check_eval(model)
    if not inplace:
        model = copy.deepcopy(model)
    _bake_centered_convs(model)
    search = trace_producers(model, is_norm_layer)
    modules = dict(model.named_modules())
    references: Counter[int] = Counter(
        id(t)
        for _, t in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        )
    )
    folded: list[FoldedNorm] = []
    kept: list[KeptNorm] = []
    for name, norm in modules.items():
        if not is_norm_layer(norm):
            continue
        if not name:
            kept.append(KeptNorm("<root>", "the model is the norm itself: no producer"))
            continue
        device = next(iter((*norm.parameters(), *norm.buffers())), torch.empty(0)).device
        affine = _eval_affine(norm, _compute_dtype(device))
        producer_name = search.producers.get(name)
        if isinstance(affine, str):
            reason: str | None = affine
        elif producer_name is None:
            reason = search.unpaired.get(name, "no producer found")
        else:
            producer = modules[producer_name]
            reason = _pair_problem(norm, producer, producer_name, affine[0], references)
        if reason is not None or isinstance(affine, str) or producer_name is None:
            kept.append(KeptNorm(name, reason or "no producer found"))
            continue
        _fold_into(producer, *affine)
        # eval mode, so that the folded model passes fold's own check again; a norm with a
        # drop/act after it leaves them in its place
        post = post_ops_of(norm)
        remaining = nn.Sequential(post["drop"], post["act"]) if post else nn.Identity()
        _replace(model, name, remaining.train(False))
        folded.append(FoldedNorm(name, producer_name))
    if search.method != "fx":
        # Warn even when every norm folded: pairs found inside a submodule assume the parent
        # runs it through its forward, so a pair can be wrong without any norm being kept.
        staying = (
            f"{len(kept)} norm(s) stay in place (fold_with_report lists them)"
            if kept
            else "every norm found was folded"
        )
        untraced = ", ".join(f"'{n}'" for n in list(search.untraced)[:4])
        more = ", ..." if len(search.untraced) > 4 else ""
        warnings.warn(
            f"fold: torch.fx could not trace the model as a whole ({search.trace_error}); its "
            f"traceable submodules were traced one by one (untraceable: {untraced}{more}), and "
            f"{staying}. Those pairs assume each submodule runs through its forward: if a "
            f"parent calls a submodule's children outside that forward (e.g. "
            f"self.block[1](f(self.block[0](x)))), a folded pair may be wrong; compare the "
            f"folded model's outputs with the original's, or make the model traceable by "
            f"torch.fx.",
            stacklevel=stacklevel,
        )
    return model, FoldReport(tuple(folded), tuple(kept), search.method, search.trace_error)


def fold_with_report(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """:func:`fold`, also returning which norms were folded into which producers and why the
    others were left in place."""
    return _fold(model, inplace, stacklevel=3)


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An inference model with every foldable eval-mode norm folded into its producer.

    Each norm ``y = a ⊙ z + b`` whose input ``z = W x + c`` comes from an unshared
    ``Conv``/``ConvTranspose``/``Linear`` read by nothing else becomes part of that layer
    (``W' = a·W`` per output channel, ``c' = a ⊙ c + b``) and is replaced by ``nn.Identity``;
    eval outputs are unchanged up to rounding.  Other norms (GroupNorm/LayerNorm/InstanceNorm,
    norms after a residual sum or a shared layer, ...) stay in place.

    Args:
        model: a model in eval mode (``model.eval()``); a model in training mode is refused,
            since folding uses the running statistics that only eval mode applies.
        inplace: rewrite ``model`` itself instead of a deep copy.

    Returns:
        The folded model (``model`` itself when ``inplace``).

    Raises:
        ValueError: if any module of ``model`` is in training mode.

    Warns whenever torch.fx cannot trace the model (also when every norm was folded): only
    norms directly following a producer inside an ``nn.Sequential`` could then be folded, and
    those pairs are taken from the Sequential's order, which is wrong if the model calls the
    Sequential's children outside ``Sequential.forward``.
    """
    return _fold(model, inplace, stacklevel=3)[0]
