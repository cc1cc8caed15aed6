"""The sparse figure: a mapping with every 8th page present against a dense one of the same data, in turns.

Both targets hold the same pages (bench/target.c, `sparse` mode spreads
them one in 8 over a mapping 8 times as large), so the two checkpoints
move the same bytes: throughput is data over memcr's "download" time. The
restore's speed against dense, and the set-up (scan and plan, frozen) are
shown beside it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import run as bench_run

THROUGHPUT_AIM = 0.5  # sparse MiB/s over dense MiB/s
SIZE_AIM = 1.1  # dump bytes over data bytes


def measure(target_bin: Path, size_mib: int, directory: Path, runs: int, extra: list[str]) -> dict[str, float]:
    """Medians over `runs` rounds, dense and sparse in turn, after a discarded warm-up round."""
    dense: list[bench_run.MemcrRun] = []
    sparse: list[bench_run.MemcrRun] = []
    for i in range(runs + 1):
        d = bench_run.run_memcr(target_bin, size_mib, directory, extra)
        s = bench_run.run_memcr(target_bin, size_mib, directory, extra, "sparse")
        if i:
            dense.append(d)
            sparse.append(s)
    data = size_mib << 20

    def mib_s(taken: list[bench_run.MemcrRun]) -> float:
        return size_mib / (statistics.median(r.download_ms for r in taken) / 1000)

    return {
        "size_mib": size_mib,
        "dense_mib_s": mib_s(dense),
        "sparse_mib_s": mib_s(sparse),
        "throughput_ratio": statistics.median(
            d.download_ms / s.download_ms for d, s in zip(dense, sparse, strict=True)
        ),
        "dump_ratio": statistics.median(s.dump_bytes / data for s in sparse),
        "restore_ratio": statistics.median(d.upload_ms / s.upload_ms for d, s in zip(dense, sparse, strict=True)),
        "setup_ms": statistics.median(s.setup_ms for s in sparse),
        "dense_setup_ms": statistics.median(d.setup_ms for d in dense),
    }


def print_table(r: dict[str, float]) -> None:
    def verdict(met: bool) -> str:
        return "met" if met else "below"

    print(f"sparse mapping, every 8th page of {r['size_mib'] * 8} MiB present ({r['size_mib']} MiB of data):")
    print(
        f"  checkpoint {r['sparse_mib_s']:.0f} MiB/s against {r['dense_mib_s']:.0f} MiB/s dense: "
        f"{r['throughput_ratio']:.2f} of dense (aim >= {THROUGHPUT_AIM}) "
        f"{verdict(r['throughput_ratio'] >= THROUGHPUT_AIM)}"
    )
    print(f"  dump {r['dump_ratio']:.3f} x the data (aim <= {SIZE_AIM}) {verdict(r['dump_ratio'] <= SIZE_AIM)}")
    print(f"  restore {r['restore_ratio']:.2f} of dense's speed; frozen before the first page moves (scan and "
          f"plan) {r['setup_ms']:.0f} ms against {r['dense_setup_ms']:.0f} ms dense")  # fmt: skip


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memcr-args", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memcr-bench-", dir="/var/tmp") as work:
        target = bench_run.build_target(Path(work))
        print_table(measure(target, args.size_mib, Path(work), args.runs, args.memcr_args.split()))
