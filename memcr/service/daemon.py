"""Service mode (`memcr -l`): checkpoint and restore on request, many targets at once.

The accept loop accepts and keeps each connection in its selector until
its first bytes arrive: an idle connection costs a descriptor and no
thread, so a flood of them delays no request. A request that has arrived
whole is read and decided there (memcr.service.requests); one whose answer
takes no work (a refusal, a pid not parked) is answered at once, as fast as
the C daemon answers it. The rest get a short-lived thread each, which
reads what has not arrived yet and hands the request to the target's job. Each
checkpointed target, one pid or a group (a process tree or a cgroup, V2
options 1000 and 1001), has one job (memcr.service.jobs) from its
checkpoint to its restore; the daemon keeps the registry of which pid is
whose.

run() makes the socket and execs the daemon's small idle image
(memcr.service.idle), which calls resume() at its first connection;
serve() hands the socket back to that image once nothing has been held
for --unload-after seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import marshal
import os
import queue
import resource
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from memcr import logs
from memcr.errors import ClientRefused, LimitError, MemcrError, StorageError, TargetError
from memcr.options import Log, Options, check_socket_dir
from memcr.report import GroupReport, Report
from memcr.service import handoff, idle
from memcr.service.handoff import Daemon
from memcr.service.jobs import Job
from memcr.service.kept import KeptDumps
from memcr.service.listener import Listener, listen, socket_folder
from memcr.service.paths import check_request_cgroup, check_request_directory
from memcr.service.peer import UNKNOWN, Peer, Policy, Scope
from memcr.service.pid_target import Pid
from memcr.service.requests import REQUEST_TIMEOUT, Refusal, arrived_request, asked, read_request, send
from memcr.system import heap, libc, processes
from memcr.system.harden import harden
from memcr_client.protocol import CMD_CHECKPOINT, CMD_RESTORE, Address, Answer, Compression, Request

# The checkpoint engine (ptrace, the parasite, the dump, lazy restores) loads with the first request that
# needs it, in the function that does: an idle daemon does not hold it (issue #29)
if TYPE_CHECKING:
    from memcr.group.park import Membership
    from memcr.lazy.restore import LazyRestore
    from memcr.service.group_target import Group

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID
MAX_CONNECTIONS = 256  # connections read or answered at once, each by its thread
# Idle connections (nothing sent yet) kept at most, and at most this share of
# the descriptors: the oldest goes when a new one comes, so that new clients
# are always accepted and checkpoints still find descriptors.
MAX_IDLE = 4096
IDLE_SHARE = 2
POLL = 0.2
ANSWER_MARGIN = 0.02  # seconds before a 12-byte request's limit its -1 is sent, so that it arrives in time
COMPRESSORS = {Compression.NONE: None, Compression.LZ4: "lz4", Compression.ZSTD: "zstd"}
DESCRIPTORS_PER_CHECKPOINT = 16  # dump, pipe, sockets, /proc files, codec threads' and a rollback's reserve
KEPT_DESCRIPTORS = 2  # a kept dump's file and userfaultfd


_T = TypeVar("_T")
Work = Callable[[], int]  # what answers a request, on its connection's thread


class _Unread(NamedTuple):
    """A connection whose request has not all arrived: its thread reads it."""

    conn: socket.socket
    peer: Peer


class _Decided(NamedTuple):
    """A request let through, and the work that answers it, for its connection's thread."""

    conn: socket.socket
    peer: Peer
    request: Request
    work: Work


class _Checkpoint:
    """The work of a CHECKPOINT let through. Until its pid is registered (or the request refused), it is coming
    (Service.coming): a RESTORE of that pid decided after it waits for it, and is not answered "not checkpointed"
    meanwhile (SPEC: a RESTORE that comes during its pid's CHECKPOINT aborts it). Those decided later are not
    waited for: a flood of them delays no RESTORE."""

    def __init__(self, service: Service, pid: int, run: Callable[[Callable[[], None]], int]) -> None:
        self.service, self.pid, self.run = service, pid, run
        with service.lock:
            service.coming.setdefault(pid, set()).add(self)

    def __call__(self) -> int:
        try:
            return self.run(self.registered)
        finally:
            self.registered()

    def registered(self) -> None:
        """Its pid is registered, or will not be: it counts no more. Once only; not under the service lock."""
        with self.service.lock:
            coming = self.service.coming.get(self.pid, set())
            if self not in coming:
                return
            coming.discard(self)
            if not coming:
                del self.service.coming[self.pid]
            self.service.registered.notify_all()


class Unload(NamedTuple):
    """--unload-after: after how many seconds with nothing held the daemon goes back to its idle image, and the
    handoff it execs that image with (memcr.service.handoff, as read; the first lines left out)."""

    after: float
    state: dict[str, Any]


