"""Record the batch statistics of norm layers during training, forward and backward.

Yan et al. (ICLR 2020, "Towards Stabilizing Batch Statistics in Backward Propagation of
Batch Normalization", the MABN paper) show that BN's trouble at small batch is not only the
noise of the forward statistics but also that of two *backward* statistics.  For a BN layer
``y = γ x̂ + β``, ``x̂ = (x − μ_B)/sqrt(σ²_B + eps)``, with ``ĝ = (∂L/∂y)·γ`` the gradient
w.r.t. ``x̂``, the input gradient is

    ∂L/∂x = (ĝ − g_B − x̂ · Ψ_B) / sqrt(σ²_B + eps),   g_B = E_R[ĝ],   Ψ_B = E_R[ĝ · x̂],

so four per-channel statistics over the reduction set ``R = (N, *spatial)`` are estimated
from the batch at every iteration: ``μ_B = E_R[x]`` and ``σ²_B = E_R[x²] − μ_B²`` forward,
``g_B`` and ``Ψ_B`` backward.  The authors plot the four over training at batch 2 and 32;
:class:`StatsRecorder` records them for any layers of any model, :func:`plot_stats` draws that
figure for several runs and :func:`fluctuation` / :func:`summarize_fluctuation` put numbers on
it.

Typical use::

    with StatsRecorder(model, ["stages.0.bn2"], label="batch 2") as recorder:
        train(model)
    recorder.save("runs/batch2.pt")
    plot_stats({"batch 2": Recording.load("runs/batch2.pt"), ...}, "stages.0.bn2", "stats.png")

The recorder costs nothing when off: hooks exist only inside the ``with`` block, and only
forwards in training mode are recorded.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from smallbn._io import atomic_write
from smallbn._optional import require
from smallbn.convert import is_norm_layer
from smallbn.stats import channel_moments, channel_view

__all__ = [
    "STATISTICS",
    "STATISTIC_LABELS",
    "LayerStats",
    "Recording",
    "StatsRecorder",
    "fluctuation",
    "format_fluctuation_table",
    "plot_stats",
    "summarize_fluctuation",
]

#: Field names of the four recorded statistics, in the order of the MABN paper's figure.
STATISTICS: tuple[str, ...] = ("mean", "var", "grad_mean", "grad_proj")

#: The paper's symbols for :data:`STATISTICS` (plot titles, tables).
STATISTIC_LABELS: dict[str, str] = {
    "mean": "μ_B",
    "var": "σ²_B",
    "grad_mean": "g_B",
    "grad_proj": "Ψ_B",
}

_FORMAT = "smallbn.recording"
_FORMAT_VERSION = 1

Normalized = Literal["batch", "output"]
Channels = Sequence[int] | Mapping[str, Sequence[int]] | None


@dataclass(frozen=True)
class LayerStats:
    """The statistics one layer produced, one row per iteration.

    ``mean``, ``var``, ``grad_mean`` and ``grad_proj`` are float32 CPU tensors of shape
    ``(T, K)`` for ``T`` iterations and the ``K`` recorded channels (layer channel indices in
    ``channels``).  An iteration is one training-mode forward of the layer, plus the backward
    through it if there was one; the backward statistics of iterations without backward
    are NaN.  ``batch_size`` (int64, ``(T,)``) is the ``N`` of each iteration's input.
    """

    mean: Tensor
    var: Tensor
    grad_mean: Tensor
    grad_proj: Tensor
    batch_size: Tensor
    channels: tuple[int, ...]

    def __post_init__(self) -> None:
        shapes = {tuple(self.statistic(name).shape) for name in STATISTICS}
        if len(shapes) != 1:
            raise ValueError(f"LayerStats: statistics differ in shape: {sorted(shapes)}")
        (shape,) = shapes
        if len(shape) != 2 or shape[1] != len(self.channels):
            raise ValueError(
                f"LayerStats: statistics must be (iterations, {len(self.channels)} channels), "
                f"got {shape}"
            )
        if tuple(self.batch_size.shape) != (shape[0],):
            raise ValueError(
                f"LayerStats: batch_size must have one entry per iteration ({shape[0]}), "
                f"got shape {tuple(self.batch_size.shape)}"
            )

    @property
    def num_iterations(self) -> int:
        return int(self.mean.shape[0])

    def statistic(self, name: str) -> Tensor:
        """One of :data:`STATISTICS` by name, ``(T, K)``."""
        if name not in STATISTICS:
            raise KeyError(f"unknown statistic '{name}' (one of {', '.join(STATISTICS)})")
        value: Tensor = getattr(self, name)
        return value

    def channel_series(self, name: str, channel: int | None = None) -> Tensor:
        """``(T,)`` series of statistic ``name``: one layer channel, or the channel average.

        The average ignores NaN entries, so iterations without backward stay NaN.
        """
        values = self.statistic(name)
        if channel is None:
            return values.nanmean(dim=1)
        return values[:, self._position(channel)]

    def _position(self, channel: int) -> int:
        try:
            return self.channels.index(channel)
        except ValueError:
            raise KeyError(
                f"channel {channel} was not recorded (recorded: {list(self.channels)})"
            ) from None


@dataclass(frozen=True)
class Recording:
    """One run's recording: a :class:`LayerStats` per layer name, a run label and metadata.

    ``metadata`` holds JSON values only (str, int, float, bool, None, lists and dicts of
    them), so that both file formats store it losslessly and loading needs no pickle.
    """

    label: str
    layers: dict[str, LayerStats]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> LayerStats:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(
                f"layer '{layer}' not in recording '{self.label}' "
                f"(recorded: {', '.join(self.layers) or 'none'})"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` (``.pt``/``.pth``: torch, ``.npz``: numpy) atomically.

        The file is written next to ``path`` under a temporary name and moved into place
        with :func:`os.replace`, so a reader (or a crash) never sees a partial file.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        json.dumps(self.metadata)  # fail before touching the disk if it is not JSON
        if suffix in (".pt", ".pth"):
            atomic_write(path, lambda handle: torch.save(self._to_payload(), handle))
        elif suffix == ".npz":
            atomic_write(
                path, lambda handle: np.savez(handle, allow_pickle=False, **self._to_arrays())
            )
        else:
            raise ValueError(f"{path}: unknown recording format '{suffix}' (use .pt or .npz)")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """Read a file written by :meth:`save` (no pickle involved in either format)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".pt", ".pth"):
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return cls._from_payload(payload, path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return cls._from_arrays(dict(arrays), path)
        raise ValueError(f"{path}: unknown recording format '{suffix}' (use .pt or .npz)")

    # -- serialization ---------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "label": self.label,
            "metadata": self.metadata,
            "layers": list(self.layers),
            "channels": [list(stats.channels) for stats in self.layers.values()],
        }

    def _to_payload(self) -> dict[str, Any]:
        tensors = [
            {name: stats.statistic(name) for name in STATISTICS} | {"batch_size": stats.batch_size}
            for stats in self.layers.values()
        ]
        # The header travels as a JSON string: torch.load(weights_only=True) then accepts
        # every metadata value without widening its allow-list.
        return {"header": json.dumps(self._header()), "tensors": tensors}

    def _to_arrays(self) -> dict[str, np.ndarray]:
        # npz keys are positional: layer names may contain any character.
        arrays = {"header": np.array(json.dumps(self._header()))}
        for i, stats in enumerate(self.layers.values()):
            for name in STATISTICS:
                arrays[f"{i}.{name}"] = stats.statistic(name).numpy()
            arrays[f"{i}.batch_size"] = stats.batch_size.numpy()
        return arrays

    @classmethod
    def _build(
        cls, header: dict[str, Any], tensors: list[dict[str, Tensor]], path: Path
    ) -> Recording:
        if header.get("format") != _FORMAT or header.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path}: not a smallbn recording (format {header.get('format')!r}, "
                f"version {header.get('version')!r}; expected {_FORMAT!r} v{_FORMAT_VERSION})"
            )
        layers = {
            name: LayerStats(
                **{stat: tensors[i][stat].to(torch.float32) for stat in STATISTICS},
                batch_size=tensors[i]["batch_size"].to(torch.int64),
                channels=tuple(int(c) for c in header["channels"][i]),
            )
            for i, name in enumerate(header["layers"])
        }
        return cls(str(header["label"]), layers, dict(header["metadata"]))

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> Recording:
        if not isinstance(payload, dict) or "header" not in payload:
            raise ValueError(f"{path}: not a smallbn recording")
        return cls._build(json.loads(payload["header"]), payload["tensors"], path)

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], path: Path) -> Recording:
        if "header" not in arrays:
            raise ValueError(f"{path}: not a smallbn recording")
        header = json.loads(str(arrays["header"]))
        tensors = [
            {name: torch.from_numpy(arrays[f"{i}.{name}"]) for name in (*STATISTICS, "batch_size")}
            for i in range(len(header["layers"]))
        ]
        return cls._build(header, tensors, path)


