"""The parasite driver: its start-up arguments, its socket and its commands.

`Parasite` is the handle (compel's parasite_ctl): it infects a frozen
process (memcr.engine.infect), connects to the parasite, exposes its commands and
cures the process again. memcr.engine.parasite_protocol holds the protocol's
numbers and layouts (the parasite build checks them against
parasite/protocol.h); parasite/README.md documents it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from memcr.engine.arch import Blobs
from memcr.engine.infect import BlobThread, Infection, Injector, room_error
from memcr.engine.parasite_protocol import (
    ARGS,
    ARGS_FDS,
    ARGS_MAGIC,
    ARGS_STATUS,
    CMD,
    NONCE_LEN,
    OP_DROP,
    OP_END,
    OP_PAGEMAP,
    OP_RECV,
    OP_UFFD,
    PAGEMAP_MAX,
    REPLY,
    STATUS_FAILED,
    STATUS_LISTENING,
    STATUS_STARTING,
    STEP_ACCEPT,
    STEP_BIND,
    STEP_LISTEN,
    STEP_MODE,
    STEP_SOCKET,
    SUN_PATH_LEN,
    send_command,
)
from memcr.engine.tracer import FrozenProcess
from memcr.errors import MemcrError, ParasiteError, RightsError, Uncured
from memcr.system import libc, procfs
from memcr.system.accounts import not_in_group

STEP_NAMES = {
    STEP_SOCKET: "create", STEP_BIND: "bind", STEP_MODE: "set the owner and mode of", STEP_LISTEN: "listen on",
    STEP_ACCEPT: "accept on",
}  # fmt: skip
PAGEMAP_ENTRY = 8  # bytes per page in /proc/<pid>/pagemap

CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 60.0  # without progress
STALL = 0.2  # the kernel time-out after which memcr checks whether the parasite was stopped
DISCARD_PIECE = 1 << 20


class Stream(enum.Enum):
    """Whether the byte stream to the parasite is in step with its command loop."""

    IN_STEP = enum.auto()
    TORN = enum.auto()  # a transfer stopped midway: the parasite reads page bytes, nothing more may be sent


@dataclass(frozen=True)
class SocketSpec:
    """Where the parasite listens: abstract `\\0memcr<pid>` or `DIR/memcr<pid>`."""

    pid: int
    directory: Path | None = None
    gid: int | None = None

    @property
    def path(self) -> Path | None:
        return self.directory / f"memcr{self.pid}" if self.directory else None

    @property
    def address(self) -> bytes:
        path = self.path
        return os.fsencode(path) if path else b"\0memcr%d" % self.pid

    @property
    def display(self) -> str:
        return str(self.path) if self.path else f"@memcr{self.pid}"

    def remove_stale(self) -> None:
        """A socket file left by a parasite that was killed would block bind()."""
        path = self.path
        if path and path.is_socket():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass(frozen=True)
class Nonces:
    to_parasite: bytes
    from_parasite: bytes

    @classmethod
    def fresh(cls) -> Nonces:
        return cls(os.urandom(NONCE_LEN), os.urandom(NONCE_LEN))


def pack_args(spec: SocketSpec, nonces: Nonces, page_size: int) -> bytes:
    address = spec.address
    if len(address) >= SUN_PATH_LEN:
        raise ParasiteError(f"socket path too long for a UNIX socket: {spec.display}")
    named = spec.path is not None
    mode = (0o660 if spec.gid is not None else 0o600) if named else 0
    gid = spec.gid if spec.gid is not None else -1
    addrlen = 2 + len(address) + (1 if named else 0)
    return ARGS.pack(
        ARGS_MAGIC, STATUS_STARTING, 0, 0, addrlen, mode, gid, -1, -1, -1, page_size,
        nonces.to_parasite, nonces.from_parasite, socket.AF_UNIX, address,
    )  # fmt: skip


def _netns_socket(pid: int) -> socket.socket:
    """A UNIX socket created inside the target's network namespace.

    Abstract socket names are per network namespace; a socket belongs to
    the namespace it was created in, so a helper thread enters the target's
    namespace just long enough to create it.
    """
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = procfs.open_namespace(pid, "net")
            try:
                libc.setns(fd, 0x40000000)  # CLONE_NEWNET
            except OSError as e:
                raise RightsError(
                    f"cannot enter the network namespace of process {pid}, where its parasite's abstract "
                    f"socket is: {e.strerror} (needs CAP_SYS_ADMIN)",
                    pid=pid,
                    errno=e.errno,
                    what="netns",
                ) from None
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    worker = threading.Thread(target=make, name=f"netns-{pid}")
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class Parasite:
    """The parasite running in a frozen process, connected and authenticated.

    Every call that waits on the parasite wakes up every STALL seconds to
    let the parasite go on if a group stop caught it, and gives up after
    IO_TIMEOUT seconds without progress. Leaving a `with` block cures the
    process: the thread ends, its mapping and signal mask are undone.
    """

    def __init__(self, thread: BlobThread, sock: socket.socket, spec: SocketSpec) -> None:
        self.thread = thread
        self.infection = thread.infection
        self.sock = sock
        self.spec = spec
        self.stream = Stream.IN_STEP
        self.drops_due = 0  # drops asked for (send_drop) whose answers were not read yet
        self._cmd = bytearray(CMD.size)
        self._reply = bytearray(REPLY.size)
        self._progress = time.monotonic()

    @classmethod
    def start(cls, frozen: FrozenProcess, blobs: Blobs, spec: SocketSpec, netns: bool, page_size: int) -> Parasite:
        """Infect `frozen` and connect; on failure the process is cured again (or Uncured is raised)."""
        injector = Injector(frozen, blobs)
        spec.remove_stale()
        infection = Infection.map(injector, page_size)
        nonces = Nonces.fresh()
        cure: Callable[[], None] = infection.cure  # the way back from where the start got to
        try:
            infection.write_args(pack_args(spec, nonces, page_size))
            thread = infection.start()
            cure = partial(_stop_thread, thread)
            sock = _connect(thread, spec, nonces, netns)
        except BaseException as error:
            try:
                cure()
            except BaseException as cleanup:
                raise Uncured(f"{error}; then the parasite could not be removed: {cleanup}", pid=frozen.pid) from error
            finally:
                spec.remove_stale()
            raise
        return cls(thread, sock, spec)

    def __enter__(self) -> Parasite:
        return self

    def __exit__(self, *_: object) -> None:
        self.cure()

    @property
    def tid(self) -> int:
        return self.thread.tid

    @property
    def mapping(self) -> tuple[int, int]:
        return self.infection.mapping

    def cure(self) -> None:
        """End the parasite and remove every trace of it; a parasite that does not answer is stopped by force.

        Raises ParasiteError, and leaves the parasite as it is, while drops
        asked for went unanswered: the parasite may still carry them out,
        after memcr put the pages back, and the target may not run on then.
        """
        if self.drops_due:
            raise ParasiteError(
                f"the answers to {self.drops_due} drops were lost: the parasite may still drop pages memcr put back"
            )
        ended = False
        if self.stream is Stream.IN_STEP:
            try:
                self._call("end", OP_END)
                ended = True
            except ParasiteError:
                pass  # stopped by force below
        self.sock.close()
        try:
            self.thread.cure(2.0 if ended else 0.0, _open_fds(self.infection))
        finally:
            self.spec.remove_stale()  # left by a parasite stopped by force

    def disconnect(self) -> None:
        """The target died or is about to be killed: close the connection, remove the socket file."""
        self.sock.close()
        self.spec.remove_stale()

    # -- commands -----------------------------------------------------------

    def drop(self, addr: int, length: int) -> bool:
        """madvise(MADV_DONTNEED); False where the kernel refuses (locked pages)."""
        self.send_drop(addr, length)
        return self.dropped()

    def send_drop(self, addr: int, length: int) -> None:
        """Ask for a drop without waiting: `dropped` reads the answers, in order, before any other command's."""
        self._send(OP_DROP, addr, length)
        self.drops_due += 1

    def dropped(self) -> bool:
        """The answer to the oldest drop not answered yet (`send_drop`)."""
        result = self._result()
        self.drops_due -= 1
        return result == 0

    def request_pages(self, runs: Sequence[tuple[int, int]]) -> None:
        """Ask for the bytes of each (address, length), at most SEND_RUNS; the caller takes them, back to back,
        with recv_into or splice_into."""
        self._send_commands(memoryview(send_command(runs)))

    def recv_into(self, view: memoryview) -> None:
        """Fill `view` completely from the parasite."""
        got, total = 0, len(view)
        while got < total:
            n = self._io(partial(self.sock.recv_into, view[got:], total - got, socket.MSG_WAITALL))
            if n == 0:
                raise ParasiteError("the parasite closed its connection unexpectedly")
            got += n

    def splice_into(self, pipe: int, length: int) -> int:
        """Move up to `length` requested bytes into a pipe, without copying them into this process."""
        n = self._io(lambda: os.splice(self.sock.fileno(), pipe, length))
        if n == 0:
            raise ParasiteError("the parasite closed its connection unexpectedly")
        return n

    def discard(self, length: int) -> None:
        """Read and forget `length` requested bytes, so that the next reply can be read."""
        scratch = memoryview(bytearray(min(length, DISCARD_PIECE)))
        while length:
            piece = scratch[: min(length, len(scratch))]
            self.recv_into(piece)
            length -= len(piece)

    def pagemap(self, addr: int, npages: int, page_size: int) -> bytes:
        """The target's pagemap entries, read by the parasite from /proc/self/pagemap."""
        out = bytearray()
        per_call = PAGEMAP_MAX // PAGEMAP_ENTRY
        for first in range(0, npages, per_call):
            count = min(per_call, npages - first)
            got = self._call("pagemap", OP_PAGEMAP, addr + first * page_size, count * PAGEMAP_ENTRY)
            chunk = bytearray(got)
            self.recv_into(memoryview(chunk))
            out += chunk
        return bytes(out)

    def userfaultfd(self, flags: int, device: int | None = None) -> int:
        """A userfaultfd of the target's mm, made in the target and now memcr's; -errno when the target may not.

        With `device` (memcr's descriptor of /dev/userfaultfd) the target
        makes it with USERFAULTFD_IOC_NEW, where the system call needs a
        capability the target lacks.
        """
        self._send(OP_UFFD, 0, 0 if device is None else 1, flags)
        if device is not None:
            self._io(lambda: socket.send_fds(self.sock, [b"\0"], [device]))
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, REPLY.size, 1, socket.MSG_CMSG_CLOEXEC)
                break
            except (BlockingIOError, TimeoutError, InterruptedError):
                self._stalled()
            except ConnectionError as e:
                raise ParasiteError(f"lost the connection to the parasite: {e.strerror}") from None
        if len(data) < REPLY.size:
            rest = bytearray(REPLY.size - len(data))
            self.recv_into(memoryview(rest))
            data += bytes(rest)
        result = int(REPLY.unpack(data)[0])
        if result >= 0 and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        if result >= 0:
            raise ParasiteError("the parasite made a userfaultfd but did not hand it over")
        return result

    def store_file(self, addr: int, length: int, fd: int, offset: int) -> None:
        """Send `length` bytes of file `fd` at `offset` into the target at addr."""

        def push() -> None:
            sent, out = 0, self.sock.fileno()
            while sent < length:
                n = self._io(partial(os.sendfile, out, fd, offset + sent, length - sent))
                if n == 0:
                    raise ParasiteError("the dump file ended early")
                sent += n

        self._store(addr, length, push)

    def store_chunks(self, addr: int, length: int, chunks: Iterator[bytes | memoryview]) -> None:
        """Send `length` bytes, produced chunk by chunk, into the target at addr."""

        def push() -> None:
            for chunk in chunks:
                self._send_all(memoryview(chunk))

        self._store(addr, length, push)

    # -- transport ----------------------------------------------------------

    def _store(self, addr: int, length: int, push: Callable[[], None]) -> None:
        self._send(OP_RECV, addr, length)
        try:
            push()
        except BaseException as e:
            # the parasite now waits for bytes that will never come: nothing
            # else may be sent on this connection, or it would become page data
            self.stream = Stream.TORN
            self.sock.close()
            if isinstance(e, OSError):
                raise ParasiteError(f"lost the connection to the parasite: {e.strerror}") from None
            raise
        result = self._result()
        if result < 0:
            raise ParasiteError(f"storing pages at {addr:#x} failed: {os.strerror(-result)}")

    def _moved(self, n: int) -> int:
        if n:
            self._progress = time.monotonic()
        return n

    def _stalled(self) -> None:
        """Nothing moved for STALL seconds: the parasite may have been stopped, or died."""
        if not self.thread.keep_running():
            raise ParasiteError("the parasite exited unexpectedly")
        if time.monotonic() - self._progress > IO_TIMEOUT:
            raise ParasiteError("the parasite stopped answering")

    def _io(self, call: Callable[[], int]) -> int:
        """One socket call, repeated through stalls; the bytes it moved."""
        while True:
            try:
                return self._moved(call())
            except (BlockingIOError, TimeoutError, InterruptedError):
                self._stalled()
            except ConnectionError as e:
                raise ParasiteError(f"lost the connection to the parasite: {e.strerror}") from None

    def _send_all(self, view: memoryview) -> None:
        sent = 0
        while sent < len(view):
            sent += self._io(partial(self.sock.send, view[sent:]))

    def _send(self, op: int, addr: int = 0, length: int = 0, arg: int = 0) -> None:
        CMD.pack_into(self._cmd, 0, op, arg, addr, length)
        self._send_commands(memoryview(self._cmd))

    def _send_commands(self, commands: memoryview) -> None:
        if self.stream is Stream.TORN:
            raise ParasiteError("the connection to the parasite was dropped mid-transfer")
        try:
            self._send_all(commands)
        except OSError as e:
            raise ParasiteError(f"lost the connection to the parasite: {e.strerror}") from None

    def _result(self) -> int:
        self.recv_into(memoryview(self._reply))
        return int(REPLY.unpack(self._reply)[0])

    def _call(self, what: str, op: int, addr: int = 0, length: int = 0, arg: int = 0) -> int:
        self._send(op, addr, length, arg)
        result = self._result()
        if result < 0:
            raise ParasiteError(f"{what} {addr:#x}+{length:#x} failed in the target: {os.strerror(-result)}")
        return result


