"""What a smallbn layer checks when it loads a checkpoint (``load_state_dict``).

Every value is validated before anything is copied, so a damaged file (a NaN running
variance, a negative step count, an infinite window entry) is refused with the layer's name
instead of surfacing steps later, elsewhere; shape mismatches say which option of the layer
differs; BN checkpoints from before ``num_batches_tracked`` load as torch's BN loads them.
Layers add their own entries to ``_checkpoint_rules``, refuse checkpoints made for other
options in ``_checkpoint_refusal`` (also before anything is copied), migrate checkpoints of
older layouts by their state_dict ``_version`` in ``_migrate`` and fit them to their options
in ``_adapt_state_dict``; :class:`smallbn.layers._base.NormBase` derives from
:class:`CheckpointChecksMixin`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["CheckpointChecksMixin"]


class CheckpointChecksMixin(nn.Module):
    """``_load_from_state_dict`` with the checks of the module docstring.  The layer provides
    ``describe()``, ``track_running_stats``, ``num_batches_tracked``, ``_stats_shape()`` and
    ``_running_stats_in_state_dict``."""

    track_running_stats: bool
    num_batches_tracked: Tensor | None
    _running_stats_in_state_dict: ClassVar[bool]  # NormBase's (and the layers') choice

    def describe(self) -> str:
        raise NotImplementedError

    def _stats_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        refusal = self._checkpoint_refusal(state_dict, prefix)
        if refusal is not None:
            # As for invalid values: nothing is copied, this layer keeps its state.
            error_msgs.append(refusal)
            return
        self._migrate(state_dict, prefix, local_metadata.get("version"))
        kept: dict[str, Tensor] = {}
        if not self._running_stats_in_state_dict:
            kept = self._take_bn_statistics(state_dict, prefix, error_msgs)
        self._adapt_state_dict(state_dict, prefix)
        problems = self._checkpoint_problems({**state_dict, **kept}, prefix)
        if problems:
            # Refused before anything is copied: this layer keeps its state.  A NaN running
            # variance or a negative count would otherwise surface steps later, elsewhere.
            error_msgs.append(
                f"{self.describe()}: the checkpoint's values are invalid: "
                f"{'; '.join(problems)}. The file is damaged or was written by another "
                f"program: load an intact checkpoint, or drop these keys and load with "
                f"strict=False to keep this layer's own values."
            )
            return
        with torch.no_grad():
            for key, value in kept.items():
                buffer = self._buffers[key[len(prefix) :]]
                assert buffer is not None  # _take_bn_statistics keeps only registered ones
                buffer.copy_(value)
        first_new = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for i in range(first_new, len(error_msgs)):
            if error_msgs[i].startswith("size mismatch"):
                error_msgs[i] = (
                    f"{self.describe()}: incompatible checkpoint ({error_msgs[i]}). "
                    f"{self._checkpoint_mismatch(state_dict, prefix)}"
                )
        self._reload_host_state()

    def _checkpoint_refusal(self, state_dict: dict[str, Any], prefix: str) -> str | None:
        """Why this layer cannot take a checkpoint at all (made for another option that its
        entries cannot be fitted to: the message names the layer, what differs and the fix),
        or ``None``.  Asked first, so that a refused checkpoint changes nothing."""
        return None

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        """Bring this layer's entries of a checkpoint saved at an older state_dict layout
        (``version``, from ``state_dict._metadata``; ``None`` where a state_dict lost its
        metadata) to the current ``_version``, in place — as torch's ``_NormBase`` adds
        ``num_batches_tracked`` to checkpoints before version 2.  Layers whose layout
        changed override it (calling this one) and bump ``_version``."""
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints from before BN had this buffer (torch < 0.4.1) load as torch's BN
            # does: the layer keeps its own count (a restart of BRN's ramp would be silent).
            current = self.num_batches_tracked
            keep = current is not None and current.device != torch.device("meta")
            state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)

    def _checkpoint_mismatch(self, state_dict: dict[str, Any], prefix: str) -> str:
        """What differs between this layer and a checkpoint with tensors of other shapes, and
        the fix; layers with more than channels in their shapes (one row per domain) say which
        of their options differs."""
        return (
            f"This layer holds statistics of shape {self._stats_shape()}; build it with the "
            f"checkpoint's num_features, or load a checkpoint made for this model."
        )

    #: Checkpoint entries and the values they must hold: ``"finite"``, ``"non-negative"``
    #: (finite and ≥ 0) or ``"count"`` (an integer ≥ 0).  Layers add their own state.
    _checkpoint_rules: ClassVar[dict[str, str]] = {
        "weight": "finite",
        "bias": "finite",
        "running_mean": "finite",
        "running_var": "non-negative",
        "num_batches_tracked": "count",
    }

    def _checkpoint_problems(self, state_dict: dict[str, Any], prefix: str) -> list[str]:
        """What is wrong with the values of this layer's entries of ``state_dict`` (a NaN
        running variance, a negative count, an infinite window entry), one line each."""
        problems = []
        for name, rule in self._checkpoint_rules.items():
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or value.numel() == 0 or value.is_meta:
                continue
            if rule == "count":
                if value.is_floating_point() or bool((value < 0).any()):
                    problems.append(f"'{prefix}{name}' must be a count >= 0, got {value.tolist()}")
                continue
            checked = value.detach().double()
            finite = torch.isfinite(checked)
            if not bool(finite.all()):
                where = torch.nonzero(~finite.flatten()).flatten().tolist()[:8]
                problems.append(f"'{prefix}{name}' holds NaN/Inf (at flat index {where})")
            elif rule == "non-negative" and bool((checked < 0).any()):
                problems.append(f"'{prefix}{name}' holds negative values (min {checked.min():.3g})")
        return problems

    def _take_bn_statistics(
        self, state_dict: dict[str, Any], prefix: str, error_msgs: list[str]
    ) -> dict[str, Tensor]:
        """Take a BN checkpoint's running statistics out of ``state_dict`` (where, for a layer
        that does not save them, they would be unexpected), to be copied into its in-memory
        buffers once the checkpoint's values are checked.  Statistics of another shape are
        an error naming the layer, not dropped in silence."""
        kept: dict[str, Tensor] = {}
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value, buffer = state_dict.pop(prefix + name, None), self._buffers.get(name)
            if not isinstance(value, Tensor) or buffer is None:
                continue
            if value.shape != buffer.shape:
                error_msgs.append(
                    f"{self.describe()}: incompatible checkpoint ('{prefix}{name}' has shape "
                    f"{tuple(value.shape)}, this layer's {tuple(buffer.shape)}). "
                    f"{self._checkpoint_mismatch(state_dict, prefix)}"
                )
                continue
            kept[prefix + name] = value
        return kept

    def _adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Fit a checkpoint of any version to this layer's options, in place (e.g. one row
        per domain, a window of another size): what depends on how the layer was built, not
        on when the checkpoint was written (that is :meth:`_migrate`)."""

    def _reload_host_state(self) -> None:
        """Re-read any host-side copy of buffer state (kept to avoid a device read per step)
        after the buffers were written directly: loaded here, or restored by a tool
        (:meth:`NormBase.buffers_restored`)."""
