"""The two ways of finding pages (pagemap entries, PAGEMAP_SCAN) agree on real targets."""

from __future__ import annotations

import os
import platform

import pytest

from memcr import procfs, scan

KERNEL = tuple(int(x) for x in platform.release().split(".")[:2])


@pytest.mark.skipif(KERNEL < (6, 7), reason="PAGEMAP_SCAN came with Linux 6.7")
@pytest.mark.parametrize(("name", "args"), [("pattern", (64, 2)), ("prot", ()), ("mlocked", ()), ("pydict", ())])
def test_pagemap_scan_matches_pagemap_entries(spawn, name: str, args: tuple) -> None:
    target = spawn(name, *args)
    target.proc.send_signal(19)  # SIGSTOP: its memory must not change between the two scans
    fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
    try:
        vmas = procfs.read_maps(target.pid)

        def read(addr: int, npages: int) -> bytes:
            return os.pread(fd, npages * 8, addr // scan.PAGE * 8)

        def refuse(addr: int, npages: int) -> bytes:
            raise AssertionError("PAGEMAP_SCAN was not used: pagemap entries were read")

        for rss_file in (False, True):
            by_entries = scan.build_plan(vmas, read, (0, 0), rss_file, scan.zero_pfn())
            by_scan = scan.build_plan(vmas, refuse, (0, 0), rss_file, scan.zero_pfn(), fd)
            assert by_scan.dump == by_entries.dump
            assert by_scan.drop_only == by_entries.drop_only
            assert by_scan.dump_bytes > 0
    finally:
        os.close(fd)
        target.proc.send_signal(18)  # SIGCONT


def test_parasite_reads_the_same_pagemap(spawn, tmp_path) -> None:
    """The parasite's PAGEMAP answer (for when memcr may not read the target's pagemap)."""
    from memcr.checkpoint import Options, Session

    target = spawn("pattern", 16)
    session = Session(target.pid, Options(dump_dir=tmp_path), lambda _: None)
    session.checkpoint()
    try:
        assert session.channel is not None
        fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY)
        try:
            for vma in procfs.read_maps(target.pid):
                npages = min(vma.size // scan.PAGE, 20_000)  # over one PAGEMAP request's worth
                direct = os.pread(fd, npages * 8, vma.start // scan.PAGE * 8)
                assert session.channel.pagemap(vma.start, npages, scan.PAGE) == direct, vma
        finally:
            os.close(fd)
    finally:
        session.restore()
    assert target.verify() == 0
