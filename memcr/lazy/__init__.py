"""Lazy restore: the target runs again at once, its pages arrive on first touch or from a background stream.

The parasite makes a userfaultfd inside the target (it must belong to the
target's mm) and hands it to memcr, which watches every mapping that holds
dumped pages for missing-page faults. Then the target runs, still traced
by the thread that froze it; that thread passes signals and stops on while
others here fill pages, first those a thread of the target waits for, then
the rest in address order. Once none is missing memcr lets go.

The cardinal rule in this phase: a page must never read as zeros because
memcr is gone. Closing the userfaultfd would make every missing page read
as zeros, and when memcr dies its descriptors close before the kernel
kills its tracees (EXITKILL), so a guardian process, started by the
tracing thread, holds a copy of each userfaultfd: it dies (PR_SET_PDEATHSIG)
only after that thread's exit has killed the target.
"""
