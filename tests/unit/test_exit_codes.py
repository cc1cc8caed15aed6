"""One table from each failure class to its exit code (memcr.errors.EXIT_CODES), and the README and
`memcr --help` saying the same codes (memcr.errors.EXIT_MEANINGS).

Rootless: every memcr module is imported (none starts anything on import) and the README read as text.
A new failure class needs a row in EXIT_CODES, nothing more; a new exit code a meaning, and a phrase in
the README's paragraph.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import memcr
from memcr import errors
from memcr.errors import EXIT_CODES, EXIT_MEANINGS, INTACT, MemcrError
from memcr_client.protocol import ExitCode

ROOT = Path(__file__).resolve().parents[2]


def every_failure_class() -> set[type[MemcrError]]:
    """MemcrError and every subclass of it in memcr's modules."""
    for module in pkgutil.walk_packages(memcr.__path__, "memcr."):
        if module.name != "memcr.__main__":  # which runs memcr
            importlib.import_module(module.name)
    found: set[type[MemcrError]] = set()
    todo: list[type[MemcrError]] = [MemcrError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("memcr.") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def tabled_ancestor(cls: type[MemcrError]) -> type[MemcrError]:
    return next(base for base in cls.__mro__ if base in EXIT_CODES)


def test_every_failure_class_of_memcr_errors_has_a_row() -> None:
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, MemcrError) and cls.__module__ == errors.__name__
    }
    missing = sorted(cls.__name__ for cls in defined - EXIT_CODES.keys())
    assert not missing, f"add a row to memcr.errors.EXIT_CODES for {missing}"


def test_every_failure_ends_with_the_code_of_its_row() -> None:
    """A class elsewhere takes its nearest tabled ancestor's code: none sets exit_code on its own."""
    for cls in every_failure_class():
        row = tabled_ancestor(cls)
        assert cls.exit_code == EXIT_CODES[row], (
            f"{cls.__module__}.{cls.__qualname__} ends with {cls.exit_code}, its row ({row.__name__}) says "
            f"{EXIT_CODES[row]}: give it a row in memcr.errors.EXIT_CODES instead of an exit_code attribute"
        )
        if _plain(cls):  # GroupError's code is its cause's (tests/unit/test_group_parts.py)
            assert cls("x").exit_code == EXIT_CODES[row]


def _plain(cls: type[MemcrError]) -> bool:
    """Constructible from a message alone."""
    try:
        cls("x")
    except TypeError:
        return False
    return True


def test_every_exit_code_has_a_meaning() -> None:
    assert set(EXIT_MEANINGS) == set(ExitCode)
    assert set(EXIT_CODES.values()) | {ExitCode.OK} == set(ExitCode)  # no code without a failure that ends so
    assert INTACT.issubset(set(ExitCode) - {ExitCode.OK})


def readme_exit_codes() -> str:
    """The README's paragraph that starts with "Exit codes:", on one line."""
    text = (ROOT / "README.md").read_text()
    [paragraph] = [p for p in re.split(r"\n\s*\n", text) if p.startswith("Exit codes:")]
    return " ".join(paragraph.split())


def test_the_readme_says_what_each_exit_code_means() -> None:
    paragraph = readme_exit_codes()
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{int(code)} {meaning}" in paragraph, f"README: no {int(code)} {meaning!r} in {paragraph!r}"
    named = {int(n) for n in re.findall(r"(?:^Exit codes:|;) (\d+) ", paragraph)}
    assert named == {int(code) for code in ExitCode}, named
    low, high = min(INTACT), max(INTACT)
    assert set(range(low, high + 1)) == INTACT  # so that the README can say "1 to 5"
    assert f"Exit codes {low} to {high} leave the target running intact." in paragraph


def test_the_reports_doc_lists_the_same_codes() -> None:
    text = (ROOT / "docs" / "reports.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.MULTILINE))
    assert rows == {str(int(code)): meaning for code, meaning in EXIT_MEANINGS.items()}
