"""The shape of the code a newcomer has to carry on (docs/design.md): modules short enough to
hold, data flowing one way between the layers of the package, and the machinery the layers
share kept in one place instead of copies."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "smallbn"
MODULES = sorted(PACKAGE.rglob("*.py"))

#: Lines above which a module must say why it is long (in its docstring).
MAX_LINES = 700
LONG_REASON = "Why this module is long:"

#: docs/design.md's layers: core ← layers ← tools ← jobs; a module imports from its own
#: layer or those below, never from above.
LAYERS: dict[str, int] = {
    "stats": 0,
    "_distributed": 0,
    "graph": 0,
    "_io": 0,
    "_optional": 0,
    "layers": 1,
    "registry": 2,
    "convert": 2,
    "population": 2,
    "fold": 2,
    "recorder": 2,
    "mixture": 2,
    "checkpoints": 2,
    "integrations": 2,
    "experiments": 3,
    "bench": 3,
    "cli": 3,
    "__main__": 3,
}


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _layer(module: str) -> int | None:
    """The layer of ``smallbn.<top>...``; ``None`` for the package's ``__init__`` (it
    re-exports every layer's public names)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__init__":
        return None
    return LAYERS[parts[1]]


def _imports(path: Path) -> set[str]:
    """The ``smallbn.*`` modules ``path`` imports at module level or in functions."""
    found: set[str] = set()
    package = _name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _name(path.parent)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("smallbn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("smallbn"):
                if target == "smallbn":  # from smallbn import layers / stats ...
                    found.update(f"smallbn.{a.name}" for a in node.names)
                else:
                    found.add(target)
    return found


def test_every_top_level_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert tops - {"__init__"} <= set(LAYERS), sorted(tops - {"__init__"} - set(LAYERS))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_short_or_say_why(path: Path):
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or LONG_REASON in docstring, (
        f"{path.relative_to(PACKAGE)} has {lines} lines (over {MAX_LINES}): split it by "
        f"concern, or say in its module docstring '{LONG_REASON} ...'"
    )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_data_flows_one_way(path: Path):
    """core (stats, _distributed, graph) ← layers ← tools ← jobs: nothing imports from above."""
    own = _layer(_name(path))
    if own is None:
        return
    # the package itself (``import smallbn``) re-exports every layer: it counts as the top
    top = max(LAYERS.values())
    layers = {m: _layer(m) for m in _imports(path)}
    above = sorted(m for m, layer in layers.items() if (top if layer is None else layer) > own)
    assert not above, f"{_name(path)} (layer {own}) imports from above: {above}"


#: Machinery the layers share, with its one home: grouping a batch into normalization
#: batches of b samples and running G EMA updates at once (stats.py), the finite check.
ONE_HOME = {
    # sample n's group n // b, written with torch.div(..., rounding_mode="floor") or with //
    r"torch\.arange\([^)]*\)\s*(//|,\s*\w+\s*,\s*rounding_mode=\"floor\")": "stats.py",
    r"keep\s*\*\*\s*exponent": "stats.py",
    r"def (set_finite_check|check_finite)\b": "layers/_finite_check.py",
}
#: The copies issue 22 named, which must not come back under their old names.
GONE = ("_ema_sequence", "_update_running_groups", "_record_groups", "_split")


def test_shared_machinery_has_one_home():
    for pattern, home in ONE_HOME.items():
        places = [
            str(p.relative_to(PACKAGE))
            for p in MODULES
            if re.search(pattern, p.read_text(), flags=re.S)
        ]
        assert places == [home], f"{pattern!r} should be in {home} only, found in {places}"
    for path in MODULES:
        defined = {
            node.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef)
        }
        assert not defined & set(GONE), f"{path.relative_to(PACKAGE)} defines {defined & set(GONE)}"
