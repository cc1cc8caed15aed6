"""memcr.report.SCHEMA, the JSON lines' fields as data: what the reports hold, and docs/reports.md says.

Rootless: reports built in the test, and the doc read as text. The lines
memcr really prints are checked against SCHEMA by tests/test_cli_output.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from memcr.errors import GroupError, TargetError
from memcr.options import Options
from memcr.report import OPTION_FIELDS, SCHEMA, SCHEMA_VERSION, GroupReport, Report, error_json

DOC = Path(__file__).resolve().parents[2] / "docs" / "reports.md"


def test_the_schema_names_every_field_of_the_reports() -> None:
    common = {"event", "schema"}
    report = common | {f.name for f in dataclasses.fields(Report)}
    group = common | {f.name for f in dataclasses.fields(GroupReport)}
    assert set(SCHEMA) == {"checkpoint", "restore", "group-checkpoint", "group-restore", "error"}
    assert set(SCHEMA["checkpoint"]) == set(SCHEMA["restore"]) == report
    assert set(SCHEMA["group-checkpoint"]) == set(SCHEMA["group-restore"]) == group
    assert set(OPTION_FIELDS) == set(Options().reported())
    line = json.loads(Report(1, 4096, options=Options().reported()).json("checkpoint"))
    assert set(line) == report and line["schema"] == SCHEMA_VERSION


def test_error_lines_have_the_schema_s_fields() -> None:
    fields = SCHEMA["error"]
    optional = {name for name, kind in fields.items() if kind.endswith("?")}
    alone = json.loads(error_json(7, "checkpoint", TargetError("no such process: 7")))
    assert set(alone) == set(fields) - optional
    failed = GroupError("tree 7 failed", TargetError("gone"), member=8)
    in_group = json.loads(error_json(8, "checkpoint", failed, group="tree 7", options=Options().reported()))
    assert set(in_group) == set(fields)


def documented() -> dict[str, dict[str, str]]:
    """For each `###` section of the doc, its table: field -> type, as written."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:], {})
        elif current is not None and (row := re.match(r"^\| `(\w+)` \| ([^|]+?) \|", line)):
            current[row[1]] = row[2]
    return sections


def as_written(kind: str) -> str:
    """SCHEMA's type as the doc writes it: "int|null" is "int or null" (| separates a table's cells)."""
    return kind.rstrip("?").replace("|", " or ")


def test_the_doc_gives_every_field_with_its_type() -> None:
    sections = documented()
    for event, fields in SCHEMA.items():
        [title] = [title for title in sections if f"`{event}`" in title]
        assert sections[title] == {name: as_written(kind) for name, kind in fields.items()}, event
    assert sections["`options`"] == {name: as_written(kind) for name, kind in OPTION_FIELDS.items()}
    assert f"now {SCHEMA_VERSION}" in DOC.read_text()
