"""The parasite's C protocol header and memcr's Python mirror must agree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from memcr import parasite

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "parasite" / "protocol.h"

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include "protocol.h"
int main(void) {
    printf("args_size %zu\n", sizeof(struct parasite_args));
    printf("status %zu\n", offsetof(struct parasite_args, status));
    printf("addrlen %zu\n", offsetof(struct parasite_args, addrlen));
    printf("listen_fd %zu\n", offsetof(struct parasite_args, listen_fd));
    printf("page_size %zu\n", offsetof(struct parasite_args, page_size));
    printf("nonce_in %zu\n", offsetof(struct parasite_args, nonce_in));
    printf("nonce_out %zu\n", offsetof(struct parasite_args, nonce_out));
    printf("sun_family %zu\n", offsetof(struct parasite_args, sun_family));
    printf("sun_path %zu\n", offsetof(struct parasite_args, sun_path));
    printf("cmd_size %zu\n", sizeof(struct parasite_cmd));
    printf("cmd_addr %zu\n", offsetof(struct parasite_cmd, addr));
    printf("cmd_len %zu\n", offsetof(struct parasite_cmd, len));
    return 0;
}
"""


def c_defines() -> dict[str, int]:
    found = {}
    for name, value in re.findall(r"#define (PARASITE_\w+) (0x[0-9a-f]+|\d+)", HEADER.read_text()):
        found[name] = int(value, 0)
    return found


def test_constants_match_header() -> None:
    c = c_defines()
    assert c["PARASITE_ARGS_MAGIC"] == parasite.ARGS_MAGIC
    assert c["PARASITE_NONCE_LEN"] == parasite.NONCE_LEN
    assert c["PARASITE_SUN_PATH_LEN"] == parasite.SUN_PATH_LEN
    assert c["PARASITE_PAGEMAP_MAX"] == parasite.PAGEMAP_MAX
    assert c["PARASITE_SEND_RUNS"] == parasite.SEND_RUNS
    for name in ("SEND", "PAGEMAP", "DROP", "RECV", "END", "UFFD"):
        assert c[f"PARASITE_OP_{name}"] == getattr(parasite, f"OP_{name}"), name
    for name in ("STARTING", "LISTENING", "SERVING", "FAILED"):
        assert c[f"PARASITE_STATUS_{name}"] == getattr(parasite, f"STATUS_{name}"), name


def test_struct_layouts_match_header(tmp_path: Path) -> None:
    source = tmp_path / "probe.c"
    source.write_text(PROBE)
    binary = tmp_path / "probe"
    subprocess.run(["gcc", "-I", str(HEADER.parent), "-o", str(binary), str(source)], check=True)
    layout = dict(line.split() for line in subprocess.run([binary], capture_output=True, text=True).stdout.splitlines())
    offsets = {key: int(value) for key, value in layout.items()}
    # the Python struct is packed; the C one only pads at the end
    assert offsets["sun_path"] + parasite.SUN_PATH_LEN == parasite.ARGS.size
    assert offsets["args_size"] >= parasite.ARGS.size
    assert offsets["status"] == 4
    assert offsets["addrlen"] == 16
    assert offsets["listen_fd"] == parasite.ARGS_FDS.size - 12
    assert offsets["page_size"] == 40
    assert offsets["nonce_in"] == 44
    assert offsets["nonce_out"] == 44 + parasite.NONCE_LEN
    assert offsets["sun_family"] == 44 + 2 * parasite.NONCE_LEN
    assert (offsets["cmd_size"], offsets["cmd_addr"], offsets["cmd_len"]) == (parasite.CMD.size, 8, 16)