# -- recording ---------------------------------------------------------------------------------


class _LayerState:
    """Per-layer buffers: statistics stay on the layer's device until :meth:`finish`.

    Keeping them on the device avoids a host synchronization per layer and iteration on
    CUDA; they are ``(2, K)`` float32 tensors, small next to the activations.
    """

    def __init__(self, channels: Tensor | None) -> None:
        self.channels = channels
        self.num_channels: int | None = None  # of the layer input, known at the first call
        self.forward: list[Tensor] = []
        self.backward: list[Tensor | None] = []
        self.batch_size: list[int] = []
        # Bumped by clear(): a backward hook of an older forward must not write into the
        # slot a newer iteration now occupies.
        self.generation = 0

    def select(self, stats: Tensor) -> Tensor:
        """Keep the recorded channels of a ``(2, C)`` statistics tensor."""
        if self.channels is None:
            return stats
        return stats[:, self.channels.to(stats.device)]

    def finish(self, all_channels: int) -> LayerStats:
        channels = (
            tuple(range(all_channels))
            if self.channels is None
            else tuple(int(c) for c in self.channels)
        )
        k = len(channels)
        if not self.forward:
            forward = backward = torch.zeros(0, 2, k)
        else:
            # One stack and one transfer per statistic: a .cpu() per iteration would be a
            # device synchronization each.
            device = self.forward[0].device
            forward = torch.stack([f.to(device) for f in self.forward]).float().cpu()
            nan = torch.full((2, k), math.nan, device=device)
            backward = (
                torch.stack([nan if b is None else b.to(device) for b in self.backward])
                .float()
                .cpu()
            )
        return LayerStats(
            mean=forward[:, 0].contiguous(),
            var=forward[:, 1].contiguous(),
            grad_mean=backward[:, 0].contiguous(),
            grad_proj=backward[:, 1].contiguous(),
            batch_size=torch.tensor(self.batch_size, dtype=torch.int64),
            channels=channels,
        )


