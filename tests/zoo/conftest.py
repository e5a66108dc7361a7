"""The zoo's configuration: no downloads, and which architectures run.

``make test`` (``pytest``, ``--zoo=ci``, the default) runs the architectures marked ``ci`` in
``_architectures.py`` (one per family) with every method; ``make test-zoo`` (``--zoo=all``)
runs every architecture.  The third-party packages are imported by the tests themselves
(through ``_thirdparty``, which skips a test whose package does not import), never at
collection, so the rest of the suite runs without them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Nothing in the zoo may download: every model is built with random weights, and an attempt
# to fetch anything fails loudly instead of reaching the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"the zoo must not download anything (asked for {args[:1]})")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    yield


@pytest.fixture(autouse=True)
def threads_per_worker() -> Iterator[None]:
    """Under pytest-xdist, each worker's torch uses its share of the cores: torch's default
    (every core in every worker) oversubscribes them, and its spinning threads made the zoo
    3-4x slower on 2 cores with 2 workers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from _architectures import ARCHITECTURES

    if config.getoption("--zoo", default="ci") == "all":
        return
    selected, deselected = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        arch = callspec.params.get("arch") if callspec is not None else None
        if item.get_closest_marker("zoo") is not None and isinstance(arch, str):
            (selected if ARCHITECTURES[arch].ci else deselected).append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
