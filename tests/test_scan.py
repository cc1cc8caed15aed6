"""The two ways of finding pages (pagemap entries, PAGEMAP_SCAN) agree on real targets."""

from __future__ import annotations

import dataclasses
import os
import platform
import signal

import pytest

from memcr.errors import TargetError
from memcr.park import scan
from memcr.system import procfs

KERNEL = tuple(int(x) for x in platform.release().split(".")[:2])


@pytest.mark.skipif(KERNEL < (6, 7), reason="PAGEMAP_SCAN came with Linux 6.7")
@pytest.mark.parametrize(("name", "args"), [("pattern", (64, 2)), ("prot", ()), ("mlocked", ()), ("pydict", ())])
def test_pagemap_scan_matches_pagemap_entries(spawn, name: str, args: tuple) -> None:
    target = spawn(name, *args)
    target.proc.send_signal(signal.SIGSTOP)  # its memory must not change between the two scans
    fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
    try:
        vmas = procfs.read_maps(target.pid)

        read_entries = [0]

        def read(addr: int, npages: int) -> bytes:
            read_entries[0] += npages
            return os.pread(fd, npages * 8, addr // scan.PAGE * 8)

        def refuse(addr: int, npages: int) -> bytes:
            assert not any(start <= addr < end for start, end in alone), "an unshared mapping's entries were read"
            return read(addr, npages)

        layout = procfs.read_maps(target.pid, flags=False)
        assert [(v.start, v.end, v.perms, v.path) for v in layout] == [(v.start, v.end, v.perms, v.path) for v in vmas]
        entries = scan.scan_pages(layout, read, (0, 0), scan.zero_pfn())
        every_entry, read_entries[0] = read_entries[0], 0
        scanned = scan.scan_pages(layout, read, (0, 0), scan.zero_pfn(), fd)
        # PAGEMAP_SCAN located the pages: only their entries were read
        assert read_entries[0] < every_entry
        alone = frozenset((v.start, v.end) for v in vmas if not v.shared)
        by_category = scan.scan_pages(layout, refuse, (0, 0), scan.zero_pfn(), fd, alone)
        assert all(by_category[key] == scanned[key] for key in by_category if key in alone)
        assert alone
        for rss_file in (False, True):
            by_entries = scan.build_plan(vmas, entries, (0, 0), rss_file)
            by_scan = scan.build_plan(vmas, scanned, (0, 0), rss_file)
            assert by_scan.copy == by_entries.copy
            assert by_scan.drop_only == by_entries.drop_only
            assert by_scan.dump_bytes > 0
        with pytest.raises(TargetError, match="memory map of the target changed"):
            scan.build_plan(vmas, {}, (0, 0), False)
    finally:
        os.close(fd)
        target.proc.send_signal(signal.SIGCONT)


def test_parasite_reads_the_same_pagemap(spawn) -> None:
    """The parasite's PAGEMAP answer (for when memcr may not read the target's pagemap)."""
    from memcr.engine import arch
    from memcr.engine.parasite import Parasite, SocketSpec
    from memcr.engine.tracer import FrozenProcess

    target = spawn("pattern", 16)
    page = arch.page_size()
    pairs = []
    frozen = FrozenProcess.freeze(target.pid, arch.current())
    try:
        with Parasite.start(frozen, arch.blobs(), SocketSpec(target.pid), False, page) as parasite:
            fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
            try:
                for vma in procfs.read_maps(target.pid):
                    npages = min(vma.size // page, 20_000)  # over one PAGEMAP request's worth
                    direct = os.pread(fd, npages * 8, vma.start // page * 8)
                    pairs.append((vma, parasite.pagemap(vma.start, npages, page), direct))
            finally:
                os.close(fd)
    finally:
        frozen.release()
    assert pairs
    for vma, answer, direct in pairs:
        assert answer == direct, vma
    assert target.verify() == 0


def test_flags_changed_before_the_freeze_are_caught(spawn) -> None:
    """A plan made from VmFlags read before an mlock is refused once the mlock shows."""
    target = spawn("mlocked")
    target.proc.send_signal(signal.SIGSTOP)
    try:
        now = procfs.read_maps(target.pid)
        assert any("lo" in v.flags for v in now)
        unlocked = [dataclasses.replace(v, flags=v.flags - {"lo"}) for v in now]
        fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
        try:
            layout = procfs.read_maps(target.pid, flags=False)
            pages = scan.scan_pages(layout, lambda addr, n: os.pread(fd, n * 8, addr // scan.PAGE * 8), (0, 0), 0)
        finally:
            os.close(fd)
        as_before = scan.build_plan(unlocked, pages, (0, 0), False)
        with pytest.raises(TargetError, match="locked or registered memory"):
            scan.confirm(now, as_before)
        scan.confirm(now, scan.build_plan(now, pages, (0, 0), False))
        assert scan.same_layout(unlocked, now, (0, 0))
    finally:
        target.proc.send_signal(signal.SIGCONT)
    assert target.verify() == 0
