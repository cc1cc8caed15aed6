"""A job's target when it is one pid: checkpointed on its own, restored eagerly or lazily."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from memcr import logs
from memcr.errors import Aborted, MemcrError, RightsError, TargetError, TargetGone, TargetKilled
from memcr.options import Cancel, Log, Options
from memcr.report import GroupReport, Report, error_json
from memcr.system import processes
from memcr_client.protocol import Answer

# The checkpoint engine (ptrace, the parasite, the dump, lazy restores) loads with the first request that
# needs it, in the function that does: an idle daemon does not hold it (issue #29)
if TYPE_CHECKING:
    from memcr.lazy.restore import LazyRestore
    from memcr.park.incremental import Kept
    from memcr.park.parked import Parked

OK, ERROR, INVALID_PID = Answer.OK, Answer.ERROR, Answer.INVALID_PID


class Pid:
    """One process. `seized` runs once every thread of it is held, and may refuse it before anything in it
    changes; `forget` frees its pid in the daemon's registry. `kept`: the dump kept at its last restore, which
    its park owns; `keep`: takes the dump a restore keeps (--incremental, V2 option 1004)."""

    def __init__(
        self,
        pid: int,
        seized: Callable[[], None],
        forget: Callable[[], None],
        kept: Kept | None,
        keep: Callable[[Kept], None],
    ) -> None:
        self.pid = pid
        self.seized = seized
        self.forget = forget
        self.kept = kept
        self.keep = keep

    def __str__(self) -> str:
        return f"pid {self.pid}"

    def park(self, options: Options, log: Log, cancel: Cancel) -> HeldPid:
        kept, self.kept = self.kept, None  # the checkpoint owns it, whatever becomes of it
        try:
            from memcr.park.checkpoint import checkpoint  # a failed load (no descriptors) fails this checkpoint only
        except BaseException:
            if kept is not None:
                kept.close()
            raise
        parked = checkpoint(self.pid, options, log, cancel, seized=self.seized, kept=kept)
        return HeldPid(parked, options.lazy, options.incremental, self.keep)

    def answer(self, error: MemcrError) -> int:
        return INVALID_PID if isinstance(error, TargetError) else ERROR

    def aborted(self, error: MemcrError | None) -> int:
        """The answer to the RESTORE that aborted its checkpoint: the target runs on intact, unless it was killed
        or died."""
        if isinstance(error, TargetKilled):
            return ERROR
        if isinstance(error, TargetGone):
            return INVALID_PID
        return OK

    def error_json(self, operation: str, error: MemcrError, options: dict[str, object]) -> str:
        return error_json(self.pid, operation, error, options=options)


class HeldPid:
    """The process parked; `lazy` and `incremental` are the daemon's --lazy and --incremental, for a restore
    that does not say; `keep` takes the dump an eager restore keeps."""

    def __init__(self, parked: Parked, lazy: bool, incremental: bool, keep: Callable[[Kept], None]) -> None:
        self.parked = parked
        self.pid = parked.pid
        self.lazy = lazy
        self.incremental = incremental
        self.keep = keep

    def summary(self) -> str:
        return f" ({self.parked.report.pages} pages)"

    def reports(self) -> Sequence[Report | GroupReport]:
        return [self.parked.report]

    def dead(self) -> bool:
        try:
            return not processes.alive(self.pid)
        except (OSError, RightsError):
            return False  # out of descriptors or refused, say: it may well be alive, look again later

    def bury(self, log: Log) -> None:
        logs.error(log, f"pid {self.pid} died while checkpointed: forgotten")
        self.parked.close_dead()

    def restore(self, lazy: bool | None, incremental: bool | None, log: Log) -> LazyRestore | None:
        why = "as its request asks" if lazy is not None else "the daemon's default"
        lazy = self.lazy if lazy is None else lazy
        incremental = self.incremental if incremental is None else incremental
        log(f"restoring pid {self.pid} {'lazily' if lazy else 'eagerly'} ({why})")
        if lazy and incremental:
            log(f"a lazy restore keeps no dump: the next park of pid {self.pid} writes its dump whole")
        return self.parked.restore(lazy=lazy, keep=self.keep if incremental and not lazy else None)

    def tidy(self) -> None:
        self.parked.tidy()

    def rescue(self) -> None:
        self.parked.restore()

    def rollback(self, error: Aborted) -> None:
        self.parked.rollback(error)
