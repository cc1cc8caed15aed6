"""The daemon's listening socket: made by memcr, with its folders and their rights, or passed by systemd.

Under systemd the listening socket may come from a .socket unit (socket
activation: LISTEN_FDS and LISTEN_PID, the socket on fd 3); -l must then
name the same socket.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path

from memcr.errors import Folder, MissingFolders, StorageError
from memcr.options import Log, check_socket_folder
from memcr.system import accounts
from memcr_client.protocol import Address

LISTEN_FDS_START = 3  # systemd's first passed descriptor (SD_LISTEN_FDS_START)
FOLDER_MODE = 0o755  # a socket folder memcr makes: anyone may reach the socket, whose own mode decides
GROUP_FOLDER_MODE = 0o750  # with -g: only that group may reach it


class Listener:
    """The listening socket and the files made for it: close() removes the socket file and those folders.

    `inherited`: systemd's socket (socket activation), whose file is not memcr's to remove.
    """

    def __init__(self, sock: socket.socket, log: Log, path: Path | None = None, made: list[Path] | None = None,
                 inherited: bool = False) -> None:  # fmt: skip
        self.sock = sock
        self.log = log
        self.path = path
        self.made = made or []  # folders created for the socket, outermost first
        self.inherited = inherited

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        _remove_folders(self.made, self.log)


def listen(address: Address, gid: int | None, log: Log, parasites: Path | None = None) -> Listener:
    """Listen on `address`, or take systemd's socket for it; a UNIX socket's missing folders are made (and logged).

    `parasites` is the parasites' folder (-S), for the advice when memcr may not make its socket's.
    """
    inherited = inherited_socket(log)
    if inherited is not None:
        try:
            _check_inherited(inherited, address)
        except BaseException:
            inherited.close()
            raise
        if gid is not None:
            log(f"-g {gid} left to systemd: the socket's group and mode are its SocketGroup= and SocketMode=")
        return Listener(inherited, log, inherited=True)  # no path: systemd keeps its file for the next start
    if address.path is None:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise StorageError(f"cannot listen on {address}: {e.strerror}", errno=e.errno) from None
        return Listener(sock, log)
    made = _socket_folder(address.path.parent, gid, log, parasites)
    try:
        sock = _unix_listener(address.path, gid)
    except BaseException:
        _remove_folders(made, log)
        raise
    return Listener(sock, log, address.path, made)


def inherited_socket(log: Log) -> socket.socket | None:
    """The listening socket systemd passed (LISTEN_PID, LISTEN_FDS, fd 3), or None when it passed none.

    As sd_listen_fds() does, the variables count only when LISTEN_PID is
    this process, and they are removed so that nothing memcr starts takes
    them for its own.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid is None or count is None:
        return None
    if pid != str(os.getpid()):
        log(f"ignored LISTEN_FDS: they are for process {pid}, not memcr ({os.getpid()})")
        return None
    if count != "1":
        raise StorageError(
            f"systemd passed {count} sockets (LISTEN_FDS): memcr serves one, so give its .socket unit "
            "exactly one ListenStream="
        )
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)  # family and type read from the descriptor
    except OSError as e:
        raise StorageError(
            f"LISTEN_FDS names descriptor {LISTEN_FDS_START}, which is no socket: {e.strerror}", errno=e.errno
        ) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.type != socket.SOCK_STREAM or not listening:
            raise StorageError(
                f"systemd's socket (descriptor {LISTEN_FDS_START}) is not a listening stream socket: "
                "memcr needs ListenStream=, with Accept=no"
            )
        sock.set_inheritable(False)
    except BaseException:
        sock.detach()  # leave the descriptor as found: it is systemd's
        raise
    return sock