class _Reason(threading.local):
    """Why the request this connection thread serves failed, in the words the daemon logged."""

    def __init__(self) -> None:
        self.text: str | None = None


class Service:
    def __init__(self, address: Address, options: Options, log: Log, gid: int | None = None,
                 timeout: float | None = None, json_reports: bool = False,
                 scope: Scope = Scope.ANY, unload: Unload | None = None) -> None:  # fmt: skip
        self.address = address
        self.options = options
        self.log = log
        self.gid = gid
        self.timeout = timeout
        self.json_reports = json_reports
        self.policy = Policy(scope)
        self.pids: dict[int, Job[Pid]] = {}  # the job of each pid parked on its own
        self.lingering: dict[Job[Pid], LazyRestore] = {}  # serving the children a target forked in its lazy phase
        self.groups: dict[int, Job[Group]] = {}  # every pid a group claimed, and its id
        self.kept = KeptDumps(log)  # --incremental: the dumps of restored pids, for their next park
        self.connections: set[threading.Thread] = set()  # each answers one request
        # the accept loop's own: accepted, nothing to read yet (address, accepted at), oldest first; then
        # waiting for a thread
        self.idle: dict[socket.socket, tuple[Any, float]] = {}
        self.ready: deque[_Unread | _Decided] = deque()
        self.idle_bound = MAX_IDLE
        self.out_of_descriptors = False  # an accept failed for want of descriptors, and none worked since
        self.lock = threading.Lock()
        # the CHECKPOINTs let through whose pids are not registered yet, by pid (_Checkpoint); `registered` tells
        # the RESTOREs that wait for them
        self.coming: dict[int, set[_Checkpoint]] = {}
        self.registered = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.reason = _Reason()
        self.unload = unload
        self.held_since = time.monotonic()  # when the daemon last held a target, a request or a thread

    def refuse(self, message: str) -> None:
        """Log why a request is refused or failed; that line is also its reason, for a V2 client that asks."""
        self.reason.text = message
        self.log(message)

    def report(self, report: Report | GroupReport, event: str) -> None:
        if self.json_reports:
            logs.report(self.log, report.json(event))

    def free(self, job: Job[Pid]) -> None:
        """Its pid is no more the daemon's: a new request for it starts afresh."""
        with self.lock:
            if self.pids.get(job.pid) is job:
                del self.pids[job.pid]

    def linger(self, job: Job[Any], phase: LazyRestore) -> None:
        """The target is back; its job serves the children it forked meanwhile, and its pid is free."""
        with self.lock:
            # stop is looked at under the lock that _shutdown takes to list the lingering: none is missed
            self.lingering[job] = phase
            if self.pids.get(job.pid) is job:
                del self.pids[job.pid]
            stopping = self.stop.is_set()
        if stopping:
            phase.server.stream_children()

    def unlinger(self, job: Job[Any]) -> None:
        with self.lock:
            self.lingering.pop(job, None)

    def start(self) -> Listener:
        """Check the parasites' folder and listen: what fails at the daemon's start, not at its first request."""
        parasites = self.options.socket_dir
        if parasites is not None:
            # a missing folder with the socket's, when it is missing too (as both are after a boot, /run emptied)
            besides = [socket_folder(self.address.path.parent, self.gid, parasites)] if self.address.path else []
            check_socket_dir(parasites, self.options.socket_gid, besides)
        return listen(self.address, self.gid, self.log, parasites)

    def greet(self, listener: Listener, log: Log) -> None:
        """The daemon's first lines, in `log`: where it listens, then what its options mean here."""
        # at every level (-q too): what a program that starts the daemon waits for
        logs.always(log, f"listening on {self.address}{' (socket from systemd)' if listener.inherited else ''}")
        if note := self.policy.note(tcp=listener.sock.family != socket.AF_UNIX):
            log(note)
        if self.options.lazy:
            log("restores are lazy unless a request asks otherwise (--lazy); a group's are eager")
            from memcr.park import features

            for line in features.lazy_restore():
                log(line)
        if self.options.incremental:
            log("a restored target's dump is kept for its next park, which writes what changed (--incremental)")
            from memcr.park import features

            for line in features.incremental():
                log(line)
            if in_memory(self.options.dump_dir):
                logs.error(
                    log,
                    f"warning: the dump directory {self.options.dump_dir} is in memory (tmpfs): a kept dump takes "
                    "there the memory parking freed; give --incremental a folder on persistent storage (-d)",
                )

    def serve(self, listener: Listener) -> bool:
        """Serve on `listener` (started, greeted) until stopped; then close it, restore every target, return False.

        With `unload`, also until nothing was held for its seconds: then
        True, the listener open, for the idle image to take it over.
        """
        heap.tune(arenas=1)  # idle job threads stay cheap
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.idle_bound = max(1, min(MAX_IDLE, soft // IDLE_SHARE))
        unloading = False
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(listener, selectors.EVENT_READ)
                listening = True
                while not self.stop.is_set():
                    # a short wait while connections with bytes wait for a thread: one may end any moment
                    events = selector.select(POLL / 10 if self.ready else POLL)
                    # the connections accepted before first, the next one last: requests are decided in the order
                    # they came (a RESTORE sent after its pid's CHECKPOINT is decided after it)
                    for key, _ in sorted(events, key=lambda event: event[0].fileobj is listener):
                        if key.fileobj is listener:
                            self._accept(listener, selector)
                        elif key.data in self.idle:  # its first bytes, or its end
                            selector.unregister(key.data)
                            self._intake(key.data, self.idle.pop(key.data)[0])
                        # else: dropped by an accept of this same round, its event stale
                    self._start_handlers()
                    self._expire(selector)
                    self.kept.sweep()
                    if self._unloading():
                        unloading = True
                        break
                    # with MAX_CONNECTIONS waiting for a thread, the next clients wait in the listen backlog, as
                    # they did for a thread: each holds a descriptor here, and those are for the checkpoints
                    if listening != (len(self.ready) < MAX_CONNECTIONS):
                        listening = not listening
                        if listening:
                            selector.register(listener, selectors.EVENT_READ)
                        else:
                            selector.unregister(listener)
        finally:
            if not unloading:
                listener.close()  # its socket file and the folders made for it too
                for conn in self.idle:
                    conn.close()  # none of them was read: their clients see the end, as of a daemon gone
                for pending in self.ready:  # not answered: their clients see the end too, and nothing is started
                    _ended(pending)
                self._shutdown()
        return unloading

    def _unloading(self) -> bool:
        """Whether nothing was held for `unload`'s seconds: no target, kept dump, connection or other thread."""
        if self.unload is None:
            return False
        with self.lock:
            held = self.pids or self.groups or self.lingering or self.coming or self.connections
        now = time.monotonic()
        if held or self.idle or self.ready or len(self.kept) or threading.active_count() > 1:
            self.held_since = now
            return False
        if now - self.held_since < self.unload.after:
            return False
        if not idle.unchanged(self.unload.state):
            # the idle image would be of other files than this one's: it stays, the upgrade for the next start
            logs.error(self.log, "warning: memcr's files changed since this daemon started (an upgrade?): its "
                                 "service stays loaded; start the daemon again to run them")  # fmt: skip
            self.unload = None
            return False
        self.log(f"nothing held for {self.unload.after:g} s: the service unloads until the next request")
        return True

    def _accept(self, listener: Listener, selector: selectors.BaseSelector) -> None:
        """Accept one connection into the selector, where it waits for its first bytes without a thread."""
        while True:
            try:
                conn, address = listener.accept()
                self.out_of_descriptors = False
                self.held_since = time.monotonic()  # asked: a request answered here at once counts too
                break
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    if self.idle:  # an idle connection's descriptor serves the one that comes
                        self._drop(next(iter(self.idle)), selector, "out of descriptors, the oldest idle goes")
                        continue
                    # the waiting connection stays in the backlog: try again once descriptors may be free
                    if not self.out_of_descriptors:  # once until an accept works again: no flood of the log
                        self.log(f"accept failed: {e.strerror}; retrying every {POLL:g} s")
                    self.out_of_descriptors = True
                    time.sleep(POLL)
                elif e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                    self.log(f"accept failed: {e.strerror}")
                return
        if _sent(conn):  # the client wrote as it connected, as most do: no round of the selector for it
            self._intake(conn, address)
            return
        self.idle[conn] = (address, time.monotonic())
        selector.register(conn, selectors.EVENT_READ, conn)
        if len(self.idle) > self.idle_bound:
            self._drop(next(iter(self.idle)), selector, f"sent nothing, and {self.idle_bound} idle are the most kept")

    def _expire(self, selector: selectors.BaseSelector) -> None:
        """Drop the connections that sent nothing within REQUEST_TIMEOUT of their accept (the oldest come first)."""
        gone = time.monotonic() - REQUEST_TIMEOUT
        while self.idle and self.idle[oldest := next(iter(self.idle))][1] < gone:
            self._drop(oldest, selector, f"no request within {REQUEST_TIMEOUT:g} s")

    def _drop(self, conn: socket.socket, selector: selectors.BaseSelector, why: str) -> None:
        selector.unregister(conn)
        address, _ = self.idle.pop(conn)
        with conn:
            self.log(f"dropped a connection from {Peer.of(conn, address)}: {why}")

    def _intake(self, conn: socket.socket, address: Any) -> None:
        """Answer the request on `conn` now when it has all arrived and takes no work; else queue it for a thread.

        In the accept loop: nothing here waits for a client, and nothing
        reads /proc (decide() leaves that to the thread).
        """
        try:
            peer = Peer.of(conn, address)
            request = arrived_request(conn)
            if request is None:
                self.ready.append(_Unread(conn, peer))
                return
            work = self._answer_or_defer(conn, peer, request)
        except OSError as e:  # the client went meanwhile
            conn.close()
            self.log(f"dropped a connection: {e.strerror}")
            return
        except Exception:  # a bug: this connection is lost, not the accept loop
            conn.close()
            logs.error(self.log, f"internal error reading a request:\n{traceback.format_exc()}")
            return
        if work is not None:
            self.ready.append(_Decided(conn, peer, request, work))
        else:
            conn.close()

    def _start_handlers(self) -> None:
        """A thread for each connection with bytes to read, at most MAX_CONNECTIONS at once."""
        while self.ready:
            with self.lock:
                if len(self.connections) >= MAX_CONNECTIONS:
                    return  # the others wait, their bytes in their sockets, for a thread to end
            pending = self.ready.popleft()
            thread = threading.Thread(target=self._handle, args=(pending,), name="memcr-conn", daemon=True)
            with self.lock:
                self.connections.add(thread)
            try:
                thread.start()
            except RuntimeError as e:  # out of threads (TasksMax, RLIMIT_NPROC): this client is refused, no other
                with self.lock:
                    self.connections.discard(thread)
                _ended(pending)
                self.log(f"dropped a connection: {e}")
                time.sleep(POLL)
                return

    def _handle(self, pending: _Unread | _Decided) -> None:
        """A connection's thread: read its request if it is not read yet, and answer it."""
        conn, peer = pending.conn, pending.peer
        try:
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)  # the accept loop left it non-blocking
                if isinstance(pending, _Decided):
                    request, work = pending.request, pending.work
                else:
                    try:
                        request = read_request(conn)
                    except Refusal as e:
                        self.log(f"{'refused a request' if e.answer else 'dropped a connection'} from {peer}: {e}")
                        if e.answer:
                            send(conn, ERROR)  # bare: what it asked for, a reason included, is unknown
                        return
                    if (decided := self._answer_or_defer(conn, peer, request)) is None:
                        return
                    work = decided
                self.reason.text = None
                self._answer(conn, request, self._guarded(peer, work))
        finally:
            _ended(pending)  # closed already; a CHECKPOINT whose work never ran counts as coming no more
            with self.lock:
                self.connections.discard(threading.current_thread())

    def _answer_or_defer(self, conn: socket.socket, peer: Peer, request: Request) -> Work | None:
        """Log the request and decide it: answer it when that was all (None), else return its work."""
        self.log(f"{peer} asks: {asked(request)}")
        self.reason.text = None
        decided = self._guarded(peer, lambda: self.decide(request, peer))
        if isinstance(decided, int):
            self._answer(conn, request, decided)
            return None
        return decided

    def _guarded(self, peer: Peer, act: Callable[[], _T]) -> _T | int:
        """`act`'s result, or -1 should it fail: a bug, or a module that failed to load; the client still gets
        its answer."""
        try:
            return act()
        except Exception:
            logs.error(self.log, f"internal error answering {peer}:\n{traceback.format_exc()}")
            self.reason.text = "internal error: the daemon's log has its traceback"
            return ERROR

    def _answer(self, conn: socket.socket, request: Request, code: int) -> None:
        reason = None
        if request.reason:
            reason = "" if code == OK else self.reason.text or "no reason recorded: the daemon's log may say"
        send(conn, code, reason)

    def decide(self, request: Request, peer: Peer = UNKNOWN) -> int | Work:
        """The answer to `peer`'s `request` when it takes no work (a refusal, a pid not parked), else the work that
        answers it.

        Runs in the accept loop: nothing here waits or reads /proc. A
        client's right to a restore is vetted here when that needs no
        /proc (--client-scope any, root); otherwise by the work, first.
        """
        asked = time.monotonic()  # a time limit counts from here: the client's own clock started about now
        cmd, pid = request.cmd, request.pid
        if cmd not in (CMD_CHECKPOINT, CMD_RESTORE):
            self.refuse(f"unknown command {cmd} for pid {pid}: known are {CMD_CHECKPOINT} and {CMD_RESTORE}")
            return ERROR
        if pid <= 0 or pid == os.getpid():
            self.refuse(f"refused pid {pid}: {'the daemon itself' if pid > 0 else 'no process id'}")
            return INVALID_PID
        limit = self._time_limit(request)
        if cmd == CMD_RESTORE:
            if request.options:
                # the target stays as it is, parked or not: the client learns its request was wrong
                self.refuse(
                    f"refused the V2 restore of pid {pid}: a dump directory, compression, tree or cgroup applies "
                    "to checkpoints (a restore of any member's pid wakes its whole group)"
                )
                return ERROR
            action = f"restore of pid {pid}"
            with self.lock:  # the CHECKPOINTs of the pid let through before, not registered yet: it waits for them
                ahead = frozenset(self.coming.get(pid, ()))

            def restore() -> int:
                return self._restore(pid, limit, request.lazy, request.incremental, ahead)

            if self.policy.reads_proc(peer):
                # vetted first, before any other refusal tells the client anything, as ever; that reads /proc
                def vetted() -> int:
                    if not self._permitted(peer, action, self._parked_with(pid)):
                        return ERROR
                    refused = self._restore_refused(request)
                    return refused if refused is not None else restore()

                return vetted
            if not self._permitted(peer, action, self._parked_with(pid)):
                return ERROR
            if (refused := self._restore_refused(request)) is not None:
                return refused
            with self.lock:
                parked = pid in self.pids or pid in self.groups or bool(ahead)
            return restore if parked else self._not_parked(pid)
        if request.lazy is not None or request.incremental is not None:
            self.refuse(
                f"refused the V2 checkpoint of pid {pid}, which stays untouched: a lazy or eager restore "
                "(option 1002) and a kept dump (1004) go with its RESTORE, not with the CHECKPOINT"
            )
            return ERROR
        return _Checkpoint(self, pid, lambda registered: self._checkpoint_request(request, peer, limit, asked,
                                                                                  registered))  # fmt: skip

    def _restore_refused(self, request: Request) -> int | None:
        """The answer to a RESTORE whose options 1002 and 1004 do not go together here, or None."""
        pid = request.pid
        if request.incremental and (request.lazy or (request.lazy is None and self.options.lazy)):
            self.refuse(
                f"refused the V2 restore of pid {pid}, which stays as it is: option 1004 keeps the dump of an "
                "eager restore, and this one is lazy (a lazy restore keeps nothing)"
            )
            return ERROR
        if request.incremental and self.options.allow_async_io:
            self.refuse(
                f"refused the V2 restore of pid {pid}, which stays as it is: option 1004 needs a daemon "
                "without --allow-async-io (what the kernel writes into pinned buffers leaves no trace)"
            )
            return ERROR
        return None

    def _checkpoint_request(self, request: Request, peer: Peer, limit: float | None, asked: float,
                            registered: Callable[[], None]) -> int:  # fmt: skip
        """Carry out a checkpoint request that decide() let through; `asked`: when it came (time.monotonic());
        `registered` is called once its pid is the daemon's (_Checkpoint)."""
        pid = request.pid
        try:
            options = self._options(request)
        except StorageError as e:
            self.refuse(f"refused the V2 checkpoint of pid {pid}, which stays untouched: {e}")
            return ERROR
        if request.group:
            return self._park_group(request, options, limit, peer, registered)
        if not self._permitted(peer, f"checkpoint of pid {pid}", {pid}):
            return ERROR
        # a client that sent its own limit (Thunder's 12 bytes) gives up waiting then: it is answered by the limit;
        # one that sent none waits, and is answered once the target runs on again (-t alone)
        answer_by = asked if request.timeout_ms else None
        # once the target is held it can change its uids no more: what was vetted before may have changed meanwhile
        return self._checkpoint(pid, options, limit, seized=lambda: self.policy.vet(peer, {pid}), answer_by=answer_by,
                                registered=registered)  # fmt: skip

    def _permitted(self, peer: Peer, action: str, pids: AbstractSet[int]) -> bool:
        """Whether `peer` may have `action` done on `pids`; a refusal is logged."""
        try:
            self.policy.vet(peer, pids)
        except ClientRefused as e:
            self.refuse(f"refused the {action} asked by {peer}, nothing touched: {e}")
            return False
        return True

    def _parked_with(self, pid: int) -> set[int]:
        """`pid` and, when it is in a group the daemon parks, every other member: a restore wakes them all."""
        with self.lock:
            group = self.groups.get(pid)
            return set(group.target.claimed) if group is not None else {pid}

    def _time_limit(self, request: Request) -> float | None:
        """The -t limit, or the 12-byte request's own when that is shorter: both were asked for."""
        limits = [self.timeout] if self.timeout else []
        if request.timeout_ms:
            limits.append(request.timeout_ms / 1000)
        return min(limits, default=None)

    def _options(self, request: Request) -> Options:
        """The daemon's options with a V2 request's dump directory and compression in place of its own."""
        options = self.options
        if request.dump_dir is not None:
            options = dataclasses.replace(options, dump_dir=check_request_directory(request.dump_dir))
        if request.compression is not None:
            coding = dataclasses.replace(options.coding, compress=COMPRESSORS[request.compression])
            options = dataclasses.replace(options, coding=coding)
        return options

    def _checkpoint(self, pid: int, options: Options, limit: float | None, seized: Callable[[], None],
                    answer_by: float | None, registered: Callable[[], None]) -> int:  # fmt: skip
        """Checkpoint `pid`, rolled back if it takes longer than `limit` seconds.

        With `answer_by` (the request's arrival, time.monotonic()), the
        answer comes by `limit` seconds after it: a checkpoint still under
        way then is answered -1 at once, and rolled back after the answer.
        """
        # a little before the limit: the client counts it from before its request left, and gives up at once
        deadline = None if not limit or answer_by is None else answer_by + limit - min(ANSWER_MARGIN, limit / 10)
        job: Job[Pid]
        self._make_room()
        with self.lock:
            # under the lock _shutdown takes to list the jobs: none is started unlisted
            if self.stop.is_set():
                self.refuse(f"refused to checkpoint pid {pid}: the daemon is stopping")
                return ERROR  # stopping: a RESTORE still goes to its job and gets its answer
            if pid in self.pids or pid in self.groups:  # parked, or in a group parked or being parked
                self.refuse(f"answered -2 to the checkpoint of pid {pid}: it is checkpointed already")
                return INVALID_PID
            if (free := _free_descriptors()) < DESCRIPTORS_PER_CHECKPOINT:
                self.refuse(f"refused to checkpoint pid {pid}: only {free} file descriptors left (RLIMIT_NOFILE)")
                return ERROR
            target = Pid(pid, seized, forget=lambda: self.free(job), kept=self.kept.take(pid), keep=self.kept.keep)
            job = self.pids[pid] = Job(self, target, options, limit, name=f"memcr-{pid}")
            job.start()
        registered()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not job.checkpointed.wait(left) and job.expire():
            # the client waits no longer than its limit (Thunder's hibernate gives up then): it learns of the
            # failure now, and the rollback of a large target runs on after the answer
            self.refuse(
                f"pid {pid}: checkpoint took longer than its time limit of {limit:g} s: answered -1 at the limit; "
                "the target is being rolled back and runs on intact"
            )
            return ERROR
        return self._checkpointed(job)

    def _make_room(self, needed: int = DESCRIPTORS_PER_CHECKPOINT) -> None:
        """Free kept dumps, those kept longest first, while a park lacks the `needed` descriptors they hold; none
        where freeing them all would not be enough. Outside the service lock."""
        free = _free_descriptors()
        if free >= needed or free + KEPT_DESCRIPTORS * len(self.kept) < needed:
            return
        while _free_descriptors() < needed and self.kept.evict():
            pass

    def _checkpointed(self, job: Job[Any]) -> int:
        """The answer to a checkpoint (or a park) once it has ended."""
        job.checkpointed.wait()
        if job.checkpoint_code != OK:
            self.reason.text = job.failure or self.reason.text
        return job.checkpoint_code

    def _restore(self, pid: int, limit: float | None, lazy: bool | None = None, incremental: bool | None = None,
                 ahead: AbstractSet[_Checkpoint] = frozenset()) -> int:  # fmt: skip
        """Restore `pid` (or wake its group); `lazy`, `incremental` None: as the daemon's --lazy, --incremental
        say. The CHECKPOINTs of it let through before (`ahead`) are waited for, until their pid is registered: this
        aborts them. Not for ever: with every connection thread taken by RESTOREs that wait so, those CHECKPOINTs
        would never get one."""
        with self.lock:
            if not self.registered.wait_for(lambda: not ahead & self.coming.get(pid, set()), timeout=REQUEST_TIMEOUT):
                self.log(
                    f"the restore of pid {pid} waited {REQUEST_TIMEOUT:g} s for its checkpoint asked before, which "
                    "has found no thread yet (all are taken): it is answered as things stand"
                )
            job = self.pids.get(pid)
            group = self.groups.get(pid)
        answer: queue.Queue[int] = queue.Queue(1)
        if group is not None:
            if lazy:
                # a parked group has no lazy phase (as with `memcr --tree --lazy`): the request still wakes it,
                # eagerly, rather than leave it parked
                self.log(f"restoring {group} eagerly: a group's restore is never lazy (option 1002 ignored)")
            if incremental:
                self.log(f"restoring {group} without keeping its dumps: a group's parks are whole (1004 ignored)")
            if not group.restore(answer.put, limit):  # during the park: aborts it
                self.refuse(f"answered -2 to a restore of {group}: it is being restored already")
                return INVALID_PID
            return self._restored(group, answer)
        if job is None:
            return self._not_parked(pid)
        if not job.restore(answer.put, limit, lazy, incremental):  # during a checkpoint: aborts it
            if job.restore_asked:
                self.refuse(f"answered -2 to another restore of pid {pid}: its first is still under way")
            else:
                self.refuse(f"answered -2 to the restore of pid {pid}: it is being restored already")
            return INVALID_PID
        return self._restored(job, answer)

    def _not_parked(self, pid: int) -> int:
        self.refuse(f"answered -2 to the restore of pid {pid}: it is not checkpointed")
        return INVALID_PID

    def _restored(self, job: Job[Any], answer: queue.Queue[int]) -> int:
        """The answer to a restore once the job has carried it out, or aborted the checkpoint, which rolled back."""
        job.checkpointed.wait()
        ok = job.checkpoint_code == OK
        code = answer.get() if ok else job.target.aborted(job.checkpoint_error)
        if code != OK:
            self.reason.text = job.failure  # set before the answer was put: the queue orders them
        return code

    def _shutdown(self) -> None:
        """Restore every target and group (kill only those whose restore fails), then wait for all."""
        with self.lock:
            jobs: set[Job[Any]] = {*self.pids.values(), *self.groups.values()}
            lingering = dict(self.lingering)
        for job in jobs:
            # as --lazy says, keeping nothing (the daemon stops); a lazy phase, this one or one under way, has ended
            # at join
            job.restore(None, incremental=False)
        for phase in lingering.values():
            phase.server.stream_children()  # their pages all go back now, so that memcr can let go of them
        for job in [*jobs, *lingering]:
            job.join()
        self.kept.close()
        # every request that reached the daemon gets its answer before it exits
        with self.lock:
            connections = list(self.connections)
        for thread in connections:
            thread.join(REQUEST_TIMEOUT)

    def _park_group(self, request: Request, options: Options, limit: float | None, peer: Peer,
                    registered: Callable[[], None]) -> int:  # fmt: skip
        """Park a process tree or a cgroup all or nothing; its id is the request's pid."""
        from memcr.group.park import CgroupMembers, Tree
        from memcr.service.group_target import Group

        pid = request.pid
        membership: Membership = Tree(pid)
        if request.cgroup is not None:
            try:
                membership = CgroupMembers(check_request_cgroup(request.cgroup))
            except MemcrError as e:
                self.refuse(f"refused the cgroup checkpoint of pid {pid}, nothing touched: {e}")
                return ERROR
        try:
            # before the park holds anything (a cgroup is frozen first); each of its walks vets again what it finds
            self.policy.vet(peer, membership.walk())
        except MemcrError as e:
            self.refuse(f"refused the checkpoint of {membership} asked by {peer}, nothing touched: {e}")
            return INVALID_PID if isinstance(e, TargetError) else ERROR
        group: Job[Group]
        target = Group(
            pid,
            membership,
            vet=lambda pids: self.policy.vet(peer, pids),
            claim=lambda pids: self.claim(group, pids),
            release=lambda keep: self.release(group, keep),
        )
        group = Job(self, target, options, limit, name=f"memcr-group-{pid}")
        with self.lock:
            # stop is looked at under the lock that _shutdown takes to list the groups: none is started unlisted
            if self.stop.is_set():
                self.refuse(f"refused to checkpoint {group}: the daemon is stopping")
                return ERROR
            if pid in self.pids or pid in self.groups:
                self.refuse(f"refused to checkpoint {group}: pid {pid} is already checkpointed")
                return INVALID_PID
            self.groups[pid] = group
            group.start()
        registered()
        return self._checkpointed(group)

    def claim(self, group: Job[Group], pids: set[int]) -> None:
        """Register `pids` as `group`'s, or none of them: a pid is parked once, and each needs its descriptors.

        Raises TargetError for a pid the daemon parks already (on its own or
        in another group), LimitError when the descriptors for every member
        claimed are not free (kept dumps are freed for them first).
        """
        with self.lock:  # a refused park touches nothing: the kept dumps of its pids stay
            self._refuse_parked(group, pids)
        for pid in pids:  # none has its own park under way, which took its kept dump (Pid)
            self.kept.drop(pid, "it is parked in a group now, whose dumps are written whole")
        self._make_room(DESCRIPTORS_PER_CHECKPOINT * len(group.target.claimed | pids))
        with self.lock:
            self._refuse_parked(group, pids)  # again: a park may have begun meanwhile
            members = len(group.target.claimed | pids)
            if (free := _free_descriptors()) < DESCRIPTORS_PER_CHECKPOINT * members:
                raise LimitError(
                    f"only {free} file descriptors are left (RLIMIT_NOFILE) for {members} processes, "
                    f"each needing {DESCRIPTORS_PER_CHECKPOINT}",
                    what="descriptors",
                )
            group.target.claimed |= pids
            self.groups.update(dict.fromkeys(pids, group))

    def _refuse_parked(self, group: Job[Group], pids: set[int]) -> None:
        """Raise TargetError for a pid the daemon parks already, on its own or in another group. Under the lock."""
        for pid in sorted(pids):
            if pid in self.pids:
                raise TargetError(f"process {pid} is already checkpointed", pid=pid)
            other = self.groups.get(pid)
            if other is not None and other is not group:
                raise TargetError(f"process {pid} is already checkpointed in {other}", pid=pid)

    def release(self, group: Job[Group], keep: AbstractSet[int] = frozenset()) -> None:
        """Forget the pids `group` claimed, but those in `keep`."""
        with self.lock:
            for pid in group.target.claimed - keep:
                if self.groups.get(pid) is group:
                    del self.groups[pid]
            group.target.claimed &= keep


def _ended(pending: _Unread | _Decided) -> None:
    """A connection closed, answered or not; a CHECKPOINT decided on it counts as coming no more."""
    pending.conn.close()
    if isinstance(pending, _Decided) and isinstance(pending.work, _Checkpoint):
        pending.work.registered()


def _sent(conn: socket.socket) -> bool:
    """Whether bytes wait on `conn`, which is left non-blocking (as arrived_request leaves it)."""
    conn.setblocking(False)
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


def in_memory(directory: Path) -> bool:
    """Whether `directory` is on tmpfs or ramfs."""
    try:
        return libc.filesystem_type(directory) in (libc.TMPFS_MAGIC, libc.RAMFS_MAGIC)
    except OSError:
        return False


def _free_descriptors() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - processes.descriptor_count()


def run(daemon: Daemon) -> None:
    """`memcr -l`: start, then serve from the idle image (memcr.service.idle), or from this one where exec fails."""
    # a stop from the socket's making on waits for the handlers of the image that serves (_serve, idle.main):
    # they remove the socket and its folders
    signal.pthread_sigmask(signal.SIG_BLOCK, idle.STOP_SIGNALS)
    service = _service(daemon)
    listener = service.start()
    words = ["memcr", *sys.argv[1:]]
    try:
        greeting = logs.Held(daemon.log)
        service.greet(listener, greeting)
        handed = marshal.dumps(handoff.state(daemon, listener, greeting.lines, words))
    except BaseException:
        listener.close()
        raise
    try:
        idle.become(handed, listener.fileno(), lambda: False, words)
    except OSError as e:
        greeting.replay()
        logs.error(daemon.log, f"warning: serving from the process that parsed the options ({e}): it weighs more")
    _serve(service, listener, lambda: False)  # exec failed: this image neither unloads


def resume(state: dict[str, Any], stopped: Callable[[], bool]) -> None:
    """The daemon in its idle image, from its first connection on, or from a stop (`stopped`) that came first."""
    daemon, listener = handoff.resumed(state)
    try:
        # the idle image's undumpable again, or the reason why not; a tracer was refused at start (and exec
        # keeps one), so root's debugger attached since is left alone, as before the images
        harden(allow_tracer=True)
    except BaseException:
        listener.close()
        raise
    unload = None
    if daemon.unload_after:  # back to the idle image once nothing is held: as handed over, without the first lines
        unload = Unload(daemon.unload_after, {**state, "greeting": []})
    _serve(_service(daemon, unload), listener, stopped)


def _service(daemon: Daemon, unload: Unload | None = None) -> Service:
    return Service(daemon.address, daemon.options, daemon.log, gid=daemon.gid, timeout=daemon.timeout,
                   json_reports=daemon.json_reports, scope=daemon.scope, unload=unload)  # fmt: skip


def _serve(service: Service, listener: Listener, stopped: Callable[[], bool]) -> None:
    for sig in idle.STOP_SIGNALS:
        signal.signal(sig, lambda *_: service.stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, idle.STOP_SIGNALS)  # run() blocked them where exec failed
    if stopped():
        service.stop.set()
    while service.serve(listener):  # nothing held a while: back to the idle image
        assert service.unload is not None
        try:
            state = service.unload.state
            idle.become(marshal.dumps(state), listener.fileno(), service.stop.is_set, state["words"])
        except OSError as e:
            logs.error(service.log, f"warning: the service stays loaded: exec failed ({e})")
            service.unload = None
        # here: a stop came first, which the next serve() carries out, or exec failed
    service.log("stopped")
