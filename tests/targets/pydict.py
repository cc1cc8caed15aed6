"""A Python interpreter holding a large dict; verifies it after SIGUSR1."""

import os
import signal
import sys

N = 300_000


def value(i: int) -> str:
    return f"value-{i * 7919 % 1000003}-" + "x" * (i % 50)


def main() -> int:
    table = {f"key-{i}": value(i) for i in range(N)}
    numbers = {i: i * i for i in range(N)}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print(f"ready {os.getpid()}", flush=True)
    signal.sigwait({signal.SIGUSR1})
    ok = len(table) == N and all(table[f"key-{i}"] == value(i) for i in range(N))
    ok = ok and all(numbers[i] == i * i for i in range(N))
    if not ok:
        print("dict damaged", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
