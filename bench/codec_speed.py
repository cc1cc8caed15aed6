"""One core's frame-coding speed for each memcr variant, over the bench target's pages.

    python -m bench.codec_speed PAGES_FILE '["-z lz4", "-c"]'    -> JSON {variant: {encode, decode}} in MiB/s

The transfer itself takes about a core, so this bounds how close to plain a
variant can come on the machine. Run by bench/run.py in a process of its own.
"""

from __future__ import annotations

import json
import sys
import time

from memcr.dump.codec import FRAME_PLAIN, Coding, FrameCodec

SAMPLE_MIB = 64


def speeds(data: memoryview, variant: str) -> dict[str, float]:
    flags = variant.split()
    options = Coding(
        compress=flags[flags.index("-z") + 1] if "-z" in flags else None,
        checksum="-c" in flags,
        cipher="aes-256-gcm" if "-e" in flags else None,
    )
    codec = FrameCodec(options, 1)
    frames = [data[at : at + FRAME_PLAIN] for at in range(0, len(data), FRAME_PLAIN)]
    started = time.thread_time()
    coded = [codec.encode(frame, 0) for frame in frames]
    encoded = time.thread_time() - started
    # the header is bytes (FRAME.pack), typed as one of the pieces: bytes() of a bytes is the same object
    stored = [(bytes(pieces[0]), b"".join(pieces[1:])) for pieces in coded]
    started = time.thread_time()
    for header, body in stored:
        codec.decode(header, body, 0, codec.epoch)
    decoded = time.thread_time() - started
    mib = len(data) / 2**20
    return {"encode": mib / encoded, "decode": mib / decoded}


def main() -> int:
    path, variants = sys.argv[1], json.loads(sys.argv[2])
    with open(path, "rb") as f:
        data = memoryview(f.read(SAMPLE_MIB << 20))
    print(json.dumps({variant: speeds(data, variant) for variant in variants}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
