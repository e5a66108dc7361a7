"""Run by ``make wheel-check`` in a fresh environment where only the smallbn wheel was
installed: smallbn comes from the wheel (not the source tree), its dependencies are torch and
numpy (with what they need), and the library imports and trains a step."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import torch

import smallbn

here = Path(smallbn.__file__).resolve()
assert "site-packages" in here.parts, f"smallbn imported from {here}, not from the wheel"
requires = importlib.metadata.requires("smallbn") or []
core = sorted(
    r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires if "extra" not in r
)
assert core == ["numpy", "torch"], core
for optional in ("tqdm", "matplotlib", "PIL", "sklearn"):
    try:
        __import__(optional)
    except ImportError:
        continue
    sys.exit(f"{optional} is installed: the wheel should not have brought it")
model = smallbn.convert(
    torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), "mabn"
)
model(torch.randn(2, 3, 8, 8)).sum().backward()
smallbn.precise_bn(model, [torch.randn(2, 3, 8, 8)] * 4, 8, progress=True)
print(f"smallbn {smallbn.__version__} from {here.parent}: requires {core}; a MABN step ran")
