"""One writer per run directory and per cache entry: exclusive ``flock`` locks on small files.

Two `kdgeo distill` commands into the same run directory would interleave their metrics,
summary.json, spec files and student weights, and two runs that need the same fine-tuned teacher
or teacher-output cache entry would both spend the time to build it. A lock here is
``fcntl.flock(LOCK_EX)`` on a lock file:

- the OS releases it when the holder dies, even by ``kill -9``: a lock is never stale, and a
  leftover file is just a file (the next holder overwrites it);
- the file records its holder (PID, host, start time, command) as one JSON object, so that the
  run that cannot have it says who does;
- it is created by the lock itself (``O_CREAT``) and deleted by the holder on release while it
  still holds it; whoever was waiting on the deleted file notices (its inode is no longer the
  path's) and tries again, so two processes never both believe they hold it.

A run directory's lock is ``<run>/.kdgeo.lock`` (:data:`LOCK_NAME`), taken by
:func:`kdgeo.distillation.run_distill` (rank 0 alone under torchrun) before anything is written there
and held until it returns or raises; `kdgeo eval` and `kdgeo compare` ask :func:`run_holder`
whether a run is still being written. A cache entry ``<dir>/<key>`` is guarded by
``<dir>/.<key>.lock`` (:func:`entry_lock`): the second process waits, then finds the entry built.

flock is per host on network filesystems (NFS emulates it with POSIX locks, per client at best): do
not run two kdgeo commands on one run directory from different machines.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kdgeo.errors import KdgeoError, OutputError

LOCK_NAME = ".kdgeo.lock"
"""The lock file inside a run directory."""

POLL_SECONDS = 0.2
"""How often a waiting process tries again (polling, so that Ctrl-C interrupts the wait at once)."""

BUSY_RETRY_SECONDS = 1.0
"""A non-blocking lock that is busy is tried again for this long before it is refused: a reader
(:func:`holder_of`) holds the file for microseconds, and a holder writes its record just after
taking the lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as recorded in its file (any field may be missing in a damaged file)."""

    pid: int | None = None
    host: str | None = None
    started: str | None = None
    command: str | None = None

    def describe(self) -> str:
        """``PID 123 on host h, started 2026-12-01 21:00:00 UTC`` (what is known of it)."""
        parts = []
        if self.pid is not None:
            parts.append(f"PID {self.pid}")
        if self.host:
            parts.append(f"on host {self.host}")
        text = " ".join(parts) or "holder unknown"
        return f"{text}, started {self.started}" if self.started else text


class RunInUseError(KdgeoError):
    """The run directory is locked by another kdgeo process (exit 2); ``holder`` says which."""

    def __init__(self, message: str, holder: Holder) -> None:
        self.holder = holder
        super().__init__(message)


class Lock:
    """An exclusive flock held on ``path``; :meth:`release` (or leaving the ``with``) deletes the
    file and lets go. ``created_dir`` is a directory the lock made and removes again when it is
    still empty at release (a run that failed its pre-flight leaves nothing behind)."""

    def __init__(self, path: Path, fd: int, created_dir: Path | None = None) -> None:
        self.path, self.fd, self.created_dir = path, fd, created_dir

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # while still holding it: see the module docstring
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = -1
        if self.created_dir is not None:
            try:
                os.rmdir(self.created_dir)  # only when empty
            except OSError:
                pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _record() -> bytes:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    program = f"python -m {argv0.parent.name}" if argv0.name == "__main__.py" else argv0.name  # `kdgeo`
    command = " ".join([program, shlex.join(sys.argv[1:])]).strip()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}
    return (json.dumps(holder) + "\n").encode()


def _read_holder(fd: int) -> Holder | None:
    """The record in an open lock file; None when it is empty or unreadable (being written)."""
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    return Holder(
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        host=str(data["host"]) if data.get("host") else None,
        started=str(data["started"]) if data.get("started") else None,
        command=str(data["command"]) if data.get("command") else None,
    )


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder deletes it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def try_lock(path: Path, make_dir: bool = False, busy_retry: float = BUSY_RETRY_SECONDS) -> Lock | Holder:
    """Take the lock on ``path`` without waiting for its holder: the :class:`Lock`, or the
    :class:`Holder` that has it. ``make_dir`` creates the parent directory (and removes it at
    release if it is empty then). OSError when the file cannot be created."""
    created: Path | None = None
    deadline = time.monotonic() + busy_retry
    while True:
        if make_dir and not path.parent.is_dir():
            try:
                path.parent.mkdir()
                created = path.parent
            except FileExistsError:
                pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            if make_dir:  # the directory was removed by a holder releasing it: make it again
                continue
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                return holder or Holder()
            time.sleep(0.05)
            continue
        if not _same_file(fd, path):  # we locked a file its holder deleted on release: take the new one
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record(), 0)
        except OSError:
            pass  # the lock holds without its record; others then see "holder unknown"
        return Lock(path, fd, created)


def holder_of(path: Path) -> Holder | None:
    """Who holds the lock on ``path`` now; None when nobody does (or the file cannot be read).
    Creates nothing: a reader such as `kdgeo compare` may not be able to write there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            for _ in range(10):  # a holder writes its record just after taking the lock
                holder = _read_holder(fd)
                if holder is not None:
                    return holder
                time.sleep(0.02)
            return Holder()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def run_holder(run_dir: str | Path) -> Holder | None:
    """The kdgeo process writing ``run_dir`` now (a distill still running), or None."""
    return holder_of(Path(os.path.expanduser(str(run_dir))) / LOCK_NAME)


