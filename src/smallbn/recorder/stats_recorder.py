"""The recording itself: :class:`StatsRecorder`, the context manager whose hooks take the
forward statistics ``μ_B``, ``σ²_B`` of a layer's input and the backward statistics ``g_B``,
``Ψ_B`` of the gradient reaching its output (Yan et al., ICLR 2020, Eq. 4; the math is in
:mod:`smallbn.recorder`), into a :class:`~.recording.Recording`."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from smallbn.convert import is_norm_layer
from smallbn.recorder.recording import LayerStats, Recording
from smallbn.stats import channel_moments, channel_view

Normalized = Literal["batch", "output"]
Channels = Sequence[int] | Mapping[str, Sequence[int]] | None


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
