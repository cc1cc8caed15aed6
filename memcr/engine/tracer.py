"""The ptrace engine: freeze every thread of a process and run code in it.

Built on memcr.engine.ptrace_calls, memcr.engine.seize (seizing, waiting) and
memcr.engine.tracee_memory. All requests for a tracee must come from the thread
that seized it, so a FrozenProcess refuses calls from any other thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

from memcr.engine import admission
from memcr.engine import ptrace_calls as pt
from memcr.engine.arch import Arch, word_mask
from memcr.engine.ptrace_calls import Regs, Stop
from memcr.engine.running import RunningProcess
from memcr.engine.seize import Seizing, check_tracer, check_word_size, wait_for, wait_interrupted
from memcr.engine.tracee_memory import Memory, ProcMem, PtraceMem
from memcr.errors import MemcrError, TargetGone
from memcr.system import procfs

OPTIONS = pt.O_EXITKILL | pt.O_TRACESYSGOOD
# ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK: the kernel restarts these after a signal
RESTART = {-512, -513, -514, -516}


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
        seizing = Seizing(pid)
        try:
            seizing.seize_all()
            # only now that every thread is held: should memcr die from here on, the kernel kills the target
            for tid in seizing.tids:
                pt.set_options(tid, OPTIONS)
            leader = admission.injection_thread(pid, seizing.own_threads)
            check_word_size(pid, leader, arch)
            fd = procfs.open_mem(pid)
            memory: Memory = ProcMem(pid, fd) if fd is not None else PtraceMem(pid, leader, arch.WORD, word_mask(arch))
        except BaseException:
            seizing.let_go()
            raise
        return cls(pid, arch, seizing.tids, leader, memory, seizing.stopped)

    # -- requests, from the tracing thread only ---------------------------

    def _tracer(self) -> None:
        check_tracer(self.owner)

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
        return wait_for(self.pid, tid)

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
        if wait_interrupted(self.pid, tid):
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
        if not stop.interrupt_stop and not wait_interrupted(self.pid, tid):
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
                stop = wait_interrupted(self.pid, tid)
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
                        ending = stop.ending
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


def _detach(tid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        pt.detach(tid)


def _collect(tid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        pt.wait(tid)


def _collect_now(tid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        pt.poll(tid)
