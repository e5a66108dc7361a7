"""Every layer computes the same on channels-last inputs (``torch.channels_last``, which the
comparison job trains in) as on contiguous ones: outputs, input and parameter gradients and
state, over several SGD steps with the layer's window/schedule state advancing."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from smallbn import available_norms, build_norm
from smallbn.convert import bind_producers

_GROUPED: list[tuple[str, dict[str, Any]]] = [
    ("ghostbn", {"group_size": 2}),
    ("brn", {"norm_batch_size": 2, "warmup_steps": 0, "r_max_ramp_end": 2, "d_max_ramp_end": 2}),
    ("sn", {"norm_batch_size": 2}),
    ("cbn", {"norm_batch_size": 2, "window": 3, "burnin": 0}),
    ("cbn", {"window": 3, "burnin": 0}),
    ("mabn", {"norm_batch_size": 2}),
    ("domainbn", {"num_domains": 1}),
]
CASES = [(name, {}) for name in available_norms() if name != "domainbn"] + _GROUPED


def _block(name: str, options: dict[str, Any]) -> nn.Module:
    block = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        build_norm(name, 8, **options),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).double()
    bind_producers(block)
    return block


@pytest.mark.parametrize(
    "name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES]
)
def test_channels_last_matches_contiguous(name: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. CBN without a producer for the second conv
        contiguous = _block(name, options)
        channels_last = copy.deepcopy(contiguous)
        bind_producers(channels_last)
        channels_last = channels_last.to(memory_format=torch.channels_last)
        weights = torch.randn(6, 4, 7, 5, dtype=torch.float64)
        for step in range(4):
            # Same state before every step: differences cannot compound, so a tight
            # tolerance holds for every method (clipping and windows included).
            channels_last.load_state_dict(contiguous.state_dict())
            x = torch.randn(6, 3, 7, 5, dtype=torch.float64)
            results = []
            for block, layout in ((contiguous, torch.contiguous_format), (channels_last, None)):
                if layout is None:
                    xi = x.contiguous(memory_format=torch.channels_last).requires_grad_()
                    assert xi.is_contiguous(memory_format=torch.channels_last)
                else:
                    xi = x.clone().requires_grad_()
                y = block(xi)
                (y * weights).sum().backward()
                grads = [p.grad.clone() for p in block.parameters()]
                with torch.no_grad():
                    for p in block.parameters():
                        p -= 0.1 * p.grad
                        p.grad = None
                results.append((y.detach(), xi.grad, grads, block.state_dict()))
            (y0, gx0, g0, s0), (y1, gx1, g1, s1) = results
            torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-10, msg=f"step {step} output")
            torch.testing.assert_close(gx1, gx0, rtol=1e-9, atol=1e-10, msg=f"step {step} grad x")
            for a, b in zip(g1, g0, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
            for key in s0:
                torch.testing.assert_close(
                    s1[key], s0[key], rtol=1e-9, atol=1e-10, msg=f"step {step} {key}"
                )
        contiguous.eval()
        channels_last.eval()
        channels_last.load_state_dict(contiguous.state_dict())
        x = torch.randn(6, 3, 7, 5, dtype=torch.float64)
        torch.testing.assert_close(
            channels_last(x.contiguous(memory_format=torch.channels_last)), contiguous(x)
        )
