"""One stop-signal policy for a whole `kdgeo distill` command (a run or a sweep), in every phase.

SIGINT and SIGTERM set a flag instead of killing the process: :func:`stop_on_signals` installs it
once around the whole command (a sweep's runs share the sweep's flag). Each phase polls it where
stopping loses nothing it cannot name: between the teacher fine-tune's steps (which saves its
progress first), between batches of the teacher-output cache build (the half-built entry is
removed), at every training step (the loop checkpoints), and before and after the final
evaluation and saving (the end-of-training checkpoint stays). :func:`check` raises
:class:`~kdgeo.errors.RunInterrupted`: exit 128 + the signal (130 for SIGINT, 143 for SIGTERM),
a message saying what was kept, and the CLI adds the command that continues.

A second Ctrl-C stops at once: the handler raises :class:`StopNow` wherever the process is, and
the run turns it into one line saying what was kept (no traceback); later signals are ignored
while that happens. Without the flag installed (a library caller in another thread, a unit test)
nothing is pending and the phases run as before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from kdgeo.errors import RunInterrupted


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop where the process is, without a checkpoint."""


class StopFlag:
    """The first SIGINT/SIGTERM is remembered (``signum``); a SIGINT after it raises :class:`StopNow` once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopping_now = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping_now:
            return  # a third Ctrl-C must not interrupt the short way out of the second
        if self.signum is not None and signum == signal.SIGINT:
            self.stopping_now = True
            raise StopNow
        self.signum = signum


_active: StopFlag | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT and SIGTERM set the flag instead of killing the process, until the block ends (main
    thread only: elsewhere signals cannot be handled and the flag stays clear). Nested blocks (a
    sweep's runs) share the outer flag, so a signal between runs is not lost."""
    global _active
    if _active is not None:
        yield _active
        return
    flag = StopFlag()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def pending() -> int | None:
    """The signal that asked the command to stop, or None."""
    return _active.signum if _active is not None else None


def interrupted(
    signum: int, what: str, *, run_dir: str = "", step: int = 0, next_step: str = "resume"
) -> RunInterrupted:
    """The error that stops the command: ``what`` completes "SIGINT ..." (where it stopped, what was
    kept); ``next_step`` as in :class:`~kdgeo.errors.RunInterrupted` (the run may correct it)."""
    return RunInterrupted(
        f"{signal.Signals(signum).name} {what}", exit_code=128 + signum, run_dir=run_dir, step=step, next_step=next_step
    )


def check(what: str, *, run_dir: str = "", step: int = 0, next_step: str = "resume") -> None:
    """Stop here (raise :class:`~kdgeo.errors.RunInterrupted`) when a stop signal is pending."""
    signum = pending()
    if signum is not None:
        raise interrupted(signum, what, run_dir=run_dir, step=step, next_step=next_step)
