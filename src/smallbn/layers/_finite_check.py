"""The NaN/Inf check of batch statistics that every smallbn layer runs in training.

A non-finite statistic poisons the running statistics and every later output, so each layer
looks for one in every training step; reading the answer on the host is a device
synchronization on CUDA, hence the modes of :func:`set_finite_check` (every step, deferred
to a device-side flag read every ``interval`` calls, or off).  :class:`FiniteCheckMixin`
holds a layer's side of it (the flag, its reads, the errors that name the layer);
:class:`smallbn.layers._base.NormBase` derives from it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from smallbn.stats import Moments

__all__ = [
    "FiniteCheck",
    "FiniteCheckMixin",
    "check_finite",
    "set_finite_check",
]

#: ``"auto"``: every step on CPU, deferred elsewhere; ``"step"``: every step on every device;
#: ``"deferred"``: deferred on every device; ``"off"``: never (see :func:`set_finite_check`).
FiniteCheck = Literal["auto", "step", "deferred", "off"]
_FINITE_CHECK: FiniteCheck = "auto"
#: Training calls of a layer between two reads of its deferred flag.
_DEFERRED_INTERVAL = 100


def set_finite_check(mode: bool | FiniteCheck, *, interval: int | None = None) -> FiniteCheck:
    """Choose how layers detect NaN/Inf batch statistics; returns the previous mode.

    A non-finite statistic poisons the running statistics and every later output, so layers
    look for one in every training step.  Reading the answer on the host is free on CPU but a
    device synchronization on CUDA (one per layer and step: 53 in a ResNet-50), which also
    breaks CUDA graphs and ``torch.compile`` graphs.  Hence the modes:

    * ``"auto"`` (default, also ``True``): on CPU, outside ``torch.compile``, as ``"step"``;
      elsewhere as ``"deferred"``.
    * ``"step"``: every layer reads its flag every step and raises at once, naming the layer,
      the channels and the cause (a non-finite input, or a finite one whose squares overflow);
      the rejected step leaves the layer's state unchanged.  Under ``torch.compile`` each
      read is a graph break: the strict mode, for debugging.
    * ``"deferred"``: each layer keeps a device-side flag (the first of its training calls
      whose statistics were not finite) with no host read in the step, and reads it every
      ``interval`` training calls (default 100), when it is put in eval mode, and in
      :func:`check_finite`.  The error names the layer and the call; the running statistics
      of the steps in between may already hold NaN.
    * ``"off"`` (also ``False``): no check.
    """
    global _FINITE_CHECK, _DEFERRED_INTERVAL
    modes: tuple[FiniteCheck, ...] = ("auto", "step", "deferred", "off")
    chosen: FiniteCheck
    if isinstance(mode, bool):
        chosen = "auto" if mode else "off"
    elif mode in modes:
        chosen = mode
    else:
        raise ValueError(f"set_finite_check: mode must be one of {modes} or a bool, got {mode!r}")
    if interval is not None:
        if isinstance(interval, bool) or int(interval) < 1:
            raise ValueError(f"set_finite_check: interval must be >= 1, got {interval!r}")
        _DEFERRED_INTERVAL = int(interval)
    old, _FINITE_CHECK = _FINITE_CHECK, chosen
    return old


def deferred_interval() -> int:
    """Training calls of a layer between two reads of its deferred flag."""
    return _DEFERRED_INTERVAL


def check_finite(model: nn.Module) -> None:
    """Raise ``FloatingPointError`` if a layer of ``model`` recorded non-finite batch
    statistics under the deferred check (:func:`set_finite_check`), naming the first one:
    the earliest training call, then the first in module order.  One host read per device.
    Call it where a synchronization costs nothing, e.g. after logging the loss."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FiniteCheckMixin)]
    if not layers:
        return
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, layer) in enumerate(layers):
        by_device.setdefault(layer._nonfinite_call.device, []).append(i)
    first: list[int] = [-1] * len(layers)
    for indices in by_device.values():
        values = torch.stack([layers[i][1]._nonfinite_call for i in indices]).tolist()
        for i, value in zip(indices, values, strict=True):
            first[i] = int(value)
    found = [(call, i) for i, call in enumerate(first) if call >= 0]
    if found:
        call, i = min(found)
        name, layer = layers[i]
        layer._raise_deferred(call, name)


