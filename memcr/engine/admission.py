"""Whether, and from which thread, memcr may checkpoint a process: the refusals made before any change to it.

memcr.system.procfs reads /proc; this module decides on what it reads.
"""

from __future__ import annotations

import errno
import os
import time

from memcr.engine import arch
from memcr.errors import MemcrError, RightsError, TargetError, TargetGone
from memcr.system import libc, processes, procfs

KCMP_VM = 1  # kcmp(2): do the two processes share their memory descriptor
SCHED_DEADLINE = 6  # sched_getscheduler() adds SCHED_RESET_ON_FORK (0x40000000) when the flag is set
# the wait channel of an io_uring worker that waits for work: io_wq_worker since Linux 6.4, io_wqe_worker before
IO_WORKER_IDLE = ("io_wq_worker", "io_wqe_worker")
IO_SQ_THREAD = "iou-sqp-"  # the name of a SQPOLL ring's submission thread
IO_WORKER_GRACE = 0.5  # seconds io_uring's busy workers have to finish their requests before memcr gives up


def require_page_monitor() -> None:
    """memcr finds pages through pagemap, which needs CONFIG_PROC_PAGE_MONITOR.

    /proc/kpageflags (root only) is not needed: locked memory shows as the
    `lo` flag in smaps, and madvise() refuses exactly those mappings.
    """
    if not os.path.exists("/proc/self/pagemap"):
        raise RightsError(
            "/proc/self/pagemap does not exist: the kernel lacks CONFIG_PROC_PAGE_MONITOR, "
            "which memcr needs to find the pages to save"
        )


def check_target(pid: int) -> dict[str, str]:
    """Refuse pids that memcr must never freeze; return the target's status."""
    if not procfs.exists(pid):
        path = procfs.proc_path(pid)
        raise TargetError(f"no such process: {pid}", pid=pid, path=path, errno=errno.ESRCH, what="look up")
    status = procfs.read_status(pid)
    if int(status.get("Tgid", pid)) != pid:
        raise TargetError(f"{pid} is a thread of process {status['Tgid']}: give the process id", pid=pid)
    if status.get("State", "").startswith(("Z", "X")):
        threads = int(status.get("Threads", "1"))
        if threads > 1:
            raise TargetError(
                f"the main thread of process {pid} has exited while {threads - 1} other threads run on: "
                "memcr cannot park a process without its main thread",
                pid=pid,
            )
        raise TargetError(f"process {pid} is a zombie: it has exited and has no memory to save", pid=pid)
    if pid == 1:
        raise TargetError("refusing to freeze pid 1 (init): the whole system would stall", pid=pid)
    if procfs.stat_flags(pid) & procfs.PF_KTHREAD:
        raise TargetError(f"process {pid} is a kernel thread: it has no user memory to save", pid=pid)
    if pid == os.getpid():
        raise TargetError(f"process {pid} is memcr itself", pid=pid)
    if pid == os.getppid():
        raise TargetError(f"process {pid} is memcr's parent, which waits for memcr", pid=pid)
    tids = procfs.thread_ids(pid)
    statuses = procfs.thread_statuses(pid, tids)
    for tid, thread_status in statuses:
        tracer = int(thread_status.get("TracerPid", "0"))
        if tracer:
            raise already_traced(pid, tid, tracer)
    workers = procfs.io_workers(pid, tids)
    _injection_thread(pid, [(tid, thread_status) for tid, thread_status in statuses if tid not in workers])
    return status


def already_traced(pid: int, tid: int, tracer: int) -> TargetError:
    """The refusal of a process whose thread `tid` another tracer holds: another memcr, most of the time."""
    which = f"process {pid}" if tid == pid else f"thread {tid} of process {pid}"
    args = procfs.command_line(tracer)
    # the memcr command, its launcher, or `python -m memcr`; in a daemon, the tracer is one of its threads
    if any(os.path.basename(a) == "memcr" for a in args[:3]) or ("-m" in args and "memcr" in args):
        return TargetError(
            f"{which} is already traced by process {tracer}: another memcr holds it; wait for that memcr to finish",
            pid=pid,
            what="another-memcr",
        )
    # unknown, or gone already (a memcr that just finished): the same words name both
    return TargetError(
        f"{which} is already traced by process {tracer}: another memcr or a tracer (a debugger, strace) holds it; "
        "wait for it to finish or detach it",
        pid=pid,
        what="another-memcr",
    )


