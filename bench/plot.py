"""The throughput-against-size plot of `make bench` (PNG)."""

from __future__ import annotations

from pathlib import Path


def throughput_png(sweep: dict[int, dict[str, float]], path: Path) -> None:
    """sweep: size MiB -> {checkpoint, restore, write_limit, read_limit} in MiB/s."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a build machine
    import matplotlib.pyplot as plt

    sizes = sorted(sweep)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, style in (
        ("checkpoint", "memcr checkpoint", "o-"),
        ("write_limit", "limit: memory -> socket -> file", "o--"),
        ("restore", "memcr restore", "s-"),
        ("read_limit", "limit: file -> socket -> memory", "s--"),
    ):
        ax.plot(sizes, [sweep[s][key] for s in sizes], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes])
    ax.set_xlabel("target size")
    ax.set_ylabel("MiB/s (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("memcr throughput against the machine's own limits")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wakeup_png(results: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    """results: size MiB -> {eager, lazy} -> {wake_p50, wake_p99, complete_p50} in ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for mode, style in (("eager", "s"), ("lazy", "o")):
        ax.plot(sizes, [results[s][mode]["wake_p50"] for s in sizes], f"{style}-", label=f"{mode}: wake-up p50")
        ax.plot(sizes, [results[s][mode]["wake_p99"] for s in sizes], f"{style}:", label=f"{mode}: wake-up p99")
        ax.plot(sizes, [results[s][mode]["complete_p50"] for s in sizes], f"{style}--", label=f"{mode}: complete p50")
    ax.axhline(20, color="grey", linewidth=0.8, linestyle="-.", label="aim: lazy wake-up within 20 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{s} MiB" if s < 1024 else f"{s // 1024} GiB" for s in sizes])
    ax.set_xlabel("target size")
    ax.set_ylabel("ms from restore (log scale)")
    ax.set_title("wake-up: until the target answers a ping; complete: every page back")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
