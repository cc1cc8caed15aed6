"""docs/SECURITY.md names the test that proves each row of its threat table: each of those tests exists.

Rootless: the test files are read as text, each name looked up as a test function of the file it follows.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "SECURITY.md"


def named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for each `tests/FILE.py::test` and each `::test` after it, which is of the same file."""
    found, current = [], ""
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
        current = path or current
        found.append((current, name))
    return found


def functions_named_test(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_threat_table_names_exists() -> None:
    text = DOC.read_text()
    table = text[text.index("## Threat model") : text.index("## Sockets")]
    named = named_tests(table)
    assert len(named) >= 20  # a row per power, and the table's older rows
    missing = [f"{file}::{name}" for file, name in named if name not in functions_named_test(ROOT / file)]
    assert missing == []
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| who")]
    unproved = [row.split(" | ")[0] for row in rows[1:] if "tests/" not in row]
    # the parasite's nonces have no test of their own yet, and the target's own uid needs none: the table says so
    assert unproved == ["| any local user, during a checkpoint", "| a user of the target's uid"]


def test_the_by_hand_lines_the_install_test_runs_are_in_the_doc() -> None:
    """tests/test_security.py reads these lines from the doc: a line renamed there must be renamed here."""
    text = DOC.read_text()
    for start in ("runuser -u memcr -- /opt/memcr/bin/memcr -l", "runuser -u CLIENTUSER -- /opt/memcr/bin/memcr-client",
                  "usermod -aG memcr-targets APPUSER", "usermod -aG memcr-clients CLIENTUSER"):  # fmt: skip
        assert sum(line.strip().startswith(start) for line in text.splitlines()) == 1, start
