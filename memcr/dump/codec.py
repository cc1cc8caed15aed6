"""The dump's layers: compression, encryption and checksum, applied per frame.

A frame carries at most FRAME_PLAIN bytes of pages. Writing: compress (kept
only when it saves space), then seal (AES-GCM, or AES-CBC then HMAC-SHA256
for the CBC names; a fresh random IV per frame, the frame's place in the
dump as associated data), then MD5 over the frame and its place, so a
frame moved, swapped or replayed from elsewhere fails its checksum. Its
place: its address, and the epoch of the park that wrote it (an
incremental re-park adds frames of its own to a kept dump, memcr.park.incremental). Reading runs the layers
backwards and refuses a frame before any of its bytes are used.

The keys are random per memcr process and live only in its memory, so a
dump can be read back by the process that wrote it and by nobody else.
"""

from __future__ import annotations

import copy
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from memcr.errors import DumpError, UsageError

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

FRAME_PLAIN = 1 << 20
FRAME = struct.Struct("<IIII")  # plain length, stored length, flags, reserved
AAD = struct.Struct("<IQII")  # after the epoch: pid, address of the frame's first byte, plain length, flags
DIGEST_LEN = 16
F_COMPRESSED = 1
F_ENCRYPTED = 2

COMPRESSORS = {"lz4": 1, "zstd": 2}
CIPHERS = {"aes-128-cbc": 1, "aes-192-cbc": 2, "aes-256-cbc": 3, "aes-256-gcm": 4}
DEFAULT_CIPHER = "aes-256-gcm"
SAMPLE = 4096
ZSTD_LEVEL = 1  # on text it compresses at several GiB/s: faster than the disk it saves


def _choice(kind: str, name: str, choices: dict[str, int]) -> str:
    key = name.lower()
    if key not in choices:
        raise UsageError(f"unknown {kind} {name!r}: choose one of {', '.join(choices)}")
    return key


def compressor_name(name: str) -> str:
    return _choice("compression", name, COMPRESSORS)


def cipher_name(name: str) -> str:
    return _choice("cipher", name, CIPHERS)


@dataclass(frozen=True)
class Coding:
    """How a dump's pages are stored: compressed, checksummed, encrypted (each optional)."""

    compress: str | None = None
    checksum: bool = False
    cipher: str | None = None

    @property
    def framed(self) -> bool:
        return bool(self.compress or self.checksum or self.cipher)

    @property
    def flags(self) -> int:
        """The dump header's flags: compressor, checksum bit, cipher."""
        return (
            COMPRESSORS.get(self.compress or "", 0)
            | (0x10 if self.checksum else 0)
            | CIPHERS.get(self.cipher or "", 0) << 8
        )


def preload(coding: Coding) -> None:
    """Import the libraries these options code with: ~25 ms for all of them, too long to keep a target frozen."""
    import importlib

    modules = {
        "lz4.block": coding.compress == "lz4",
        "zstandard": coding.compress == "zstd",
        "cryptography.hazmat.primitives.ciphers.aead": bool(coding.cipher),
        "hmac": bool(coding.cipher),
        "hashlib": coding.checksum,
    }
    for name, needed in modules.items():
        if needed:
            importlib.import_module(name)


class _Compressor(Protocol):
    def compress(self, data: memoryview) -> bytes: ...
    def decompress(self, data: bytes | memoryview, plain_len: int) -> bytes: ...


class _Sealer(Protocol):
    def seal(self, data: bytes | memoryview, aad: bytes) -> list[bytes]: ...
    def open(self, data: bytes, aad: bytes) -> bytes | memoryview: ...


class _Lz4:
    def __init__(self) -> None:
        import lz4.block

        self._block = lz4.block

    def compress(self, data: memoryview) -> bytes:
        return bytes(self._block.compress(data, store_size=False))

    def decompress(self, data: bytes | memoryview, plain_len: int) -> bytes:
        return bytes(self._block.decompress(data, uncompressed_size=plain_len))


class _Zstd:
    """zstd contexts are not thread-safe: each codec thread gets its own."""

    def __init__(self) -> None:
        import zstandard

        self._zstd = zstandard
        self._local = threading.local()

    def _contexts(self) -> Any:  # this thread's: .c compresses, .d decompresses
        if not hasattr(self._local, "c"):
            self._local.c = self._zstd.ZstdCompressor(level=ZSTD_LEVEL)
            self._local.d = self._zstd.ZstdDecompressor()
        return self._local

    def compress(self, data: memoryview) -> bytes:
        return bytes(self._contexts().c.compress(data))

    def decompress(self, data: bytes | memoryview, plain_len: int) -> bytes:
        return bytes(self._contexts().d.decompress(data, max_output_size=plain_len))