def _check_inherited(sock: socket.socket, address: Address) -> None:
    """systemd's socket must be the one -l names: a mismatch is a misconfiguration, not a choice."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        passed = name if isinstance(name, str) else os.fsdecode(name)
        if address.path is None or os.path.abspath(address.path) != passed:
            raise StorageError(
                f"systemd passed the socket {passed or '(unnamed)'} but -l says {address}: "
                "make the .socket unit's ListenStream= and -l name the same socket"
            )
        return
    host, port = name[0], name[1]
    if address.path is not None or port != address.port:
        raise StorageError(
            f"systemd passed a socket on TCP port {port} but -l says {address}: "
            "make the .socket unit's ListenStream= and -l name the same socket"
        )
    try:
        wanted = ipaddress.ip_address(address.host)
    except ValueError:
        return  # a host name: the kernel only knows the address it resolved to
    passed_ip = ipaddress.ip_address(host.split("%")[0])
    if passed_ip != wanted:
        raise StorageError(
            f"systemd's socket listens on {host} port {port} but -l says {address}: anyone who reaches "
            f"{host} could freeze or kill processes; write ListenStream={address} (or -l {host}:{port} "
            "if that is meant)"
        )


def socket_folder(folder: Path, gid: int | None, parasites: Path | None) -> Folder:
    """The daemon socket's folder as an administrator makes it for memcr: as memcr makes it, and passable by
    everyone when it holds the parasites' folder, which the targets' users reach through it."""
    folder = Path(os.path.abspath(folder))  # the administrator's command runs in another folder
    mode = FOLDER_MODE if gid is None else GROUP_FOLDER_MODE
    if parasites is not None and folder in parasites.parents:
        mode |= 0o001
    return Folder(folder, os.geteuid(), gid, mode)


def _socket_folder(folder: Path, gid: int | None, log: Log, parasites: Path | None) -> list[Path]:
    """Make the socket's folder if it is missing; refuse one that would not protect the socket.

    Missing folders are made as `mkdir -p` does, intermediate ones with the
    same mode: 0755, or with -g 0750 and group GID, so that the clients of
    that group can reach the socket and nobody else can. Only the socket's
    own folder is checked, made or not. Returns the folders made, outermost
    first.
    """
    missing = []
    probe = folder
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    mode = FOLDER_MODE if gid is None else GROUP_FOLDER_MODE
    made: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path, mode)
            except FileExistsError:
                continue  # made meanwhile by someone else: the check below judges it
            except OSError as e:
                failed = f"cannot create the folder {path} for the socket: {e.strerror}"
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise MissingFolders(
                        f"{failed}: memcr's user {accounts.user_name(os.geteuid())} may not write in {path.parent}",
                        [socket_folder(folder, gid, parasites)],
                        path=path,
                        errno=e.errno,
                    ) from None
                raise StorageError(failed, path=path, errno=e.errno) from None
            made.append(path)
            _settle_folder(path, mode, gid)
        if made:
            folders = "the folder" if len(made) == 1 else "the folders"
            group = f", group {gid}" if gid is not None else ""
            log(f"created {folders} {', '.join(map(str, made))} for the socket (mode {mode:04o}{group})")
        check_socket_folder(folder, f"the socket's folder {folder}", "-l")
    except BaseException:
        _remove_folders(made, log)
        raise
    return made


def _settle_folder(path: Path, mode: int, gid: int | None) -> None:
    """Give a folder just made its exact mode (mkdir applied the umask) and group."""
    try:
        # through a descriptor of the folder itself: a symlink swapped in meanwhile is refused, not followed
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise StorageError(f"the folder {path} memcr just made changed under it: {e.strerror}", path=path) from None
    try:
        if gid is not None:
            _give_group(fd, gid, f"it cannot give the folder {path} that group (-g)")
        os.fchmod(fd, mode)
    except OSError as e:
        raise StorageError(
            f"cannot give the folder {path} group {gid} and mode {mode:04o}: {e.strerror}", path=path, errno=e.errno
        ) from None
    finally:
        os.close(fd)


def _remove_folders(made: list[Path], log: Log) -> None:
    """Remove the folders memcr made for its socket, innermost first, as long as they are empty."""
    for path in reversed(made):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            log(f"kept the folder {path}: {e.strerror}")  # something else was put in it: not memcr's to remove
            return
        log(f"removed the folder {path}")


def _give_group(file: int | Path, gid: int, consequence: str) -> None:
    """chown to group `gid`; refused to memcr outside that group, as the error says (RightsError)."""
    try:
        if isinstance(file, Path):
            os.chown(file, -1, gid, follow_symlinks=False)
        else:
            os.fchown(file, -1, gid)
    except PermissionError:
        if not accounts.in_group(gid):
            raise accounts.not_in_group(gid, consequence) from None
        raise


def _unix_listener(path: Path, gid: int | None) -> socket.socket:
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if gid is not None:
            # the unbound socket's mode becomes the file's: nobody outside
            # the group can connect between bind() and chown()
            os.fchmod(sock.fileno(), 0o660)
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise StorageError(f"cannot create the socket {path}: {e.strerror}", path=path, errno=e.errno) from None
    try:
        if gid is not None:
            _give_group(path, gid, f"it cannot give its socket {path} that group (-g)")
            os.chmod(path, 0o660)  # bind() applied the umask
        sock.listen(128)
    except BaseException as error:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # this start made it: a failed start leaves no socket file behind
        if isinstance(error, OSError):
            raise StorageError(
                f"cannot set up the socket {path}: {error.strerror}", path=path, errno=error.errno
            ) from None
        raise
    return sock


def _remove_stale(path: Path) -> None:
    """Replace a socket file nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StorageError(f"{path} exists and is not a socket: remove it or choose another -l path", path=path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # stale: left by a daemon that died
        return
    finally:
        probe.close()
    raise StorageError(f"another daemon listens on {path}: stop it or choose another -l path", path=path)
