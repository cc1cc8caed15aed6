"""The parasite's protocol, memcr's side: its numbers, start-up arguments and command header.

parasite/protocol.h is the parasite's side. The parasite build checks the
two against each other (parasite/gen_protocol_check.py: every number and
every field's offset and size, compiled against protocol.h), so a change
to one that the other lacks fails the build. parasite/README.md documents
the protocol. Standard library only: the build loads this file by path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

ARGS_MAGIC = 0x4D435031
STATUS_STARTING, STATUS_LISTENING, STATUS_SERVING, STATUS_FAILED = 0, 1, 2, 3
STEP_SOCKET, STEP_BIND, STEP_MODE, STEP_LISTEN, STEP_ACCEPT = 1, 2, 3, 4, 5
NONCE_LEN = 16
SUN_PATH_LEN = 108
PAGEMAP_MAX = 65536
SEND_RUNS = 1024  # runs per SEND

OP_SEND, OP_PAGEMAP, OP_DROP, OP_RECV, OP_END, OP_UFFD = 1, 2, 3, 4, 5, 6

# struct parasite_args, field by field: little-endian on every supported CPU, and packed (C pads only at the end)
ARGS_FIELDS = (
    ("magic", "I"),
    ("status", "i"),
    ("failed_step", "i"),
    ("failed_errno", "i"),
    ("addrlen", "I"),
    ("sock_mode", "I"),
    ("sock_gid", "i"),
    ("listen_fd", "i"),
    ("conn_fd", "i"),
    ("pagemap_fd", "i"),
    ("page_size", "I"),
    ("nonce_in", f"{NONCE_LEN}s"),
    ("nonce_out", f"{NONCE_LEN}s"),
    ("sun_family", "H"),
    ("sun_path", f"{SUN_PATH_LEN}s"),
)
CMD_FIELDS = (("op", "I"), ("arg", "I"), ("addr", "Q"), ("len", "Q"))  # struct parasite_cmd


def layout(fields: tuple[tuple[str, str], ...]) -> dict[str, tuple[int, int]]:
    """Each field's (offset, size) in the packed little-endian struct."""
    found, offset = {}, 0
    for name, code in fields:
        size = struct.calcsize("<" + code)
        found[name] = (offset, size)
        offset += size
    return found


def _struct(fields: tuple[tuple[str, str], ...]) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code in fields))


ARGS = _struct(ARGS_FIELDS)
ARGS_STATUS = _struct(ARGS_FIELDS[:4])  # magic, status, failed_step, failed_errno
# listen_fd, conn_fd, pagemap_fd
ARGS_FDS = struct.Struct(f"<{layout(ARGS_FIELDS)['listen_fd'][0]}xiii")
CMD = _struct(CMD_FIELDS)
REPLY = struct.Struct("<q")


def send_command(runs: Sequence[tuple[int, int]]) -> bytes:
    """A SEND: its header, then its table of (address, length) runs."""
    table = struct.pack(f"<{2 * len(runs)}Q", *(n for run in runs for n in run))
    return CMD.pack(OP_SEND, 0, 0, len(table)) + table


# every PARASITE_* number of protocol.h, with its value here
C_NUMBERS = {
    "PARASITE_ARGS_MAGIC": ARGS_MAGIC,
    "PARASITE_STATUS_STARTING": STATUS_STARTING,
    "PARASITE_STATUS_LISTENING": STATUS_LISTENING,
    "PARASITE_STATUS_SERVING": STATUS_SERVING,
    "PARASITE_STATUS_FAILED": STATUS_FAILED,
    "PARASITE_STEP_SOCKET": STEP_SOCKET,
    "PARASITE_STEP_BIND": STEP_BIND,
    "PARASITE_STEP_CHMOD": STEP_MODE,
    "PARASITE_STEP_LISTEN": STEP_LISTEN,
    "PARASITE_STEP_ACCEPT": STEP_ACCEPT,
    "PARASITE_NONCE_LEN": NONCE_LEN,
    "PARASITE_SUN_PATH_LEN": SUN_PATH_LEN,
    "PARASITE_OP_SEND": OP_SEND,
    "PARASITE_OP_PAGEMAP": OP_PAGEMAP,
    "PARASITE_OP_DROP": OP_DROP,
    "PARASITE_OP_RECV": OP_RECV,
    "PARASITE_OP_END": OP_END,
    "PARASITE_OP_UFFD": OP_UFFD,
    "PARASITE_SEND_RUNS": SEND_RUNS,
    "PARASITE_PAGEMAP_MAX": PAGEMAP_MAX,
}
C_STRUCTS = {"parasite_args": ARGS_FIELDS, "parasite_cmd": CMD_FIELDS}
