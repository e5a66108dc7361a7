"""The shared evaluation loop: its error against numpy on the logits of one full pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smallbn.experiments.models import SmallResNet
from smallbn.experiments.train import evaluate


@pytest.mark.parametrize("norm", ["bn", "sn", "gn", "mabn"])
def test_evaluate_error_is_independent_of_its_batch_size(norm):
    torch.manual_seed(0)
    model = SmallResNet(num_classes=5, widths=(4, 8), norm=norm)
    x, y = torch.randn(37, 1, 12, 12), torch.randint(0, 5, (37,))
    model.train()
    for _ in range(3):  # population statistics that differ from any one eval batch's
        model(torch.randn(8, 1, 12, 12) * 2 + 1)
    model.eval()
    with torch.no_grad():
        logits = model(x).numpy()
    expected = float(np.mean(np.argmax(logits, axis=1) != y.numpy()))
    model.train()
    for batch_size in (1, 5, 128):
        assert evaluate(model, x, y, batch_size=batch_size) == pytest.approx(expected, abs=1e-12)
        assert model.training  # the caller's mode is restored
