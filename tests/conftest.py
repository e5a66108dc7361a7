"""Shared test configuration: the hypothesis profile and a seeded torch RNG."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# tests/ on sys.path, so that tests in subfolders can `import reference` and `_layer_checks`
# whatever pytest's import mode.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_configure(config: pytest.Config) -> None:
    """Make torchvision importable in this process too (tests/zoo/_thirdparty.py says how).

    pytest-xdist's controller re-imports the module of every warning category a worker
    reports; Lightning's and mmengine's categories import torchvision, whose import fails on
    this CPU torch without the zoo's stub, and that crashed the whole run."""
    zoo = str(Path(_TESTS) / "zoo")
    if zoo not in sys.path:
        sys.path.append(zoo)
    try:
        import _thirdparty

        _thirdparty._import_torchvision()  # returns the error instead of raising
    except Exception:  # noqa: BLE001 - without the zoo's packages there is nothing to prepare
        pass


settings.register_profile(
    "smallbn",
    deadline=None,  # first calls pay torch's lazy initialization; timing is not under test
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # keep the working tree clean; failures print a reproduction blob
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("smallbn"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "smallbn"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--zoo",
        choices=("ci", "all"),
        default="ci",
        help="tests/zoo: 'ci' (default) runs one architecture per family with every method, "
        "'all' every architecture (make test-zoo)",
    )


@pytest.fixture(autouse=True)
def seed_torch() -> Iterator[None]:
    """Every test starts from the same torch RNG state (and leaves the global one as found)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


#: The devices every device-parametrised test runs on: CPU always, CUDA where torch sees a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """A test taking ``device`` runs once per available device (``DEVICES``)."""
    return torch.device(request.param)
