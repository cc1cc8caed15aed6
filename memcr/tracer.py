"""The ptrace engine: freeze every thread of a process and run code in it.

Built on memcr.ptrace_calls. All requests for a tracee must come from the
thread that seized it, so a FrozenProcess refuses calls from any other
thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from memcr import admission, procfs
from memcr import ptrace_calls as pt
from memcr.arch import Arch, word_mask
from memcr.errors import MemcrError, TargetError, TargetGone
from memcr.ptrace_calls import Regs, Stop

OPTIONS = pt.O_EXITKILL | pt.O_TRACESYSGOOD
# ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK: the kernel restarts these after a signal
RESTART = {-512, -513, -514, -516}
FREEZE_TIMEOUT = 2.0  # seconds a thread may take to stop for PTRACE_INTERRUPT
SEIZE_ATTEMPTS = 3  # a refusal to seize with no tracer in sight is looked at again this often


class Memory(Protocol):
    """The frozen process's memory, whatever the protection of its pages."""

    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...


class ProcMem:
    """/proc/<pid>/mem: any size in one call."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd

    def read(self, addr: int, size: int) -> bytes:
        data = os.pread(self.fd, size, addr)
        if len(data) != size:
            if not procfs.alive(self.pid):
                raise TargetGone(f"process {self.pid} is gone", pid=self.pid)
            raise MemcrError(f"short read from process {self.pid} at {addr:#x}: {len(data)} of {size} bytes")
        return data

    def write(self, addr: int, data: bytes | memoryview) -> None:
        if os.pwrite(self.fd, data, addr) != len(data):
            raise MemcrError(f"short write into process {self.pid} at {addr:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PtraceMem:
    """Word by word through PEEKDATA/POKEDATA: /proc/<pid>/mem is 0600 and the
    target's, so with CAP_SYS_PTRACE alone this is the way in."""

    def __init__(self, pid: int, tid: int, word: int, mask: int) -> None:
        self.pid = pid
        self.tid = tid
        self.word = word
        self.mask = mask

    def read(self, addr: int, size: int) -> bytes:
        start = addr & ~(self.word - 1)
        words = b"".join(self._peek(at) for at in range(start, addr + size, self.word))
        return words[addr - start : addr - start + size]

    def write(self, addr: int, data: bytes | memoryview) -> None:
        w = self.word
        start = addr & ~(w - 1)
        end = -(-(addr + len(data)) // w) * w
        # whole words: keep the bytes around `data` in the first and last word
        merged = bytearray(end - start)
        merged[:w] = self._peek(start)
        merged[-w:] = self._peek(end - w)
        merged[addr - start : addr - start + len(data)] = data
        for at in range(start, end, w):
            word = int.from_bytes(merged[at - start : at - start + w], "little")
            self._access(partial(pt.poke, self.tid, at, word))

    def _peek(self, at: int) -> bytes:
        value = self._access(lambda: pt.peek(self.tid, at))
        return (value & self.mask).to_bytes(self.word, "little")

    def _access(self, call: Callable[[], int | None]) -> int:
        try:
            return call() or 0
        except ProcessLookupError:
            raise TargetGone(f"process {self.pid} is gone", pid=self.pid) from None
        except OSError as e:
            raise MemcrError(f"cannot access the memory of process {self.pid}: {e.strerror}", pid=self.pid) from None

    def close(self) -> None:
        pass


class _Seizing:
    """The threads held so far while a freeze is under way."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tids: list[int] = []
        self.stopped = False  # a group stop (SIGSTOP, ...) holds the process

    def seize_all(self) -> None:
        """Seize and stop every thread; repeat until no new thread appears."""
        while new := procfs.thread_ids(self.pid) - set(self.tids):
            seized = [tid for tid in sorted(new) if self._seize(tid)]
            self.tids += seized
            deadline = time.monotonic() + FREEZE_TIMEOUT
            for tid in seized:
                stop = _wait_interrupted(self.pid, tid, deadline)
                if stop is None:
                    self.tids.remove(tid)
                elif stop.group_stop:
                    self.stopped = True
        if not self.tids:
            raise TargetGone(f"process {self.pid} exited while being frozen", pid=self.pid)

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


def _wait_interrupted(pid: int, tid: int, deadline: float | None = None) -> Stop | None:
    """Wait for the interrupt stop, passing on signals that come first; None if the thread exited.

    With a deadline, a thread that has not stopped by then (it waits in
    the kernel for a vfork child or a hung filesystem, where no interrupt
    reaches it) makes the freeze fail: it stays traced, without EXITKILL,
    until the tracing thread ends, and then simply runs on.
    """
    while True:
        stop = _wait(pid, tid) if deadline is None else _wait_until(pid, tid, deadline)
        if stop.exited:
            return None
        if stop.interrupt_stop:
            return stop
        # a signal-delivery stop came before our interrupt: deliver it
        pt.cont(tid, stop.signal if stop.signal_delivery else 0)
        pt.interrupt(tid)


def _wait(pid: int, tid: int) -> Stop:
    try:
        return pt.wait(tid)
    except ChildProcessError:
        raise TargetGone(f"thread {tid} of process {pid} is gone", pid=pid) from None


def _wait_until(pid: int, tid: int, deadline: float) -> Stop:
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


class _Saved:
    """A thread's own registers, and the register sets a system call would change (Arch.kept_state)."""

    __slots__ = ("regs", "regsets")

    def __init__(self, regs: Regs, regsets: list[tuple[int, bytes]]) -> None:
        self.regs = regs
        self.regsets = regsets


class FrozenProcess:
    """Every thread of `pid` held in a ptrace stop by the calling thread.

    `leader` is the thread that runs injected code (the first one that can:
    admission.injection_thread); `helpers` are threads memcr started in the
    process (the parasite), traced too so that a group stop cannot hold them.
    """

    def __init__(
        self, pid: int, arch: Arch, tids: list[int], leader: int, memory: Memory, stopped: bool = False
    ) -> None:
        self.pid = pid
        self.arch = arch
        self.tids = tids
        self.leader = leader
        self.memory = memory
        self.stopped = stopped  # it was in a group stop when frozen, and stays in it
        self.helpers: list[int] = []
        self.owner = threading.get_ident()
        self._own: dict[int, _Saved] = {}  # each thread's own state, once memcr has read it

    @classmethod
    def freeze(cls, pid: int, arch: Arch) -> FrozenProcess:
        seizing = _Seizing(pid)
        try:
            seizing.seize_all()
            # only now that every thread is held: should memcr die from here on, the kernel kills the target
            for tid in seizing.tids:
                pt.set_options(tid, OPTIONS)
            leader = admission.injection_thread(pid, seizing.tids)
            _check_word_size(pid, leader, arch)
            fd = procfs.open_mem(pid)
            memory: Memory = ProcMem(pid, fd) if fd is not None else PtraceMem(pid, leader, arch.WORD, word_mask(arch))
        except BaseException:
            seizing.let_go()
            raise
        return cls(pid, arch, seizing.tids, leader, memory, seizing.stopped)

    # -- requests, from the tracing thread only ---------------------------

    def _tracer(self) -> None:
        if threading.get_ident() != self.owner:
            raise MemcrError("internal error: ptrace request from a thread that is not the tracer")

    def read(self, addr: int, size: int) -> bytes:
        self._tracer()
        return self.memory.read(addr, size)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self._tracer()
        self.memory.write(addr, data)

    def get_regs(self, tid: int) -> Regs:
        self._tracer()
        return pt.get_regs(tid, self.arch.Regs)

    def set_regs(self, tid: int, regs: Regs) -> None:
        self._tracer()
        pt.set_regs(tid, regs)

    def get_sigmask(self, tid: int) -> int:
        self._tracer()
        return pt.get_sigmask(tid)

    def set_sigmask(self, tid: int, mask: int) -> None:
        self._tracer()
        pt.set_sigmask(tid, mask)

    def set_options(self, tid: int, options: int) -> None:
        self._tracer()
        pt.set_options(tid, options)

    def cont(self, tid: int, sig: int = 0) -> None:
        """Let the thread run its own code until its next stop."""
        self._tracer()
        self._own.pop(tid, None)  # its registers change
        pt.cont(tid, sig)

    def wait(self, tid: int) -> Stop:
        return _wait(self.pid, tid)

    def keep_running(self, tid: int) -> bool:
        """Resume a traced thread of ours if it stopped; False once it has exited (and is reaped).

        A thread memcr runs in the target (the parasite) is traced so that a
        group stop (SIGSTOP, or a process that was stopped already) cannot
        hold it: it reports the stop to memcr, which lets it go on. A SIGSTOP
        it dequeues is passed on, so the stop the user asked for still
        happens, to every other thread, when memcr lets them go.
        """
        try:
            stop = pt.poll(tid)
        except ChildProcessError:
            stop = Stop(tid, 0)  # gone and reaped: an exit
        if stop is None:
            return True
        if stop.exited:
            self._gone(tid)
            return False
        self.cont(tid, stop.signal if stop.signal_delivery else 0)
        return True

    def interrupt(self, tid: int) -> bool:
        """Stop one traced thread; False if it exited first."""
        self._tracer()
        with contextlib.suppress(ProcessLookupError):
            pt.interrupt(tid)
        if _wait_interrupted(self.pid, tid):
            return True
        self._gone(tid)
        return False

    def _gone(self, tid: int) -> None:
        for group in (self.tids, self.helpers):
            if tid in group:
                group.remove(tid)

    def own_regs(self, tid: int) -> Regs:
        """The registers the thread runs on with when memcr lets it go.

        Read at a stop outside a system call, once, and again only after the
        thread ran its own code: at a syscall stop arm64 shows the stop's
        direction in x7 instead of the thread's own value.
        """
        return self._own_state(tid).regs

    def _own_state(self, tid: int) -> _Saved:
        if (state := self._own.get(tid)) is None:
            state = self._own[tid] = _Saved(self.get_regs(tid), self.arch.kept_state(tid))
        return state

    def run_syscall(self, tid: int, pc: int, nr: int, args: tuple[int, ...]) -> tuple[Regs, int]:
        """Run system call `nr` in the thread, from the syscall instruction at `pc`.

        Returns its registers at the syscall's exit and, for a clone traced
        with PTRACE_O_TRACECLONE, the new thread's tid (else 0); the thread
        has its own registers back. It stops at syscall entry and exit
        (PTRACE_SYSCALL), not at a trap instruction: a trap raises SIGTRAP,
        which would reset a handler the target blocked and swallow a SIGTRAP
        it has pending. A signal that comes first is delivered with the
        thread's own registers in place, then the call is tried again.
        """
        while True:
            own = self._own_state(tid)
            self.set_regs(tid, self.arch.prepare_syscall(own.regs, pc, nr, args))
            self._syscall(tid)
            stop = self.wait(tid)
            if stop.syscall_stop:
                regs, child = self._finish_syscall(tid)
                if self.arch.syscall_result(regs) not in RESTART:
                    self._put_back(tid, own)
                    return regs, child
                # a signal interrupted it (only SIGKILL and SIGSTOP get through the parasite's mask)
                stop = self._run_own_code_briefly(tid, own)
            else:
                self._put_back(tid, own)
            self._let_through(tid, stop)

    def _put_back(self, tid: int, state: _Saved) -> None:
        self.set_regs(tid, state.regs)
        for kind, data in state.regsets:
            pt.set_regset(tid, kind, data)

    def _finish_syscall(self, tid: int) -> tuple[Regs, int]:
        """From syscall entry to exit; the tid of a clone's child when PTRACE_O_TRACECLONE is on."""
        child = 0
        while True:
            self._syscall(tid)
            stop = self.wait(tid)
            if stop.syscall_stop:
                return self.get_regs(tid), child
            if stop.exited:
                raise self._died()
            if stop.event == pt.EVENT_CLONE:
                child = pt.event_message(tid)
            elif not stop.interrupt_stop:
                raise MemcrError(f"unexpected stop {stop.status:#x} of thread {tid} inside an injected syscall")

    def _run_own_code_briefly(self, tid: int, saved: _Saved) -> Stop:
        """Resume the thread on its own registers until it stops again, so a pending signal is dequeued."""
        self._put_back(tid, saved)
        self.cont(tid)
        pt.interrupt(tid)
        return self.wait(tid)

    def _syscall(self, tid: int) -> None:
        self._tracer()
        try:
            pt.syscall(tid)
        except ProcessLookupError:
            raise self._died() from None

    def _let_through(self, tid: int, stop: Stop) -> None:
        """Deliver the signal of a signal-delivery stop, and stop the thread again."""
        if stop.exited:
            raise self._died()
        if stop.signal_delivery:
            self.cont(tid, stop.signal)
            pt.interrupt(tid)
        if not stop.interrupt_stop and not _wait_interrupted(self.pid, tid):
            raise self._died()

    def _died(self) -> TargetGone:
        return TargetGone(f"process {self.pid} died while running injected code", pid=self.pid)

    def exiting(self) -> bool:
        """Whether a thread of its own has reported its exit: the process was killed or exited."""
        return any(pt.has_exited(tid) for tid in self.tids)

    # -- endings: each lets go of every thread and the memory access ------

    def release(self) -> None:
        """Let every thread run on; tolerate threads that are already gone."""
        self._end(_detach)

    def resume_traced(self) -> RunningProcess:
        """Let every thread run on, still traced: should memcr die, the kernel kills the process.

        Threads it starts and children it forks from now on are traced too (and killed with it); children
        until they exec.
        """
        self._tracer()
        if self.helpers or self.stopped:
            raise MemcrError("internal error: resuming a process that holds memcr's thread or is stopped")
        running = RunningProcess(self.pid, set(self.tids), self.owner)
        resumed = []
        for tid in self.tids:
            with contextlib.suppress(ProcessLookupError):
                pt.set_options(tid, OPTIONS | pt.O_TRACEFORK | pt.O_TRACEVFORK | pt.O_TRACECLONE | pt.O_TRACEEXEC)
                # by way of one more interrupt stop, as a detach does: on that way out of the kernel a
                # system call the freeze interrupted is restarted (else read(2) would return -ERESTARTSYS)
                pt.interrupt(tid)
                pt.cont(tid)
                resumed.append(tid)
        for tid in resumed:
            try:
                stop = _wait_interrupted(self.pid, tid)
            except TargetGone:
                continue  # it exited; the rest runs on and must not see a failure (its pages are being served)
            with contextlib.suppress(ProcessLookupError):
                if stop is not None and stop.group_stop:
                    pt.listen(tid)
                elif stop is not None:
                    pt.cont(tid)
        self.tids.clear()
        self.memory.close()
        return running

    def collect_dead(self) -> None:
        """The process died: collect what its threads left, without waiting."""
        self._end(_collect_now)

    def collect_ended(self, grace: float = 5.0) -> str | None:
        """The process died while frozen (a SIGKILL from outside): collect every thread's exit, and say how
        it ended ("killed by SIGKILL"); None when the leader's exit did not show within `grace` seconds.

        Collecting is what lets the kernel tell its parent: a traced
        process's exit goes to its tracer first, and until then the parent
        cannot reap it. Threads are polled, not waited for: a thread that
        lives on (a kill that never came) must not hang the tracing thread.
        """
        self._tracer()
        ending = None
        deadline = time.monotonic() + grace
        # the kernel reports a traced leader's exit only after its other threads'
        for tid in sorted(self.tids + self.helpers, key=lambda tid: tid == self.pid):
            with contextlib.suppress(ChildProcessError):
                while (stop := pt.poll(tid)) is None or not stop.exited:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.005)
                else:
                    if tid == self.pid:
                        ending = _ending(stop.status)
        self.tids.clear()
        self.helpers.clear()
        self.memory.close()
        return ending

    def kill(self) -> None:
        """SIGKILL the whole process and collect its threads.

        PermissionError: memcr lacks CAP_KILL for another user's process.
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._end(_collect)

    def run_to_death(self, pc: int, nr: int, args: tuple[int, ...]) -> None:
        """Resume the leader on system call `nr` at `pc` (its own kill(2) of the process) and collect the dead."""
        self.set_regs(self.leader, self.arch.prepare_syscall(self.own_regs(self.leader), pc, nr, args))
        self.cont(self.leader)
        self._end(_collect)

    def _end(self, each: Callable[[int], None]) -> None:
        self._tracer()  # from another thread a detach fails quietly (ESRCH): the target would stay stopped
        # the kernel reports a traced leader's exit only after its other threads'
        for tid in sorted(self.tids + self.helpers, key=lambda tid: tid == self.pid):
            each(tid)
        self.tids.clear()
        self.helpers.clear()
        self.memory.close()


class RunningProcess:
    """A process that runs again while the thread that froze it still traces it.

    That thread passes on every signal and group stop (`watch`) until memcr
    lets go of the process (`detach`) or kills it (`kill`). Threads it
    starts meanwhile are traced too, and so are the processes it forks, as
    `children`, until they exec: until then they run on memory of the
    fork, whose missing pages memcr serves.
    """

    def __init__(self, pid: int, tasks: set[int], owner: int) -> None:
        self.pid = pid
        self.threads = tasks  # the target's own traced threads
        self.children: set[int] = set()  # tasks of processes forked since (by it or by them), not exec'd yet
        self.owner = owner
        self.ended: str | None = None  # how the target ended, once every thread of it has
        # a new task's first stop can come before its creator's event, which says what it is: it waits here
        self._early: dict[int, Stop] = {}
        self._others: dict[int, int] = {}  # wait statuses of this thread's other children, reaped meanwhile

    def watch(self, until: int, done: Callable[[], bool]) -> int | None:
        """Pass on stops until `until` (a child of this thread) stops or exits: its wait status. None once
        `done()` holds after a task of the target or a child ended or exec'd, or no traced task is left."""
        self._tracer()
        if until in self._others:
            return self._others.pop(until)
        while self.threads or self.children:
            try:
                pid, status = os.waitpid(-1, pt.WALL | pt.WNOTHREAD | os.WUNTRACED)
            except ChildProcessError:
                self.threads.clear()
                self.children.clear()
                break
            if pid == until:
                if os.WIFSTOPPED(status):
                    os.kill(pid, signal.SIGCONT)  # a bell: it stopped itself to wake this thread
                return status
            if self._pass_on(Stop(pid, status)) and done():
                return None
        return None

    def _pass_on(self, stop: Stop) -> bool:
        """Pass one stop on; True when a task left the set memcr cares about (exit, or a child's exec)."""
        tid = stop.tid
        if stop.exited:
            if tid == self.pid:
                self.ended = _ending(stop.status)
            known = tid in self.threads or tid in self.children
            self.threads.discard(tid)
            self.children.discard(tid)
            if not known:
                self._others[tid] = stop.status
            return known
        try:
            if stop.event == pt.EVENT_EXEC:  # before the next test: its tid may look new (below)
                return self._exec(stop)
            if tid not in self.threads and tid not in self.children:
                self._early[tid] = stop  # left stopped until its creator's event says what it is
                return False
            if stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK):
                self._adopt(pt.event_message(tid), self.children)
            elif stop.event == pt.EVENT_CLONE:
                # a new thread (or a process sharing the memory): it belongs where its creator does
                self._adopt(pt.event_message(tid), self.threads if tid in self.threads else self.children)
            self._resume(stop)
        except ProcessLookupError:
            self.threads.discard(tid)  # killed meanwhile: its exit is reported next
            self.children.discard(tid)
            return True
        return False

    def _adopt(self, tid: int, into: set[int]) -> None:
        into.add(tid)
        first = self._early.pop(tid, None)
        if first is not None:
            self._pass_on(first)

    def _exec(self, stop: Stop) -> bool:
        """A task ran execve(); True when that was a child, which memcr lets go of: its memory is new.

        A thread other than the leader that runs it takes over the leader's
        tid, and the leader's end may have been reported meanwhile: that
        was the exec's doing, not the process's end.
        """
        tid = stop.tid
        former = pt.event_message(tid)
        child = former in self.children or tid in self.children or (tid != self.pid and tid not in self.threads)
        for tasks in (self.threads, self.children):
            tasks.discard(former)
            tasks.discard(tid)
        if child:
            pt.detach(tid)
            return True
        self.threads.add(tid)
        if tid == self.pid:
            self.ended = None
        self._resume(stop)
        return False

    @staticmethod
    def _resume(stop: Stop) -> None:
        if stop.group_stop:
            pt.listen(stop.tid)
        else:
            pt.cont(stop.tid, stop.signal if stop.signal_delivery else 0)

    def detach(self, tids: set[int] | None = None) -> None:
        """Let `tids` (default: every traced task) go, each with the signal it was about to receive.

        A thread they start meanwhile goes too. A child they fork meanwhile
        goes along only when every task goes; else it stays traced, as one
        of the `children`: its fork may have begun while pages were still
        missing, which it then misses too.
        """
        self._tracer()
        every = tids is None
        pending = set(self.threads | self.children) if tids is None else set(tids)
        for tid in list(pending):
            try:
                pt.interrupt(tid)
            except ProcessLookupError:
                pending.discard(tid)
        stops: list[Stop] = []  # first stops of new tasks that go too, taken from _early
        while pending:
            if stops:
                stop = stops.pop()
            else:
                # any task's: a leader's exit is reported only after its other threads' were collected
                try:
                    stop = Stop(*os.waitpid(-1, pt.WALL | pt.WNOTHREAD))
                except ChildProcessError:
                    break
            tid = stop.tid
            if stop.event == pt.EVENT_EXEC and (former := pt.event_message(tid)) in pending:
                pending.discard(former)  # the thread that ran it took over this tid, whatever was said of it
                pending.add(tid)
            if tid not in pending:
                self._pass_on(stop)  # a task that stays, or a new one: waits in _early for its creator's event
                continue
            pending.discard(tid)
            self.threads.discard(tid)
            self.children.discard(tid)
            if stop.exited:
                if tid == self.pid:
                    self.ended = _ending(stop.status)
                continue
            with contextlib.suppress(ProcessLookupError):
                if stop.event == pt.EVENT_CLONE or (every and stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK)):
                    new = pt.event_message(tid)
                    pending.add(new)  # its first stop, come or to come, lets it go too
                    if new in self._early:
                        stops.append(self._early.pop(new))
                elif stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK):
                    self._adopt(pt.event_message(tid), self.children)
                elif stop.event == pt.EVENT_EXEC and tid == self.pid:
                    self.ended = None  # the leader's end, if reported, was the exec's
                pt.detach(tid, stop.signal if stop.signal_delivery else 0)

    def kill(self) -> None:
        """SIGKILL the process and every child it forked, and collect them.

        PermissionError: memcr lacks CAP_KILL for another user's process.
        """
        self._tracer()
        tasks = self.threads | self.children | set(self._early)
        self._early.clear()
        for tid in list(tasks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(tid, signal.SIGKILL)
        while tasks:
            try:
                pid, status = os.waitpid(-1, pt.WALL | pt.WNOTHREAD)
            except ChildProcessError:
                break
            stop = Stop(pid, status)
            if stop.exited:
                if pid not in tasks:
                    self._others[pid] = status
                tasks.discard(pid)
            elif stop.event in (pt.EVENT_FORK, pt.EVENT_VFORK, pt.EVENT_CLONE):
                child = pt.event_message(pid)
                tasks.add(child)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        self.threads.clear()
        self.children.clear()

    def _tracer(self) -> None:
        if threading.get_ident() != self.owner:
            raise MemcrError("internal error: ptrace request from a thread that is not the tracer")


def _ending(status: int) -> str:
    """How a process ended, in words: "exited with 3", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with {os.WEXITSTATUS(status)}"


def _check_word_size(pid: int, tid: int, arch: Arch) -> None:
    """Refuse a 32-bit (compat) process: its registers, system calls and blobs are another CPU's."""
    try:
        pt.get_regs(tid, arch.Regs)
    except pt.ShortRegset:
        raise TargetError(
            f"process {pid} is a 32-bit program: memcr parks {arch.name} programs only", pid=pid, what="compat"
        ) from None
    except ProcessLookupError:
        raise TargetGone(f"process {pid} is gone", pid=pid) from None


def _detach(tid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        pt.detach(tid)


def _collect(tid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        pt.wait(tid)


def _collect_now(tid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        pt.poll(tid)