def _open_fds(infection: Infection) -> tuple[int, ...]:
    """The descriptors the parasite holds in the target (-1: none), from its arguments area."""
    return tuple(ARGS_FDS.unpack(infection.read_args(ARGS_FDS.size)))


def _stop_thread(thread: BlobThread) -> None:
    """Cure a parasite that never served: its thread is stopped by force, its descriptors closed."""
    thread.cure(0.0, _open_fds(thread.infection))


def _socket_failure(spec: SocketSpec, step: int, err: int) -> MemcrError:
    """Why the parasite could not make its socket; a group the target lacks for it (-S, -G) is named with the fix."""
    failed = f"the parasite could not {STEP_NAMES.get(step, 'start')} its socket {spec.display}"
    if err == errno.EMFILE:  # the target's descriptor limit, which the preflight may have seen change since
        return room_error(spec.pid, 0, err, ("nofile",), failed)
    failed += f": {os.strerror(err)}"
    if spec.directory is not None and err in (errno.EACCES, errno.EPERM):
        # the folder admits the targets by its group (bind), and the socket gets the group of -G (chown)
        gid = spec.gid if step == STEP_MODE else _group_of(spec.directory) if step == STEP_BIND else None
        if gid is not None and gid not in procfs.groups(spec.pid):
            return not_in_group(gid, failed, target=spec.pid)
    return ParasiteError(failed)