class StatsRecorder:
    """Context manager recording ``μ_B``, ``σ²_B``, ``g_B`` and ``Ψ_B`` of norm layers.

    Inside ``with StatsRecorder(model, ...) as recorder:`` every training-mode forward of a
    chosen layer appends one iteration: the per-channel moments of the layer *input* ``x``
    over ``R = (N, *spatial)`` (via :func:`smallbn.stats.channel_moments`, accumulated in
    float32, float64 for float64 inputs) and, once the backward pass reaches the layer's
    output, ``g_B = E_R[ĝ]`` and ``Ψ_B = E_R[ĝ · x̂]`` with ``ĝ = (∂L/∂y)·γ`` (Yan et al.,
    ICLR 2020, Eq. 4).  Outside the block no hook is installed at all.

    Args:
        model: any module.
        layers: names (as in ``model.named_modules()``) of the layers to record; default
            every norm layer (:func:`smallbn.convert.is_norm_layer`).  Any module whose input
            has channels in dim 1 works, not just norm layers.
        channels: channel indices to keep (all by default), either one list for every layer
            or a mapping from layer name to list (layers not in it: all channels); useful to
            bound memory on wide layers.
        label: run label for plots (e.g. ``"batch 2"``); default ``"batch N"`` from the
            first recorded input when every iteration has the same ``N``.
        metadata: JSON values saved with the recording.
        normalized: which ``x̂`` enters ``Ψ_B``.  ``"batch"`` (default):
            ``x̂ = (x − μ_B)/sqrt(σ²_B + eps)``, the BN quantity of the paper's Eq. 4,
            defined whatever ``γ`` is (the backward statistics of BRN use it too, ``r`` and
            ``d`` being constants there).  ``"output"``: the layer's own normalized output
            ``x̂ = (y − β)/γ`` (for MABN this is ``r·z``, which makes ``Ψ_B`` the paper's
            ``E[ĝ·z]`` with ``ĝ`` including ``r``); channels with ``γ = 0`` fall back to the
            batch formula, and a layer without ``γ`` uses ``y − β``.  ``"output"`` keeps one
            extra activation per layer until backward.
        scale_grad_by_batch: multiply ``∂L/∂y`` by the iteration's batch size ``N``.  With a
            batch-mean loss ``L = (1/N) Σₙ lₙ`` the raw gradient shrinks as ``1/N``; scaled,
            ``g_B`` and ``Ψ_B`` estimate the same per-sample quantities at every ``N``, so
            runs at batch 2 and 32 can be compared on one axis.

    Notes:
        A layer called twice in one model forward records two iterations.  Several backward
        passes through one forward (``retain_graph=True``) add up, as the gradients do.
        Activation checkpointing re-runs forwards and would record them again.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        channels: Channels = None,
        *,
        label: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        normalized: Normalized = "batch",
        scale_grad_by_batch: bool = False,
    ) -> None:
        if normalized not in ("batch", "output"):
            raise ValueError(f"normalized must be 'batch' or 'output', got {normalized!r}")
        self.model = model
        self.layers = self._resolve_layers(model, layers)
        for name, module in self.layers.items():
            if getattr(module, "per_domain_affine", False):
                # γ, β of shape (D, C) (DomainBatchNorm): ĝ and the "output" x̂ would be
                # formed without them (as for a layer without affine), silently wrong.
                raise ValueError(
                    f"StatsRecorder: layer '{name}' ({type(module).__name__}) has a separate "
                    f"affine per domain (per_domain_affine=True), but the recorded "
                    f"ĝ = (∂L/∂y)·γ and the 'output' x̂ = (y − β)/γ need one γ and β per "
                    f"channel. Pass layers= without it, or record a model whose layer is "
                    f"built with per_domain_affine=False"
                )
        self.label = label
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # saving would fail later; say so now
        self.normalized: Normalized = normalized
        self.scale_grad_by_batch = bool(scale_grad_by_batch)
        self._states = {
            name: _LayerState(self._channel_index(name, channels)) for name in self.layers
        }
        self._handles: list[RemovableHandle] = []
        self._warned_version = False

    # -- configuration -----------------------------------------------------------------------

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
        modules = dict(model.named_modules())
        norms = [name for name, module in modules.items() if is_norm_layer(module)]
        if layers is None:
            if not norms:
                raise ValueError("StatsRecorder: the model has no norm layer; pass layers=")
            return {name: modules[name] for name in norms}
        if isinstance(layers, str):  # a lone name would otherwise iterate by character
            layers = [layers]
        missing = [name for name in layers if name not in modules]
        if missing:
            raise KeyError(
                f"StatsRecorder: no layer named {', '.join(map(repr, missing))} in the model "
                f"(norm layers: {', '.join(norms) or 'none'})"
            )
        return {name: modules[name] for name in dict.fromkeys(layers)}

    @staticmethod
    def _channel_index(name: str, channels: Channels) -> Tensor | None:
        chosen = channels.get(name) if isinstance(channels, Mapping) else channels
        if chosen is None:
            return None
        index = torch.as_tensor(list(chosen), dtype=torch.long)
        if index.dim() != 1 or index.numel() == 0 or bool((index < 0).any()):
            raise ValueError(
                f"StatsRecorder: channels of '{name}' must be a non-empty list of "
                f"non-negative indices, got {list(chosen)}"
            )
        return index

    # -- activation ----------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> StatsRecorder:
        """Install the hooks (what entering the ``with`` block does)."""
        if self.active:
            raise RuntimeError("StatsRecorder is already recording")
        for name, module in self.layers.items():
            self._handles.append(
                module.register_forward_hook(self._forward_hook(name), with_kwargs=True)
            )
        return self

    def stop(self) -> None:
        """Remove every hook (what leaving the ``with`` block does); recordings stay.

        Backward passes of forwards recorded while active still deliver their statistics:
        the tensor hooks live on those forwards' outputs, not on the model.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StatsRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget every recorded iteration."""
        for state in self._states.values():
            state.forward.clear()
            state.backward.clear()
            state.batch_size.clear()
            state.generation += 1

    # -- hooks ---------------------------------------------------------------------------------

    def _forward_hook(
        self, name: str
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        state = self._states[name]

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not module.training:
                return
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, Tensor) or not isinstance(output, Tensor) or x.dim() < 2:
                return
            self._record_forward(name, module, state, x, output)

        return hook

    def _record_forward(
        self, name: str, module: nn.Module, state: _LayerState, x: Tensor, y: Tensor
    ) -> None:
        """Append one iteration's forward moments of layer ``name``'s input ``x`` and, when
        a backward pass will follow, hook ``y`` for the backward statistics."""
        with torch.no_grad():
            x = x.detach()
            moments = channel_moments(x)
            mean, var = moments.mean, moments.var
            if x.numel() == 0:  # zeros from an empty batch are no estimate of anything
                mean, var = torch.full_like(mean, math.nan), torch.full_like(var, math.nan)
            if state.num_channels is None:
                state.num_channels = int(mean.shape[0])
            elif state.num_channels != mean.shape[0]:
                raise RuntimeError(
                    f"StatsRecorder: the input of layer '{name}' ({type(module).__name__}) "
                    f"changed from {state.num_channels} to {mean.shape[0]} channels between "
                    f"iterations; a recording holds one channel count per layer: use a new "
                    f"StatsRecorder for each input width"
                )
            if state.channels is not None and int(state.channels.max()) >= mean.shape[0]:
                raise IndexError(
                    f"StatsRecorder: channel {int(state.channels.max())} requested for layer "
                    f"'{name}' ({type(module).__name__}), but its input has {mean.shape[0]} "
                    f"channels; pass channels={{'{name}': [...]}} with indices below "
                    f"{mean.shape[0]}"
                )
            state.forward.append(state.select(torch.stack([mean, var])).float())
            state.backward.append(None)
            state.batch_size.append(int(x.shape[0]))
        # Backward statistics pair ∂L/∂y with x̂ element by element: layers that change the
        # shape (a conv recorded as an ordinary module) get forward statistics only.
        if torch.is_grad_enabled() and y.requires_grad and x.numel() > 0 and y.shape == x.shape:
            slot = len(state.backward) - 1
            y.register_hook(self._backward_hook(module, state, slot, x, y, mean, var))

    def _backward_hook(
        self,
        module: nn.Module,
        state: _LayerState,
        slot: int,
        x: Tensor,
        y: Tensor,
        mean: Tensor,
        var: Tensor,
    ) -> Callable[[Tensor], None]:
        """The tensor hook on ``y`` computing ``g_B`` and ``Ψ_B`` of iteration ``slot``.

        ``γ`` is read at forward time (a ``(C,)`` copy), so an optimizer step between this
        forward and its backward cannot change what is recorded.
        """
        dtype = mean.dtype
        weight = _per_channel(module, "weight", x.shape[1])
        bias = _per_channel(module, "bias", x.shape[1])
        gamma = None if weight is None else weight.detach().to(dtype).clone()
        eps = float(getattr(module, "eps", 1e-5))
        scale = float(x.shape[0]) if self.scale_grad_by_batch else 1.0
        dims = [0, *range(2, x.dim())]
        version = x._version
        with torch.no_grad():
            inv_std = torch.rsqrt(var + eps)
            # "output": take x̂ from y now, a copy, as an in-place op after the layer (ReLU)
            # would otherwise change y before backward.
            xhat_out: Tensor | None = None
            if self.normalized == "output" and gamma is None:  # y = x̂ + β
                xhat_out = y.detach().to(dtype)
                if bias is not None:
                    xhat_out = xhat_out - channel_view(bias.detach().to(dtype), x)
            elif self.normalized == "output" and gamma is not None:
                beta = torch.zeros_like(gamma) if bias is None else bias.detach().to(dtype)
                nonzero = gamma != 0
                xhat_out = torch.where(
                    channel_view(nonzero, x),
                    (y.detach().to(dtype) - channel_view(beta, x))
                    / channel_view(torch.where(nonzero, gamma, torch.ones_like(gamma)), x),
                    (x.to(dtype) - channel_view(mean, x)) * channel_view(inv_std, x),
                )

        generation = state.generation

        def hook(grad: Tensor) -> None:
            if state.generation != generation:  # cleared since this forward
                return
            with torch.no_grad():
                if xhat_out is None and x._version != version:
                    # "batch" reads x now; an in-place change since the forward would
                    # corrupt Ψ_B silently, so the iteration is left NaN instead.
                    if not self._warned_version:
                        warnings.warn(
                            "StatsRecorder: a recorded layer's input was modified in place "
                            "between forward and backward; its backward statistics are NaN",
                            stacklevel=2,
                        )
                        self._warned_version = True
                    return
                g = grad.to(dtype)
                if gamma is not None:
                    g = g * channel_view(gamma, g)
                if scale != 1.0:
                    g = g * scale
                if xhat_out is not None:
                    xhat = xhat_out
                else:
                    xhat = (x.to(dtype) - channel_view(mean, x)) * channel_view(inv_std, x)
                stats = state.select(torch.stack([g.mean(dim=dims), (g * xhat).mean(dim=dims)]))
                previous = state.backward[slot]
                # Linear in ∂L/∂y: a second backward through the same forward adds its share.
                state.backward[slot] = stats.float() if previous is None else previous + stats

        return hook

    # -- results -------------------------------------------------------------------------------

    def recording(self) -> Recording:
        """The iterations recorded so far, as float32 CPU tensors."""
        layers = {
            name: state.finish(state.num_channels or _num_channels(self.layers[name]))
            for name, state in self._states.items()
        }
        sizes = Counter(size for stats in layers.values() for size in stats.batch_size.tolist())
        batch_size = sizes.most_common(1)[0][0] if sizes else None
        label = self.label
        if label is None:
            label = f"batch {batch_size}" if len(sizes) == 1 else "run"
        metadata = {
            "batch_size": batch_size,
            "batch_sizes": sorted(sizes),
            "model": type(self.model).__name__,
            "layer_types": {name: type(module).__name__ for name, module in self.layers.items()},
            "normalized": self.normalized,
            "scale_grad_by_batch": self.scale_grad_by_batch,
            "torch": torch.__version__,
            **self.metadata,
        }
        return Recording(label, layers, metadata)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """:meth:`recording` written atomically to ``path`` (``.pt`` or ``.npz``)."""
        return self.recording().save(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """Read a saved recording (same as :meth:`Recording.load`)."""
        return Recording.load(path)


def _per_channel(module: nn.Module, name: str, channels: int) -> Tensor | None:
    """``module.<name>`` when it is a per-channel ``(C,)`` tensor (a norm layer's γ or β),
    else ``None``: a conv's weight, say, is no affine of a normalized input."""
    value = getattr(module, name, None)
    if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == channels:
        return value
    return None


def _num_channels(module: nn.Module) -> int:
    """Channel count of a layer never called: ``num_features`` where it has one."""
    return int(getattr(module, "num_features", 0) or 0)


# -- analysis ----------------------------------------------------------------------------------


def _detrended(values: Tensor, window: int | None) -> Tensor:
    """``values`` (``(T, K)``) minus a centred moving average of ``window`` iterations.

    Statistics drift as the weights train; the moving average removes that slow part so
    that what remains is the iteration-to-iteration noise the batch size causes.  The first
    and last ``window // 2`` iterations, without a full window, are dropped.
    """
    if window is None or window <= 1:
        return values
    t = values.shape[0]
    if t < window:
        return values[:0]
    kernel = torch.full((1, 1, window), 1.0 / window, dtype=torch.float64)
    series = values.to(torch.float64).T.unsqueeze(1)  # (K, 1, T)
    trend = torch.nn.functional.conv1d(series, kernel).squeeze(1).T  # (T - window + 1, K)
    half = window // 2
    return values[half : half + trend.shape[0]].to(torch.float64) - trend


def fluctuation(
    stats: LayerStats | Recording,
    layer: str | None = None,
    channel: int | None = None,
    *,
    window: int | None = None,
    skip: int = 0,
) -> dict[str, float]:
    """How much each statistic fluctuates over iterations: ``{name: value}``.

    For every recorded channel (or only ``channel``) the standard deviation over iterations
    of the statistic (``std_t s_t``, NaN iterations ignored), averaged over channels.  With
    ``window``, the deviation from a centred moving average of that many iterations is used
    instead, which removes the slow drift from training; ``skip`` drops the first iterations.
    NaN when fewer than two iterations remain.
    """
    if isinstance(stats, Recording):
        if layer is None:
            if len(stats.layers) != 1:
                raise ValueError("fluctuation: the recording has several layers; pass layer=")
            layer = next(iter(stats.layers))
        stats = stats[layer]
    result = {}
    for name in STATISTICS:
        values = stats.statistic(name)[skip:]
        if channel is not None:
            values = values[:, stats._position(channel) : stats._position(channel) + 1]
        values = _detrended(values.to(torch.float64), window)
        finite = values.isfinite()
        count = finite.sum(dim=0)
        zeroed = torch.where(finite, values, torch.zeros_like(values))
        mean = zeroed.sum(dim=0) / count.clamp_min(1)
        var = torch.where(finite, values - mean, torch.zeros_like(values)).square().sum(dim=0)
        std = (var / (count - 1).clamp_min(1)).sqrt()
        valid = count >= 2
        result[name] = float(std[valid].mean()) if bool(valid.any()) else math.nan
    return result


def summarize_fluctuation(
    records: Mapping[str, Recording],
    layer: str,
    channel: int | None = None,
    *,
    window: int | None = None,
    skip: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`fluctuation` of ``layer`` for every run: ``{run label: {statistic: value}}``."""
    return {
        label: fluctuation(record, layer, channel, window=window, skip=skip)
        for label, record in records.items()
    }


def format_fluctuation_table(summary: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A Markdown table of :func:`summarize_fluctuation`: one column per run, then the ratio
    of the first run's fluctuation to the last's (e.g. batch 2 / batch 32)."""
    runs = list(summary)
    header = ["statistic", *(f"std ({run})" for run in runs)]
    if len(runs) >= 2:
        header.append(f"ratio {runs[0]} / {runs[-1]}")
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in STATISTICS:
        values = [summary[run][name] for run in runs]
        cells = [STATISTIC_LABELS[name], *(f"{v:.4g}" for v in values)]
        if len(runs) >= 2:
            last = values[-1]
            cells.append(f"{values[0] / last:.2f}" if last > 0 else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_stats(
    records: Mapping[str, Recording],
    layer: str,
    path: str | os.PathLike[str],
    channel: int | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Plot ``μ_B``, ``σ²_B``, ``g_B``, ``Ψ_B`` of ``layer`` against the iteration, one
    line per run (the mapping's keys label them), in four panels; writes a PNG atomically.

    Each line is the channel average (``channel=None``) or one channel of the layer, as in
    Figure 2 of Yan et al. (ICLR 2020), which compares batch 2 with batch 32.  Uses
    matplotlib's Agg canvas directly, so neither pyplot nor the global backend is touched.
    """
    require("matplotlib", "plot_stats")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not records:
        raise ValueError("plot_stats: no recordings to plot")
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    # The noisiest curve (usually the smallest batch) first, so the smoother ones stay
    # visible on top of it.
    order = sorted(records, key=lambda run: _iteration_noise(records[run][layer]), reverse=True)
    colors = {run: f"C{i}" for i, run in enumerate(records)}
    flags = {bool(record.metadata.get("scale_grad_by_batch")) for record in records.values()}
    scaled = {frozenset([True]): " (∂L/∂y × N)", frozenset([False]): ""}.get(
        frozenset(flags), " (∂L/∂y × N in some runs only)"
    )
    lines: dict[str, Line2D] = {}  # the first panel's line of each run, for the legend
    for ax, name in zip(axes, STATISTICS, strict=True):
        for run in order:
            series = records[run][layer].channel_series(name, channel).numpy()
            steps = np.arange(1, len(series) + 1)
            (line,) = ax.plot(steps, series, color=colors[run], linewidth=0.8, alpha=0.85)
            lines.setdefault(run, line)
        ax.set_title(STATISTIC_LABELS[name] + (scaled if name.startswith("grad") else ""))
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in axes[2:]:
        ax.set_xlabel("iteration")
    # Handles kept per run rather than read back with get_legend_handles_labels(), which
    # skips artists whose label starts with "_" (matplotlib's "hide from legend" marker),
    # so a run named "_baseline" would be missing from it.
    axes[0].legend([lines[run] for run in records], list(records), loc="best")
    what = "mean over channels" if channel is None else f"channel {channel}"
    figure.suptitle(title or f"Batch statistics of {layer} ({what})")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    target = Path(path)
    atomic_write(target, lambda handle: handle.write(buffer.getvalue()))
    return target


def _iteration_noise(stats: LayerStats) -> float:
    """Mean absolute iteration-to-iteration change of the channel-averaged ``μ_B``."""
    series = stats.channel_series("mean")
    if series.numel() < 2:
        return 0.0
    value = float(series.diff().abs().nanmean())
    return 0.0 if math.isnan(value) else value