def lock_run_dir(run_dir: Path, shown: str, create: bool) -> Lock | None:
    """Take ``run_dir``'s lock, or raise :class:`RunInUseError` naming the holder.

    ``create``: make the run directory for it (a new run; it is removed again at release if
    nothing else was written there). Without ``create``, or when ``run_dir`` is something other
    than a directory, nothing is locked (None): the caller's checks report it. ``shown`` is the
    directory as the user named it (``runs/NAME``).
    """
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        return None
    if not create and not run_dir.is_dir():
        return None
    try:
        got = try_lock(run_dir / LOCK_NAME, make_dir=create)
    except OSError as err:
        raise OutputError(
            f"cannot create the lock file {run_dir / LOCK_NAME} ({err.strerror or err}); make {run_dir.parent} "
            "writable, or set output.dir (or --out) to a writable directory."
        ) from None
    if isinstance(got, Holder):
        raise RunInUseError(
            f"{shown} is in use by another kdgeo run ({got.describe()}): wait for it to finish, or give this run "
            "another output.name.",
            got,
        )
    return got


def still_running(run_dir: str | Path, holder: Holder) -> str:
    """The sentence `kdgeo eval` and `kdgeo compare` say about a locked run directory."""
    return f"{run_dir} is still running (a kdgeo run holds it: {holder.describe()})"


@contextmanager
def entry_lock(
    path: Path, what: str, on_wait: Callable[[str], None], stop: Callable[[], None] | None = None
) -> Iterator[Lock]:
    """Hold the lock on ``path`` (a cache entry's lock file), waiting as long as another process
    holds it; ``on_wait`` is told once whom we wait for, and ``stop`` is called at every poll (it
    raises to give up waiting, e.g. on Ctrl-C). The caller checks the cache again inside: the
    process it waited for has usually built the entry by then."""
    told = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            got = try_lock(path, busy_retry=0.0)
        except OSError as err:
            raise OutputError(
                f"cannot create the lock file {path} ({err.strerror or err}), which keeps two kdgeo processes from "
                f"building {what} at once; make {path.parent} writable."
            ) from None
        if isinstance(got, Lock):
            break
        if not told:
            if got.pid is None:  # its record comes just after its lock: read it again
                got = holder_of(path) or got
            on_wait(f"waiting for another kdgeo process building {what} ({got.describe()})")
            told = True
        if stop is not None:
            stop()
        time.sleep(POLL_SECONDS)
    with got:
        yield got
