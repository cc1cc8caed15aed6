"""How memcr ends on a failure: its message on stderr and its exit code, for the command line and the idle daemon."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from memcr.advice import explain
from memcr.errors import MemcrError
from memcr.logs import write
from memcr_client.protocol import AddressError, ExitCode


def error(message: str) -> None:
    """The last word, on stderr: a closed stderr loses it, not the exit code (memcr.logs.write)."""
    write(sys.stderr, f"memcr: error: {message}")


def run_or_exit(action: Callable[[], None]) -> None:
    """Run `action`; a failure ends memcr with its message and exit code (memcr.errors.EXIT_MEANINGS)."""
    try:
        action()
    except AddressError as e:  # from memcr_client, which knows no memcr errors
        error(f"-l/--listen: {e}")
        sys.exit(ExitCode.USAGE)
    except MemcrError as e:
        error(explain(e))
        sys.exit(e.exit_code)
    except Exception as e:
        write(sys.stderr, traceback.format_exc().rstrip("\n"))
        error(f"internal error, please report it: {e!r}")
        sys.exit(ExitCode.FAILED)