class FiniteCheckMixin(nn.Module):
    """A layer's side of the finite check: two device-side counters (never in the
    ``state_dict``) — its training calls so far and the first whose statistics were not
    finite (-1: none) — so that recording costs no host read, and the errors that name the
    layer (:meth:`describe`, which the layer provides)."""

    _training_calls: Tensor
    _nonfinite_call: Tensor

    def _init_finite_check(self, device: torch.device | str | None) -> None:
        long: dict[str, Any] = {"dtype": torch.long, "device": device}
        self.register_buffer("_training_calls", torch.zeros((), **long), persistent=False)
        self.register_buffer("_nonfinite_call", torch.full((), -1, **long), persistent=False)
        self._unchecked_calls = 0  # host-side: calls since the deferred flag was last read

    def describe(self) -> str:
        raise NotImplementedError

    def _finite_check_now(self, value: Tensor) -> bool | None:
        """How to check ``value`` (a statistic of this step) for NaN/Inf: ``True`` on the host
        now, ``False`` deferred (:meth:`_record_finite`), ``None`` not at all."""
        mode = _FINITE_CHECK
        if mode == "off":
            return None
        if mode == "step":
            return True
        if mode == "auto":
            return value.device.type == "cpu" and not torch.compiler.is_compiling()
        return False

    def _record_finite(self, finite: Tensor, *, new_call: bool = True) -> None:
        """Deferred check: remember, on the device, whether ``finite`` (a 0-dim bool tensor)
        is false at this training call, with no host read; read the flag every
        ``interval`` eager calls (:func:`set_finite_check`).  ``new_call=False``: a second
        check within the same call (which must not count as another call)."""
        calls, first = self._training_calls, self._nonfinite_call
        if new_call:
            calls.add_(1)
        first.copy_(torch.where(finite.to(first.device) | (first >= 0), first, calls))
        if not new_call or torch.compiler.is_compiling():
            return  # the compiled graph keeps no host state: check_finite() reads the flag
        self._unchecked_calls += 1
        if self._unchecked_calls >= _DEFERRED_INTERVAL:
            self._read_deferred()

    def _read_deferred(self) -> None:
        """One host read of the deferred flag; raises if a call recorded non-finite values."""
        self._unchecked_calls = 0
        call = int(self._nonfinite_call)
        if call >= 0:
            self._raise_deferred(call)

    def _raise_deferred(self, call: int, where: str | None = None) -> None:
        """The deferred check's error (``where``: the layer's path, if the caller knows it)."""
        who = self.describe()
        if where and " at '" not in who:
            who = f"{who} at '{where}'"
        raise FloatingPointError(
            f"{who}: batch statistics were NaN or Inf in training call {call} of "
            f"this layer (found by the deferred check, which reads a device-side flag every "
            f"{_DEFERRED_INTERVAL} calls, in eval() and in smallbn.check_finite(model); the "
            f"running statistics may hold NaN since). Either the input contains NaN/Inf or "
            f"its values square past the statistics' dtype (|x| above ~1e19 in float32). "
            f"Rerun with smallbn.set_finite_check('step') to stop at that step with the "
            f"channels and the cause; usual fixes are a lower learning rate, gradient "
            f"clipping, or scaling the input down."
        )

    def train(self, mode: bool = True) -> Any:
        if not mode and self.training and _FINITE_CHECK != "off" and self._unchecked_calls:
            self._read_deferred()  # leaving training: the place to surface a deferred NaN
        return super().train(mode)

    def _check_finite(self, moments: Moments, x: Tensor | None = None) -> None:
        """Raise ``FloatingPointError`` naming the layer if ``moments`` hold a NaN/Inf; with
        the layer's input ``x`` the message tells a non-finite input from a finite one whose
        squares overflow the statistics' dtype (|x| above ~1e19 in float32: the variance of
        a batch of such values is not representable, and neither is a running variance).
        Deferred (:func:`set_finite_check`), only a device-side flag is recorded."""
        total = moments.mean.sum() + moments.var.sum()
        now = self._finite_check_now(total)
        if now is None:
            return
        if not now:
            self._record_finite(torch.isfinite(total))
            return
        if bool(torch.isfinite(total)):
            return
        bad = ~(torch.isfinite(moments.mean) & torch.isfinite(moments.var))
        if not bool(bad.any()):
            return  # every statistic is finite; only the check's own sum overflowed
        channels = torch.nonzero(bad.reshape(-1, bad.shape[-1]).any(0)).flatten().tolist()
        shown = channels[:8] + (["..."] if len(channels) > 8 else [])
        skip = "(smallbn.set_finite_check(False) skips this check.)"
        if x is not None and bool(torch.isfinite(x).all()):
            largest = float(x.detach().abs().amax())
            raise FloatingPointError(
                f"{self.describe()}: batch statistics overflow {moments.var.dtype} in "
                f"channel(s) {shown}: the input is finite, but its values (largest |x| = "
                f"{largest:.3g}) square past what {moments.var.dtype} holds (~3.4e38 for "
                f"float32), so neither the batch variance nor a running variance is "
                f"representable. Scale the input down (normalize the data, or lower the "
                f"scale of the layer before), or run this layer and its input in float64. "
                f"{skip}"
            )
        what = (
            "the input to this layer contains NaN/Inf"
            if x is not None
            else "the input to this layer contains NaN/Inf, or values whose squares overflow "
            "the statistics' dtype (|x| above ~1e19 in float32)"
        )
        raise FloatingPointError(
            f"{self.describe()}: batch statistics are NaN or Inf in channel(s) {shown}: "
            f"{what}. Find the source with torch.autograd.set_detect_anomaly(True); usual "
            f"fixes are a lower learning rate, gradient clipping, or a larger eps. {skip}"
        )
