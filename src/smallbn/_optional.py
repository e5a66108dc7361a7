"""The optional packages: matplotlib (plots, ``smallbn[plot]``), pillow and scikit-learn
(image folders and the digits, ``smallbn[data]``) and tqdm (progress bars).  The library
itself needs torch and numpy only; a feature that needs a missing package says which and
how to install it (:func:`require`), and progress bars are left out without tqdm."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from types import ModuleType, TracebackType
from typing import Any

__all__ = ["require", "tqdm"]

#: module → the extra that installs it.
EXTRAS = {"matplotlib": "plot", "PIL": "data", "sklearn": "data", "tqdm": "jobs"}


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming ``purpose``, the package
    and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = {"PIL": "pillow", "sklearn": "scikit-learn"}.get(top, top)
        raise ImportError(
            f"{purpose} needs {package}, which is not installed: pip install "
            f"'smallbn[{EXTRAS.get(top, 'jobs')}]' (or pip install {package})"
        ) from error


class _NoBar:
    """tqdm's interface where tqdm is not installed: iterates, counts, shows nothing."""

    def __init__(self, iterable: Iterable[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        self.iterable = iterable
        self.n = int(kwargs.get("initial", 0))

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional: the work is the same without them
    tqdm = _NoBar  # type: ignore[assignment,misc]