def injection_thread(pid: int, tids: list[int] | set[int]) -> int:
    """The thread (the main one if it can) where memcr's injected system calls run and its parasite is cloned.

    `tids` are the process's own threads: an io_uring worker runs no code of the process's.
    """
    return _injection_thread(pid, procfs.thread_statuses(pid, tids))


def wait_io_worker_idle(pid: int, tid: int, deadline: float, hidden_wchan: bool = False) -> None:
    """Return once io_uring's thread `tid` waits for work; refuse the freeze if it is still in the middle
    of a request at `deadline`.

    A stop breaks the request a worker is in: one asleep in it (an open of a FIFO without a writer yet;
    on Linux 5.10, a read of a pipe) sees it end with EINTR, and one in an uninterruptible wait goes on
    to the next request queued for it (a linked one) with the stop pending, and that one ends so. The
    SQPOLL thread issues without sleeping: a stop breaks nothing there. A wait channel of "0" is a thread
    on a run queue (going to sleep in its next request, say), unless this kernel hides every wait channel
    (`hidden_wchan`): then memcr cannot tell, and stops the worker all the same.
    """
    while (doing := _io_request(pid, tid, hidden_wchan)) is not None:
        if time.monotonic() > deadline:
            raise TargetError(
                f"the io_uring worker thread {tid} of process {pid} is in the middle of a request ({doing}): "
                "stopping it now would end that request with EINTR, so memcr leaves the process as it is; "
                "it can be parked once no worker is in a request (a read that waits for data keeps it in one)",
                pid=pid,
                errno=errno.EBUSY,
                what="io-worker",
            )
        time.sleep(0.01)


def _io_request(pid: int, tid: int, hidden_wchan: bool) -> str | None:
    """What the io_uring thread is doing that a stop would break, or None when nothing is."""
    path = f"{pid}/task/{tid}"
    try:
        before = procfs.read_stat(path)
        where = procfs.wait_channel(pid, tid)
        state = procfs.read_stat(path).state
    except TargetGone:
        return None  # the seize tells
    if state != before.state:
        return "changing"
    # a name the process may give any of its threads: the SQPOLL thread's state and wait channel must agree
    if before.comm.startswith(IO_SQ_THREAD) and (state == "R" or where == "io_sq_thread"):
        return None
    idle = (*IO_WORKER_IDLE, "?", *(("0",) if hidden_wchan else ()))
    if (state == "S" and where in idle) or state in ("t", "T"):  # t, T: stopped already
        return None
    return "running" if state == "R" else f"it waits in {where}"


def _unfit(pid: int, tid: int, status: dict[str, str]) -> str | None:
    """Why the parasite cannot come from this thread, or None when it can.

    A seccomp filter may answer mmap, clone or socket with an error, a
    SIGSYS or death, and strict mode allows nothing but read and write.
    A SCHED_DEADLINE thread may not start a thread (clone fails with
    EAGAIN) unless its new threads reset their policy (reset-on-fork). A
    thread that called unshare(CLONE_NEWPID) would put its new threads in
    another pid namespace than its own, which the kernel refuses (EINVAL).
    """
    if status.get("Seccomp", "0") != "0":
        return "seccomp"
    try:
        policy = os.sched_getscheduler(tid)
    except OSError:
        policy = 0  # gone meanwhile: the freeze tells
    if policy == SCHED_DEADLINE:  # with the reset-on-fork flag the value differs, and the thread may clone
        return "sched-deadline"
    if procfs.starts_children_elsewhere(pid, tid):
        return "pid-namespace"
    return None


# The causes a user can lift that keep every thread from starting the parasite: what the refusal says after
# "process N" (or "every thread of process N"), and the errno of the clone it would meet.
_LIFTABLE = {
    "sched-deadline": (
        "runs under SCHED_DEADLINE, which may not start a thread (clone fails with EAGAIN): "
        "memcr cannot start its parasite in it",
        errno.EAGAIN,
    ),
    "pid-namespace": (
        "called unshare(CLONE_NEWPID): the kernel starts no thread in a process whose new children go "
        "to another pid namespace (clone fails with EINVAL), so memcr cannot start its parasite in it",
        errno.EINVAL,
    ),
}


