"""docs/reliability.md, the catalogue of bad inputs and faults, against the tests it names.

Every row must name at least one test, every named test must exist (its file, its function, and
its parameter where one is given), and every test of the catalogue's own test file must be in a
row, so the page and the tests cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
CATALOGUE = ROOT / "tests" / "stages" / "test_catalogue.py"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")


def _rows() -> list[str]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith(("| Kind ", "| Property ")) and not line.startswith("|---"):
            rows.append(line)
    return rows


def test_every_row_names_a_test_that_exists() -> None:
    rows = _rows()
    assert len(rows) >= 30, f"expected at least 30 kinds in {DOC}, found {len(rows)}"
    missing = []
    for row in rows:
        references = REFERENCE.findall(row)
        assert references, f"a row of {DOC.name} names no test: {row[:120]}"
        for path, name, param in references:
            source = ROOT / path
            if not source.is_file():
                missing.append(f"{path} (no such file)")
                continue
            text = source.read_text()
            if not re.search(rf"^def {name}\(", text, re.MULTILINE):
                missing.append(f"{path}::{name} (no such test)")
            elif param and f'"{param}"' not in text:
                missing.append(f"{path}::{name}[{param}] (no such parameter)")
    assert not missing, f"{DOC.name} names tests that do not exist: {missing}"


def test_every_catalogue_test_and_kind_has_a_row() -> None:
    doc = DOC.read_text()
    text = CATALOGUE.read_text()
    cited = {(name, param) for _, name, param in REFERENCE.findall(doc)}
    tests = re.findall(r"^def (test_\w+)\(", text, re.MULTILINE)
    kinds = re.findall(r'^    "([a-z0-9-]+)": _\w+', text, re.MULTILINE)
    assert len(kinds) >= 20
    uncited = [t for t in tests if not any(name == t for name, _ in cited)]
    uncited += [k for k in kinds if not any(param == k for _, param in cited)]
    assert not uncited, f"tests/kinds of {CATALOGUE.name} without a row in {DOC.name}: {uncited}"
