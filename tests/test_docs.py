"""The README and docs/: every Python code block runs as written, every relative link (and
its #anchor) resolves, and the README stays a page a user reads (about 150–200 lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path) -> None:
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        exec(compile(block, str(page), "exec"), {})


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target}: no such file"
        assert ROOT in resolved.parents, f"{page.name}: {target} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: link to {target}: no such heading"


def test_the_readme_is_a_page_not_a_notebook() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert 100 <= lines <= 200, lines


def _default_rows() -> list[dict]:
    import json

    path = ROOT / "docs" / "compare_results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_default_runs_tables_are_its_results_file() -> None:
    """docs/results.md's default-run tables are what the job's report prints from
    docs/compare_results.jsonl, and the README's headline rows are that table's correlated,
    after-PreciseBN rows: a new results file without new tables (or the reverse) fails."""
    from smallbn.experiments.compare.report import format_tables

    tables = format_tables(_default_rows())
    assert tables.strip() in (ROOT / "docs" / "results.md").read_text()
    _, heading, first, *_ = tables.split("**")  # the first table and its heading
    assert heading.startswith("correlated groups") and "after PreciseBN" in heading
    rows = {
        cells[0]: cells[1:]
        for line in first.strip().split("\n\n")[0].splitlines()  # the table, not the gaps
        if line.startswith("| ") and not line.startswith("| method")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    readme = (ROOT / "README.md").read_text()
    bn = rows.pop("bn")
    assert f"| BN ({bn[-1]} at b = 32) | {' | '.join(bn[:3])} |" in readme
    for method, cells in rows.items():
        name = method.upper().replace(" (ANY B)", " (any b)")
        assert f"| {name} | {' | '.join(cells[:3])} |" in readme, method
