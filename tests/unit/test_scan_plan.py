"""Scan planning over synthetic mappings and pages: which extents a checkpoint dumps and drops."""

from __future__ import annotations

import pytest

from memcr.errors import PlanError, TargetError
from memcr.park import scan
from memcr.park.scan import PAGE, Extent, Pages, Plan, build_plan, check_plan
from memcr.system.procfs import Vma

BASE = 0x10000 * PAGE
NO_PARASITE = (0, 0)


def anon(start: int = BASE, pages: int = 16, flags: frozenset[str] = frozenset(), perms: str = "rw-p") -> Vma:
    return Vma(start, start + pages * PAGE, perms, 0, 0, "", flags)


def file_backed(start: int, pages: int = 16) -> Vma:
    return Vma(start, start + pages * PAGE, "r--p", 0, 42, "/usr/lib/libc.so.6")


def spans(extents: list[Extent]) -> list[tuple[int, int, bool]]:
    """(first page, pages, joins) of each extent, from BASE."""
    return [((e.start - BASE) // PAGE, e.length // PAGE, e.joins) for e in extents]


def test_dump_runs_become_extents_that_join_across_holes_only() -> None:
    vma = anon()
    # pages 0-1 and 5 to dump; page 3 holds a page another process maps too (kept, but no hole)
    dump = [range(0, 2), range(5, 6), range(9, 10)]
    pages = Pages(dump=dump, occupied=[*dump[:1], range(3, 4), *dump[1:]], found=5, shared=1)
    plan = build_plan([vma], {(vma.start, vma.end): pages}, NO_PARASITE, False)
    # 5 follows 3, which is occupied: no join; 9 follows only holes: one madvise may span them
    assert spans(plan.copy) == [(0, 2, False), (5, 1, False), (9, 1, True)]
    assert (plan.vmas, plan.drop_only, plan.dump_bytes) == ([vma], [], 4 * PAGE)
    assert (plan.shared_pages, plan.found) == (1, {(vma.start, vma.end): 5})


def test_a_long_run_is_cut_at_max_extent() -> None:
    per_extent = scan.MAX_EXTENT // PAGE
    vma = anon(pages=2 * per_extent + 3)
    run = range(0, vma.size // PAGE)
    plan = build_plan([vma], {(vma.start, vma.end): Pages(dump=[run], occupied=[run])}, NO_PARASITE, False)
    # back to back within one occupied run: nothing lies between them to join across
    assert spans(plan.copy) == [(0, per_extent, False), (per_extent, per_extent, False), (2 * per_extent, 3, False)]


def test_clean_file_pages_are_dropped_only_with_rss_file() -> None:
    vma = file_backed(BASE, pages=64)
    pages = {(vma.start, vma.end): Pages(dump=[range(0, 1)], drop=[range(2, 40), range(50, 52)])}
    without = build_plan([vma], pages, NO_PARASITE, False)
    assert (spans(without.copy), without.drop_only) == ([(0, 1, False)], [])
    with_file = build_plan([vma], pages, NO_PARASITE, True)
    assert spans(with_file.drop_only) == [(2, 38, False), (50, 2, False)]  # a whole run each: no size limit


@pytest.mark.parametrize(
    "vma",
    [
        anon(perms="rw-s"),  # shared: not the target's alone
        Vma(BASE, BASE + 2 * PAGE, "r--p", 0, 0, "[vvar]"),  # the kernel's
        anon(flags=frozenset({"io"})),
        anon(flags=frozenset({"um"})),  # a userfaultfd of the target's own
        anon(flags=frozenset({"mt"})),
    ],
    ids=["shared", "vvar", "io", "userfaultfd", "tagged"],
)
def test_mappings_memcr_must_leave_alone_are_not_planned(vma: Vma) -> None:
    plan = build_plan([vma], {}, NO_PARASITE, True)  # no pages needed: never looked at
    assert (plan.vmas, plan.copy, plan.drop_only, plan.locked_vmas) == ([], [], [], 0)


def test_locked_private_mappings_are_counted_and_left_alone() -> None:
    locked = anon(flags=frozenset({"lo"}))
    plan = build_plan([locked, anon(BASE + 32 * PAGE, flags=frozenset({"lo"}), perms="rw-s")], {}, NO_PARASITE, False)
    assert (plan.vmas, plan.locked_vmas) == ([], 1)


def test_the_parasites_own_mapping_is_not_planned() -> None:
    vma, other = anon(), anon(BASE + 32 * PAGE)
    pages = {(other.start, other.end): Pages(dump=[range(0, 1)], occupied=[range(0, 1)])}
    plan = build_plan([vma, other], pages, (vma.start + PAGE, vma.start + 2 * PAGE), False)
    assert plan.vmas == [other]


def test_a_candidate_the_scan_did_not_see_means_the_map_changed() -> None:
    vma = anon()
    with pytest.raises(TargetError, match=f"memory map of the target changed while it was frozen, at {vma.start:#x}"):
        build_plan([vma], {}, NO_PARASITE, False)


def plan_of(copy: list[Extent], drop: list[Extent] | None = None) -> Plan:
    return Plan(copy=copy, drop_only=drop or [])


def test_check_plan_accepts_disjoint_ordered_extents() -> None:
    vma, file = anon(), file_backed(BASE + 16 * PAGE)
    check_plan(plan_of([Extent(BASE, PAGE, vma), Extent(BASE + PAGE, PAGE, vma)], [Extent(file.start, PAGE, file)]))


@pytest.mark.parametrize(
    ("copy", "drop", "says"),
    [
        ([Extent(BASE + 1, PAGE, anon())], [], "the dump plan holds a misaligned extent"),
        ([Extent(BASE, PAGE + 1, anon())], [], "the dump plan holds a misaligned extent"),
        ([Extent(BASE, 0, anon())], [], "the dump plan holds a misaligned extent"),
        ([Extent(BASE + 15 * PAGE, 2 * PAGE, anon())], [], "outside its mapping"),
        ([Extent(BASE - PAGE, PAGE, anon())], [], "outside its mapping"),
        ([Extent(BASE, 2 * PAGE, anon()), Extent(BASE + PAGE, PAGE, anon())], [], "twice or out of order"),
        ([Extent(BASE + PAGE, PAGE, anon()), Extent(BASE, PAGE, anon())], [], "twice or out of order"),
        ([], [Extent(BASE, PAGE, anon()), Extent(BASE, PAGE, anon())], "the drop plan holds the page"),
        ([Extent(BASE + 2 * PAGE, 2 * PAGE, anon())], [Extent(BASE + 3 * PAGE, PAGE, anon())], "both dumps and drops"),
    ],
    ids=["start", "length", "empty", "past-end", "before-start", "overlap", "order", "drop-twice", "dump-and-drop"],
)
def test_check_plan_refuses_a_plan_that_could_lose_or_double_a_page(
    copy: list[Extent], drop: list[Extent], says: str
) -> None:
    with pytest.raises(PlanError, match=says):
        check_plan(plan_of(copy, drop))


def test_the_page_both_dumped_and_dropped_is_named() -> None:
    vma = anon()
    plan = plan_of([Extent(BASE + 2 * PAGE, 4 * PAGE, vma)], [Extent(BASE, 3 * PAGE, vma)])
    with pytest.raises(PlanError, match=f"dumps and drops the page at {BASE + 2 * PAGE:#x}"):
        check_plan(plan)