@cache
def _process_key(cipher: str, length: int) -> bytes:
    """A key made at first use and kept only in this process's memory."""
    return os.urandom(length)


class _Gcm:
    def __init__(self, cipher: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(_process_key(cipher, 32))

    def seal(self, data: bytes | memoryview, aad: bytes) -> list[bytes]:
        nonce = os.urandom(12)
        return [nonce, self._aead.encrypt(nonce, data, aad)]

    def open(self, data: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        view = memoryview(data)
        try:
            return self._aead.decrypt(view[:12], view[12:], aad)
        except InvalidTag:
            raise DumpError("an encrypted frame of the dump fails authentication: it was altered") from None


class _CbcHmac:
    """AES-CBC, then HMAC-SHA256 over IV, ciphertext and the frame's place."""

    def __init__(self, cipher: str) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        bits = int(cipher.split("-")[1])
        self._key = _process_key(cipher, bits // 8)
        self._mac_key = _process_key(cipher + "-hmac", 32)
        self._cipher, self._algorithms, self._modes = Cipher, algorithms, modes

    def _aes(self, iv: bytes | memoryview) -> Any:  # a cryptography Cipher
        return self._cipher(self._algorithms.AES(self._key), self._modes.CBC(iv))

    def _tag(self, aad: bytes, *body: bytes | memoryview) -> bytes:
        import hmac  # with hashlib it costs megabytes: load only when used

        mac = hmac.new(self._mac_key, aad, "sha256")
        for piece in body:
            mac.update(piece)
        return mac.digest()

    def seal(self, data: bytes | memoryview, aad: bytes) -> list[bytes]:
        iv = os.urandom(16)
        pad = 16 - len(data) % 16  # PKCS#7: always at least one byte
        encryptor = self._aes(iv).encryptor()
        # the pages and their padding in two pieces: the pages are not copied to pad them
        body = encryptor.update(data)
        tail = encryptor.update(bytes([pad]) * pad) + encryptor.finalize()
        return [iv, body, tail + self._tag(aad, iv, body, tail)]

    def open(self, data: bytes, aad: bytes) -> bytes | memoryview:
        view = memoryview(data)
        body, tag = view[:-32], view[-32:]
        if len(body) < 32 or len(body) % 16 or not _same(tag, self._tag(aad, body)):
            raise DumpError("an encrypted frame of the dump fails authentication: it was altered")
        padded = self._aes(body[:16]).decryptor().update(body[16:])
        pad = padded[-1]
        if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
            raise DumpError("an encrypted frame of the dump has bad padding: it was altered")
        return memoryview(padded)[:-pad]


def _md5(*pieces: bytes | memoryview) -> bytes:
    import hashlib  # loads OpenSSL: only dumps with -c pay for it

    md5 = hashlib.md5(usedforsecurity=False)
    for piece in pieces:
        md5.update(piece)
    return md5.digest()


def _same(a: bytes | memoryview, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)


def coding_pool(codec: FrameCodec, encoding: bool) -> ThreadPoolExecutor:
    """Threads for coding frames: the codecs release the GIL, so frames are coded on other cores.

    Moving the bytes takes about one core (memcr's thread and the parasite,
    mostly in the kernel). Coding that is faster leaves it that core: a
    thread more would only slow the transfer down. Slower coding takes
    every core.
    """
    cores = len(os.sched_getaffinity(0))
    workers = cores if codec.slower_than_transfer(encoding) else max(1, cores - 1)
    from concurrent.futures import ThreadPoolExecutor  # with logging, ~1 MiB the idle daemon need not hold

    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memcr-codec")


T = TypeVar("T")


def submit(pool: ThreadPoolExecutor | None, work: Callable[..., T], *args: object) -> Future[T]:
    """Hand the work to a thread of `pool`; without a pool, or where no thread can be started (a task limit), do
    it here. A submit() that raised for want of a thread has queued the work all the same: it may run there too."""
    from concurrent.futures import Future

    try:
        if pool is not None:
            return pool.submit(work, *args)
    except RuntimeError:
        pass
    done: Future[T] = Future()
    try:
        done.set_result(work(*args))
    except BaseException as e:
        done.set_exception(e)
    return done


class FrameCodec:
    """Turns plain chunks into frames and back, for one dump."""

    def __init__(self, coding: Coding, pid: int) -> None:
        self.coding = coding
        self.pid = pid
        # binds frames to the park that wrote them: the same process may dump the same pid again, and a kept
        # dump holds frames of several parks, some for the same addresses
        self.epoch = os.urandom(8)
        self._compressor: _Compressor | None = None
        if coding.compress:
            self._compressor = _Lz4() if coding.compress == "lz4" else _Zstd()
        self._sealer: _Sealer | None = None
        if coding.cipher:
            self._sealer = _Gcm(coding.cipher) if coding.cipher.endswith("gcm") else _CbcHmac(coding.cipher)

    def renewed(self) -> FrameCodec:
        """The codec of the next park into the same dump: the same keys, frames of an epoch of their own."""
        other = copy.copy(self)
        other.epoch = os.urandom(8)
        return other

    def _aad(self, epoch: bytes, addr: int, plain_len: int, flags: int) -> bytes:
        return epoch + AAD.pack(self.pid, addr, plain_len, flags)

    def slower_than_transfer(self, encoding: bool) -> bool:
        """Whether one core codes frames slower than memcr moves pages (about 1 GiB/s).

        MD5, zstd compression and AES-CBC encryption run at about 0.5 GiB/s
        a core; lz4, AES-GCM and every decompression at 0.8 to 3 GiB/s.
        """
        if self.coding.checksum:
            return True
        return encoding and (self.coding.compress == "zstd" or isinstance(self._sealer, _CbcHmac))

    @property
    def digest_len(self) -> int:
        return DIGEST_LEN if self.coding.checksum else 0

    def encode(self, plain: memoryview, addr: int) -> list[bytes | memoryview]:
        """The pieces of one frame: header (with digest) and stored bytes."""
        flags = 0
        data: bytes | memoryview = plain
        if self._compressor and self._worth_compressing(plain):
            packed = self._compressor.compress(plain)
            if len(packed) < len(plain):
                data, flags = packed, F_COMPRESSED
        pieces: list[bytes | memoryview] = [data]
        if self._sealer:
            flags |= F_ENCRYPTED
            pieces = list(self._sealer.seal(data, self._aad(self.epoch, addr, len(plain), flags)))
        header = FRAME.pack(len(plain), sum(map(len, pieces)), flags, 0)
        if self.coding.checksum:
            header += _md5(self._aad(self.epoch, addr, len(plain), flags), header, *pieces)
        return [header, *pieces]

    def _worth_compressing(self, plain: memoryview) -> bool:
        """Sample a few pages: random data (keys, media, compressed heaps) is not worth the CPU."""
        assert self._compressor is not None
        size = len(plain)
        if size < 4 * SAMPLE:
            return True
        for i in range(4):
            at = i * (size // 4)
            if len(self._compressor.compress(plain[at : at + SAMPLE])) < SAMPLE * 0.9:
                return True
        return False

    def parse_header(self, raw: bytes) -> tuple[int, int, int]:
        plain_len, stored_len, flags, reserved = FRAME.unpack(raw[: FRAME.size])
        if plain_len == 0 or plain_len > FRAME_PLAIN or reserved or flags & ~(F_COMPRESSED | F_ENCRYPTED):
            raise DumpError("the dump has a damaged frame header")
        if bool(flags & F_ENCRYPTED) != bool(self._sealer) or (flags & F_COMPRESSED and not self._compressor):
            raise DumpError("a frame of the dump does not match the dump's options")
        return plain_len, stored_len, flags

    def decode(self, raw_header: bytes, stored: bytes, addr: int, epoch: bytes) -> bytes | memoryview:
        """Check and unpack one frame, written at `epoch` (that of the codec that wrote it); nothing unchecked
        gets out."""
        plain_len, _, flags = self.parse_header(raw_header)
        if self.coding.checksum:
            header, digest = raw_header[: FRAME.size], raw_header[FRAME.size :]
            if _md5(self._aad(epoch, addr, plain_len, flags), header, stored) != digest:
                raise DumpError("a frame of the dump fails its MD5 checksum: the dump is corrupt")
        data: bytes | memoryview = stored
        if self._sealer:
            data = self._sealer.open(stored, self._aad(epoch, addr, plain_len, flags))
        if flags & F_COMPRESSED:
            assert self._compressor is not None
            try:
                data = self._compressor.decompress(data, plain_len)
            except Exception:  # each library has its own error type for bad input
                raise DumpError("a compressed frame of the dump cannot be decompressed") from None
        if len(data) != plain_len:
            raise DumpError("a frame of the dump has the wrong length")
        return data
