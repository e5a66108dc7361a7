"""A recording of batch statistics (:class:`Recording`: one :class:`LayerStats` per layer)
and its file formats (``.pt`` and ``.npz``, both read without pickle).  What the four
statistics are is in :mod:`smallbn.recorder`; :class:`~.stats_recorder.StatsRecorder` makes
recordings."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smallbn._io import atomic_write

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
