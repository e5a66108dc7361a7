"""``norm_batch_size``: a simulated small normalization batch inside a larger batch, for
Batch Renorm and Switchable Norm (vectorized over groups)."""

from __future__ import annotations

import copy

import pytest
import torch

import smallbn

LAYERS = {
    "brn": lambda **kw: smallbn.BatchRenorm2d(
        3, warmup_steps=0, r_max_ramp_end=1, d_max_ramp_end=1, r_max=1.5, d_max=0.5, **kw
    ),
    "sn": lambda **kw: smallbn.SwitchableNorm2d(3, **kw),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(("batch", "group"), [(8, 2), (7, 3), (5, 4)])
def test_grouped_call_equals_each_group_alone(name, batch, group):
    torch.manual_seed(0)
    layer = LAYERS[name](norm_batch_size=group, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    if name == "sn":
        with torch.no_grad():
            layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    before = copy.deepcopy(layer)
    x = (torch.randn(batch, 3, 4, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    y = layer(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    means, variances = [], []
    for start in range(0, batch, group):
        alone = copy.deepcopy(before)
        alone.norm_batch_size = None
        part = x.detach()[start : start + group].clone().requires_grad_()
        y_part = alone(part)
        (y_part * upstream[start : start + group]).sum().backward()
        torch.testing.assert_close(y[start : start + group], y_part, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x.grad[start : start + group], part.grad, rtol=1e-9, atol=1e-9)
        flat = part.detach().transpose(0, 1).reshape(3, -1)
        means.append((flat.mean(1), flat.shape[1]))
        variances.append(flat.var(1))
    counts = torch.tensor([c for _, c in means], dtype=torch.float64)
    weights = (counts / counts.sum()).unsqueeze(1)
    mean = (weights * torch.stack([m for m, _ in means])).sum(0)
    var = (weights * torch.stack(variances)).sum(0)
    momentum = layer.momentum
    torch.testing.assert_close(
        layer.running_mean, (1 - momentum) * before.running_mean + momentum * mean
    )
    torch.testing.assert_close(
        layer.running_var, (1 - momentum) * before.running_var + momentum * var
    )