def _injection_thread(pid: int, threads: list[tuple[int, dict[str, str]]]) -> int:
    unfit: dict[str, list[int]] = {}
    for tid, status in threads:
        why = _unfit(pid, tid, status)
        if why is None:
            return tid
        unfit.setdefault(why, []).append(tid)
    if not unfit:
        raise TargetError(f"process {pid} has no thread left (it is ending)", pid=pid)
    if list(unfit) == ["seccomp"]:
        raise TargetError(
            f"every thread of process {pid} runs under seccomp: memcr's injected system calls "
            "(mmap, clone, socket, madvise) could be refused or kill it, so memcr leaves it alone",
            pid=pid,
        )
    whose = f"process {pid}" if len(threads) == 1 else f"every thread of process {pid}"
    if len(unfit) == 1 and (cause := next(iter(unfit))) in _LIFTABLE:
        text, code = _LIFTABLE[cause]
        raise TargetError(f"{whose} {text}", pid=pid, errno=code, what=cause)
    names = {"seccomp": "under seccomp", "sched-deadline": "under SCHED_DEADLINE",
             "pid-namespace": "after unshare(CLONE_NEWPID)"}  # fmt: skip
    said = "; ".join(f"thread{'s' if len(t) > 1 else ''} {', '.join(map(str, t))} {names[w]}" for w, t in unfit.items())
    raise TargetError(
        f"no thread of process {pid} can start memcr's parasite: {said}",
        pid=pid,
        what=next(w for w in unfit if w != "seccomp"),  # the advice for a cause the user can lift
    )


def trace_denied(pid: int, cause: MemcrError | None = None) -> RightsError:
    """The refusal to trace `pid`, with the path, errno and operation of the access that showed it."""
    return RightsError(
        f"not permitted to trace process {pid}: memcr needs root or "
        "CAP_SYS_PTRACE (and /proc/sys/kernel/yama/ptrace_scope must allow it)",
        pid=pid,
        path=cause.path if cause else None,
        errno=cause.errno if cause else None,
        what=cause.what if cause else "trace",
    )


def async_writers(pid: int) -> list[str]:
    """What can make the kernel write into the process's memory on its own: io_uring, Linux AIO.

    Such a write into a page memcr dropped is lost on restore, or makes
    the restore impossible; a registered io_uring buffer is pinned and
    would not even be the page the process sees after its restore.
    """
    found = []
    try:
        vmas = procfs.read_maps(pid, flags=False)
        if any(vma.path.startswith("/[aio]") for vma in vmas):
            found.append("a Linux AIO context (io_setup)")
        links = procfs.descriptor_links(pid)
    except RightsError as e:
        raise trace_denied(pid, e) from None
    found += [f"an io_uring instance (fd {fd})" for fd, link in links if link == "anon_inode:[io_uring]"]
    return found


def refuse_async_writers(pid: int) -> None:
    """TargetError when the kernel may write into the process's memory on its own (async_writers)."""
    if writers := async_writers(pid):
        raise TargetError(
            f"process {pid} has {' and '.join(writers)}: the kernel may write into its memory while it is "
            "parked, and such a write would be lost",
            pid=pid,
            what="async-io",
        )


def shares_memory(pid1: int, pid2: int) -> bool:
    """kcmp(2) KCMP_VM: whether the two processes have one memory descriptor (CallError ENOSYS: no kcmp)."""
    return libc.syscall(arch.current().SYS_KCMP, pid1, pid2, KCMP_VM, 0, 0) == 0


def mm_sharers(pid: int) -> list[int]:
    """Other processes that share the memory of `pid` (vfork, clone(CLONE_VM) without CLONE_THREAD).

    kcmp(2) compares the kernel's memory descriptors; where the kernel
    lacks it (no CONFIG_KCMP), a parent or child blocked in vfork()
    is found from its kernel wait channel.
    """
    sharers = []
    for other in processes.pids():
        if other == pid:
            continue
        try:
            if shares_memory(pid, other):
                sharers.append(other)
        except libc.CallError as e:
            if e.errno != errno.ESRCH:  # no kcmp, or one refused (a container's seccomp): it rules nothing out
                return _vfork_relatives(pid)
    # processes without memory (zombies, one exiting) compare equal to each other: they share nothing
    return [other for other in sharers if processes.alive(other)] if sharers and processes.alive(pid) else []


def _vfork_relatives(pid: int) -> list[int]:
    """Without kcmp: the vfork children of a target blocked in vfork(), or its parent so blocked.

    Coarser than kcmp (every child of a parent in vfork() counts), so it
    may refuse too much, never too little, for the vfork case.
    """
    parent = int(procfs.read_status(pid).get("PPid", "0"))
    if _in_vfork(pid):
        return processes.children(pid)
    return [parent] if parent and _in_vfork(parent) else []


def _in_vfork(pid: int) -> bool:
    return procfs.wait_channel(pid) in ("wait_for_vfork_done", "kernel_clone")  # the latter where the wait is inlined
