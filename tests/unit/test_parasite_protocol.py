"""The parasite's C protocol header and memcr's Python side must agree.

The parasite build compiles the same check (parasite/gen_protocol_check.py);
these tests run it without a build, and without root.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from memcr.engine import parasite_protocol as protocol

ROOT = Path(__file__).resolve().parents[2]
PARASITE = ROOT / "parasite"
HEADER = PARASITE / "protocol.h"
GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="needs gcc to compile protocol.h")

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


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    sys.path.insert(0, str(PARASITE))
    try:
        import gen_protocol_check
    finally:
        sys.path.remove(str(PARASITE))
    return gen_protocol_check


def c_defines() -> dict[str, int]:
    found = {}
    for name, value in re.findall(r"#define (PARASITE_\w+) (0x[0-9a-f]+|\d+)", HEADER.read_text()):
        found[name] = int(value, 0)
    return found


def test_constants_match_header() -> None:
    c = c_defines()
    assert c["PARASITE_ARGS_MAGIC"] == protocol.ARGS_MAGIC
    assert c["PARASITE_NONCE_LEN"] == protocol.NONCE_LEN
    assert c["PARASITE_SUN_PATH_LEN"] == protocol.SUN_PATH_LEN
    assert c["PARASITE_PAGEMAP_MAX"] == protocol.PAGEMAP_MAX
    assert c["PARASITE_SEND_RUNS"] == protocol.SEND_RUNS
    for name in ("SEND", "PAGEMAP", "DROP", "RECV", "END", "UFFD"):
        assert c[f"PARASITE_OP_{name}"] == getattr(protocol, f"OP_{name}"), name
    for name in ("STARTING", "LISTENING", "SERVING", "FAILED"):
        assert c[f"PARASITE_STATUS_{name}"] == getattr(protocol, f"STATUS_{name}"), name
    assert c == protocol.C_NUMBERS


@needs_gcc
def test_struct_layouts_match_header(tmp_path: Path) -> None:
    source = tmp_path / "probe.c"
    source.write_text(PROBE)
    binary = tmp_path / "probe"
    subprocess.run(["gcc", "-I", str(HEADER.parent), "-o", str(binary), str(source)], check=True)
    layout = dict(line.split() for line in subprocess.run([binary], capture_output=True, text=True).stdout.splitlines())
    offsets = {key: int(value) for key, value in layout.items()}
    # the Python struct is packed; the C one only pads at the end
    assert offsets["sun_path"] + protocol.SUN_PATH_LEN == protocol.ARGS.size
    assert offsets["args_size"] >= protocol.ARGS.size
    assert offsets["status"] == 4
    assert offsets["addrlen"] == 16
    assert offsets["listen_fd"] == protocol.ARGS_FDS.size - 12
    assert offsets["page_size"] == 40
    assert offsets["nonce_in"] == 44
    assert offsets["nonce_out"] == 44 + protocol.NONCE_LEN
    assert offsets["sun_family"] == 44 + 2 * protocol.NONCE_LEN
    assert (offsets["cmd_size"], offsets["cmd_addr"], offsets["cmd_len"]) == (protocol.CMD.size, 8, 16)


def compiles(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.c"
    path.write_text(source)
    argv = ["gcc", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(PARASITE), str(path)]
    return subprocess.run(argv, capture_output=True, text=True)


@needs_gcc
def test_the_build_check_passes(generator: ModuleType, tmp_path: Path) -> None:
    done = compiles(generator.check_source(HEADER.read_text(), generator.load_python_side()), tmp_path)
    assert done.returncode == 0, done.stderr


def altered(generator: ModuleType, tmp_path: Path, old: str, new: str) -> ModuleType:
    """The Python side with one line changed, loaded as the build loads it."""
    text = Path(protocol.__file__).read_text()
    assert old in text
    path = tmp_path / "parasite_protocol.py"
    path.write_text(text.replace(old, new, 1))
    module: ModuleType = generator.load_python_side(path)
    return module


@needs_gcc
@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("OP_UFFD = 1, 2, 3, 4, 5, 6", "OP_UFFD = 1, 2, 3, 4, 5, 7", "PARASITE_OP_UFFD is 7"),
        ('("sock_gid", "i"),', '("sock_gid", "q"),', "parasite_args.sock_gid is at 24, 8 bytes"),
        ('("pagemap_fd", "i"),', "", "parasite_args.page_size is at 36"),
        ('    ("sun_path", f"{SUN_PATH_LEN}s"),\n', "", "parasite_args has fields"),
        ('("len", "Q")', '("len", "I")', "parasite_cmd.len is at 16, 4 bytes"),
    ],
)
def test_the_build_check_fails_on_a_layout_or_number_mismatch(
    generator: ModuleType, tmp_path: Path, old: str, new: str, says: str
) -> None:
    source = generator.check_source(HEADER.read_text(), altered(generator, tmp_path, old, new))
    done = compiles(source, tmp_path)
    assert done.returncode != 0
    assert says in done.stderr


def test_a_number_on_one_side_only_fails_the_check(generator: ModuleType, tmp_path: Path) -> None:
    header = HEADER.read_text() + "#define PARASITE_OP_NEW 7\n"
    with pytest.raises(
        generator.Mismatch, match=re.escape("only in protocol.h: PARASITE_OP_NEW; only in parasite_protocol.py: none")
    ):
        generator.check_source(header, protocol)
    fewer = altered(generator, tmp_path, '    "PARASITE_OP_UFFD": OP_UFFD,\n', "")
    with pytest.raises(generator.Mismatch, match=re.escape("only in protocol.h: PARASITE_OP_UFFD")):
        generator.check_source(HEADER.read_text(), fewer)


def test_the_python_structs_follow_the_field_table() -> None:
    """The formats memcr used before the field table: a change to it must be deliberate."""
    assert protocol.ARGS.format == f"<IiiiIIiiiiI{protocol.NONCE_LEN}s{protocol.NONCE_LEN}sH{protocol.SUN_PATH_LEN}s"
    assert (protocol.ARGS_STATUS.format, protocol.ARGS_FDS.format) == ("<Iiii", "<28xiii")
    assert (protocol.CMD.format, protocol.CMD.size) == ("<IIQQ", 24)
