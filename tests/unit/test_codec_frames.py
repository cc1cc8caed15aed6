"""The dump's frame codec on its own: round trips of every layer combination, and damage refused.

Rootless: pure computation in the test's process.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest

from memcr.dump import codec
from memcr.dump.codec import CIPHERS, COMPRESSORS, FRAME, FRAME_PLAIN, Coding, FrameCodec
from memcr.errors import DumpError, UsageError

PID = 4242
ADDR = 0x7F00_0000_0000

COMBINATIONS = [
    Coding(compress=compress, checksum=checksum, cipher=cipher)
    for compress, checksum, cipher in itertools.product([None, *COMPRESSORS], [False, True], [None, *CIPHERS])
]


def name(options: Coding) -> str:
    return "+".join(filter(None, [options.compress, "md5" if options.checksum else None, options.cipher])) or "plain"


def text(size: int) -> bytes:
    """Pages that compress well."""
    line = b"memcr keeps every byte of a parked process; "
    return (line * (size // len(line) + 1))[:size]


def noise(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def encode(coder: FrameCodec, plain: bytes, addr: int = ADDR) -> tuple[bytes, bytes]:
    """One frame as the dump holds it: (header with digest, stored bytes)."""
    header, *pieces = coder.encode(memoryview(plain), addr)
    return bytes(header), b"".join(bytes(p) for p in pieces)


def protected(options: Coding) -> bool:
    """Whether every byte of a frame is covered: by MD5 or by the cipher's authentication."""
    return options.checksum or options.cipher is not None


PLAINS = {
    "one byte": b"x",
    "a page of text": text(4096),
    "a frame of text": text(FRAME_PLAIN),
    "a frame of noise": noise(FRAME_PLAIN),
    "odd size": text(5000) + noise(3001),
}


@pytest.mark.parametrize("options", COMBINATIONS, ids=name)
def test_round_trip(options: Coding) -> None:
    coder = FrameCodec(options, PID)
    for label, plain in PLAINS.items():
        header, stored = encode(coder, plain)
        assert len(header) == FRAME.size + coder.digest_len
        assert bytes(coder.decode(header, stored, ADDR, coder.epoch)) == plain, label


@pytest.mark.parametrize("compress", list(COMPRESSORS))
def test_compression_is_kept_only_when_it_pays(compress: str) -> None:
    coder = FrameCodec(Coding(compress=compress), PID)
    header, stored = encode(coder, text(FRAME_PLAIN))
    assert coder.parse_header(header)[2] & codec.F_COMPRESSED and len(stored) < FRAME_PLAIN // 10
    header, stored = encode(coder, noise(FRAME_PLAIN))
    assert not coder.parse_header(header)[2] & codec.F_COMPRESSED and len(stored) == FRAME_PLAIN


def test_options_flags() -> None:
    assert not Coding().framed and Coding().flags == 0
    assert Coding(compress="zstd", checksum=True, cipher="aes-256-gcm").flags == 2 | 0x10 | 4 << 8
    assert Coding(cipher="aes-128-cbc").framed