def _group_of(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_gid
    except OSError:
        return None


def _connect(thread: BlobThread, spec: SocketSpec, nonces: Nonces, netns: bool) -> socket.socket:
    """Wait for the parasite to listen, connect and prove each other."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        _, status, step, err = ARGS_STATUS.unpack(thread.infection.read_args(ARGS_STATUS.size))
        if status == STATUS_FAILED:
            raise _socket_failure(spec, step, err)
        if status == STATUS_LISTENING:
            break
        if not thread.keep_running() or time.monotonic() > deadline:
            raise ParasiteError("the parasite did not start listening on its socket")
        time.sleep(0.0002)
    sock = _netns_socket(spec.pid) if netns else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # kernel time-outs keep the socket blocking: a Python time-out
        # would poll before every call and halve the throughput
        timeval = struct.pack("@ll", 0, int(STALL * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(spec.address)
        except PermissionError:
            raise RightsError(
                f"permission denied connecting to the parasite socket {spec.display}", path=spec.display
            ) from None
        except OSError as e:
            raise ParasiteError(f"cannot connect to the parasite at {spec.display}: {e.strerror}") from None
        handshake = Parasite(thread, sock, spec)
        handshake._send_all(memoryview(nonces.to_parasite))
        proof = bytearray(NONCE_LEN)
        handshake.recv_into(memoryview(proof))
        if bytes(proof) != nonces.from_parasite:
            raise ParasiteError(f"{spec.display} is not our parasite (wrong proof)")
    except BaseException:
        sock.close()
        raise
    return sock
