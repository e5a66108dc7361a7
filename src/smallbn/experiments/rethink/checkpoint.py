"""A study run's checkpoint (:class:`_Checkpoint`): its stage, training state and what it has
measured so far, written atomically and checked against the run before it is resumed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smallbn._io import atomic_write
from smallbn.experiments import compare
from smallbn.experiments.compare import CheckpointError
from smallbn.experiments.rethink.config import StudyConfig

_CHECKPOINT_VERSION = 1


class _Checkpoint:
    """A run's checkpoint: its stage, training state and what it has measured so far.  A file
    that does not fit the run raises :class:`CheckpointError` naming it (never discarded)."""

    def __init__(self, path: Path, config: StudyConfig, total: int) -> None:
        self.path, self.config, self.total = path, config, total

    def _unusable(self, reason: str) -> CheckpointError:
        return compare.training._unusable(self.path, self.config.tag, reason)

    def load(self, stages: Sequence[str]) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            step, stage = state["step"], state["stage"]
            key, total, version = state["key"], state["total"], state["version"]
        except Exception as error:  # any failure to read it: the file is the problem
            raise self._unusable(f"{type(error).__name__}: {error}") from error
        if version != _CHECKPOINT_VERSION:
            raise self._unusable(f"it is of checkpoint version {version!r}")
        if key != self.config.key:
            raise self._unusable(
                f"it was written for another run: {compare._differences(self.config.key, key)}"
            )
        if total != self.total:
            raise self._unusable(
                f"it was written for a run of {total} steps and this run has {self.total}: "
                f"the training data or the code changed since"
            )
        if stage not in stages:
            raise self._unusable(f"unknown stage {stage!r}")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.total:
            raise self._unusable(f"it is at step {step!r}, outside this run's {self.total} steps")
        return state  # type: ignore[no-any-return]

    def save(self, state: dict[str, Any]) -> None:
        state = {
            **state,
            "key": self.config.key,
            "total": self.total,
            "version": _CHECKPOINT_VERSION,
        }
        atomic_write(self.path, lambda handle: torch.save(state, handle))

    def restore(
        self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        except Exception as error:
            raise self._unusable(f"{type(error).__name__}: {error}") from error