@pytest.mark.parametrize("options", [o for o in COMBINATIONS if protected(o)], ids=name)
def test_any_flipped_byte_is_refused(options: Coding) -> None:
    coder = FrameCodec(options, PID)
    header, stored = encode(coder, text(3 * 4096) + noise(4096))
    frame = header + stored
    # bytes 4-7, the stored length, tell the dump's reader where the frame ends; decode() gets the
    # stored bytes already cut, and MD5 alone covers the length (a wrong cut fails either way)
    places = [0, 8, 12, FRAME.size, len(header), len(header) + 1, len(frame) // 2, len(frame) - 1]
    if options.checksum:
        places += [4, 7]
    for at in sorted(set(places)):
        damaged = bytearray(frame)
        damaged[at] ^= 0x40
        with pytest.raises(DumpError):
            coder.decode(bytes(damaged[: len(header)]), bytes(damaged[len(header) :]), ADDR, coder.epoch)


@pytest.mark.parametrize("options", [o for o in COMBINATIONS if protected(o)], ids=name)
def test_frame_out_of_place_is_refused(options: Coding) -> None:
    """Bound to its address, its dump and its park: moved, replayed into another dump, or taken for another park's
    frame at the same address, it fails; the next park's codec reads it still."""
    coder = FrameCodec(options, PID)
    header, stored = encode(coder, text(4096))
    with pytest.raises(DumpError):
        coder.decode(header, stored, ADDR + 4096, coder.epoch)
    with pytest.raises(DumpError):
        other = FrameCodec(options, PID)  # another dump of this memcr's
        other.decode(header, stored, ADDR, other.epoch)
    with pytest.raises(DumpError):
        coder.decode(header, stored, ADDR, coder.renewed().epoch)  # another park's frame at the same address
    assert bytes(coder.renewed().decode(header, stored, ADDR, coder.epoch)) == text(4096)


@pytest.mark.parametrize("options", COMBINATIONS, ids=name)
def test_truncated_frame_is_refused(options: Coding) -> None:
    coder = FrameCodec(options, PID)
    for plain in (text(8192), noise(8192)):
        header, stored = encode(coder, plain)
        with pytest.raises(DumpError):
            coder.decode(header, stored[:-1], ADDR, coder.epoch)


@pytest.mark.parametrize("options", COMBINATIONS, ids=name)
@pytest.mark.parametrize(
    "field",
    [
        (0, 0),  # no plain bytes
        (0, FRAME_PLAIN + 1),  # more than a frame holds
        (2, 0x80),  # a flag nobody knows
        (3, 1),  # the reserved word
    ],
    ids=["empty", "oversized", "unknown-flag", "reserved"],
)
def test_damaged_header_is_refused(options: Coding, field: tuple[int, int]) -> None:
    coder = FrameCodec(options, PID)
    header, stored = encode(coder, text(4096))
    values = list(FRAME.unpack(header[: FRAME.size]))
    index, value = field
    values[index] = value
    with pytest.raises(DumpError, match="damaged frame header"):
        coder.decode(FRAME.pack(*values) + header[FRAME.size :], stored, ADDR, coder.epoch)


def test_frame_of_other_options_is_refused() -> None:
    sealed = FrameCodec(Coding(cipher="aes-256-gcm"), PID)
    header, stored = encode(sealed, text(4096))
    with pytest.raises(DumpError, match="does not match the dump's options"):
        FrameCodec(Coding(), PID).decode(header, stored, ADDR, b"")
    packed = FrameCodec(Coding(compress="lz4"), PID)
    header, stored = encode(packed, text(4096))
    with pytest.raises(DumpError, match="does not match the dump's options"):
        FrameCodec(Coding(), PID).decode(header, stored, ADDR, b"")


def test_unprotected_compressed_garbage_is_refused() -> None:
    """Without checksum or cipher, bytes that do not decompress still never get through."""
    for compress in COMPRESSORS:
        coder = FrameCodec(Coding(compress=compress), PID)
        header, stored = encode(coder, text(65536))
        with pytest.raises(DumpError):
            coder.decode(header, os.urandom(len(stored)), ADDR, coder.epoch)


@pytest.mark.parametrize(("given", "kept"), [("lz4", "lz4"), ("LZ4", "lz4"), ("Zstd", "zstd")])
def test_compressor_names(given: str, kept: str) -> None:
    assert codec.compressor_name(given) == kept


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(UsageError, match="unknown compression 'gzip': choose one of lz4, zstd"):
        codec.compressor_name("gzip")
    with pytest.raises(UsageError, match="unknown cipher 'des': choose one of aes-128-cbc, aes-192-cbc"):
        codec.cipher_name("des")
    assert codec.cipher_name("AES-256-GCM") == "aes-256-gcm"
