"""Seizing every thread of a process, and waiting for a traced thread's stops.

All requests for a tracee must come from the thread that seized it
(check_tracer).
"""

from __future__ import annotations

import contextlib
import threading
import time

from memcr.engine import admission
from memcr.engine import ptrace_calls as pt
from memcr.engine.arch import Arch
from memcr.engine.ptrace_calls import Stop
from memcr.errors import MemcrError, TargetError, TargetGone
from memcr.system import procfs

FREEZE_TIMEOUT = 2.0  # seconds a thread may take to stop for PTRACE_INTERRUPT
SEIZE_ATTEMPTS = 3  # a refusal to seize with no tracer in sight is looked at again this often


class Seizing:
    """The threads held so far while a freeze is under way."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tids: list[int] = []
        self.io_workers: set[int] = set()  # those of tids that are io_uring's worker threads
        self.stopped = False  # a group stop (SIGSTOP, ...) holds the process

    def seize_all(self) -> None:
        """Seize and stop every thread; repeat until no new thread appears.

        io_uring's workers come after the process's own threads, once these can hand them no more work,
        each when it is idle (admission.wait_io_worker_idle).
        """
        while new := procfs.thread_ids(self.pid) - set(self.tids):
            workers = procfs.io_workers(self.pid, new)
            self._hold(sorted(new - workers))
            deadline = time.monotonic() + admission.IO_WORKER_GRACE
            # a thread held in a ptrace stop shows where it waits, unless this kernel hides every wait channel
            hidden = bool(workers and self.tids) and procfs.wait_channel(self.pid, self.tids[0]) in ("0", "?")
            for tid in sorted(workers):
                admission.wait_io_worker_idle(self.pid, tid, deadline, hidden)
                self._hold([tid])
            self.io_workers |= workers
        if not self.tids:
            raise TargetGone(f"process {self.pid} exited while being frozen", pid=self.pid)

    @property
    def own_threads(self) -> list[int]:
        """The threads held that run the process's code: all but io_uring's workers."""
        return [tid for tid in self.tids if tid not in self.io_workers]

    def _hold(self, tids: list[int]) -> None:
        seized: list[int] = []
        try:
            for tid in tids:
                if self._seize(tid):
                    seized.append(tid)
        except BaseException:
            _let_go_unwaited(self.pid, seized)  # let_go() knows only the threads in self.tids
            raise
        self.tids += seized
        deadline = time.monotonic() + FREEZE_TIMEOUT
        for tid in seized:
            stop = wait_interrupted(self.pid, tid, deadline)
            if stop is None:
                self.tids.remove(tid)
            elif stop.group_stop:
                self.stopped = True

    def _seize(self, tid: int) -> bool:
        for attempt in range(SEIZE_ATTEMPTS):
            try:
                # no EXITKILL yet: a thread that never stops must not take the process with memcr
                pt.seize(tid, pt.O_TRACESYSGOOD)
                pt.interrupt(tid)
            except ProcessLookupError:
                return False  # the thread exited between listing and seizing
            except PermissionError:
                tracer = int(procfs.read_status(f"{self.pid}/task/{tid}").get("TracerPid", "0"))
                if tracer:
                    raise admission.already_traced(self.pid, tid, tracer) from None
                # another tracer (a second memcr) may have let go between the refusal and the look: only
                # a refusal without any tracer, again and again, is memcr's own lack of a right
                if attempt == SEIZE_ATTEMPTS - 1:
                    raise admission.trace_denied(self.pid) from None
                time.sleep(0.001)
            else:
                return True
        return False  # not reached: the last attempt returns or raises

    def let_go(self) -> None:
        for tid in self.tids:
            with contextlib.suppress(ProcessLookupError):
                pt.detach(tid)


def _let_go_unwaited(pid: int, tids: list[int]) -> None:
    """Let go of threads seized and interrupted whose stop memcr has not taken yet: a thread is let go once
    stopped. One that does not stop in time is let go when the tracing thread ends (wait_interrupted)."""
    deadline = time.monotonic() + FREEZE_TIMEOUT
    # the leader last: a traced leader that dies reports its end only once its other threads are collected
    for tid in sorted(tids, key=lambda t: t == pid):
        with contextlib.suppress(MemcrError, ProcessLookupError):
            if wait_interrupted(pid, tid, deadline) is not None:
                pt.detach(tid)


def wait_interrupted(pid: int, tid: int, deadline: float | None = None) -> Stop | None:
    """Wait for the interrupt stop, passing on signals that come first; None if the thread exited.

    With a deadline, a thread that has not stopped by then (it waits in
    the kernel for a vfork child or a hung filesystem, where no interrupt
    reaches it) makes the freeze fail: it stays traced, without EXITKILL,
    until the tracing thread ends, and then simply runs on.
    """
    while True:
        stop = wait_for(pid, tid) if deadline is None else wait_until(pid, tid, deadline)
        if stop.exited:
            return None
        if stop.interrupt_stop:
            return stop
        # a signal-delivery stop came before our interrupt: deliver it
        pt.cont(tid, stop.signal if stop.signal_delivery else 0)
        pt.interrupt(tid)


def wait_for(pid: int, tid: int) -> Stop:
    try:
        return pt.wait(tid)
    except ChildProcessError:
        raise TargetGone(f"thread {tid} of process {pid} is gone", pid=pid) from None


def wait_until(pid: int, tid: int, deadline: float) -> Stop:
    pause = 0.00005
    while True:
        try:
            stop = pt.poll(tid)
        except ChildProcessError:
            raise TargetGone(f"thread {tid} of process {pid} is gone", pid=pid) from None
        if stop is not None:
            return stop
        if time.monotonic() > deadline:
            wchan = procfs.wait_channel(pid, tid)
            raise TargetError(
                f"thread {tid} of process {pid} did not stop within {FREEZE_TIMEOUT:g} s: it waits "
                f"in the kernel ({wchan}), for a vfork child or a hung filesystem. Nothing was changed; "
                "try again later",
                pid=pid,
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


def check_word_size(pid: int, tid: int, arch: Arch) -> None:
    """Refuse a 32-bit (compat) process: its registers, system calls and blobs are another CPU's."""
    try:
        pt.get_regs(tid, arch.Regs)
    except pt.ShortRegset:
        raise TargetError(
            f"process {pid} is a 32-bit program: memcr parks {arch.name} programs only", pid=pid, what="compat"
        ) from None
    except ProcessLookupError:
        raise TargetGone(f"process {pid} is gone", pid=pid) from None


def check_tracer(owner: int) -> None:
    """Refuse a ptrace request from a thread other than `owner`, the one that seized: the kernel would
    refuse it quietly (ESRCH)."""
    if threading.get_ident() != owner:
        raise MemcrError("internal error: ptrace request from a thread that is not the tracer")
