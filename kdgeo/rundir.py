"""What goes on disk, and reading it back.

A run directory holds::

    run.json         the run-directory format version and the kdgeo that wrote it
    spec.toml        the resolved run spec (every default filled in)
    spec.json        the same, as JSON (what `kdgeo compare` reads)
    metrics.jsonl    one JSON object per logged step, monitor measurement and evaluation
    summary.json     final metrics, wall time, samples/s, versions, seed, layer pairs
    student/         the trained student: save_pretrained (safetensors) + tokenizer
    checkpoint-N/    training state for --resume (see kdgeo.checkpoint)

Files are written atomically (temporary file in the same directory, fsync, rename), so a
crash never leaves a half-written ``summary.json``; ``metrics.jsonl`` is appended a line at a
time and flushed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from kdgeo.errors import KdgeoError, OutputError
from kdgeo.files import NAME_MAX_BYTES, describe_os_error, utf8_position

SPEC_TOML = "spec.toml"
SPEC_JSON = "spec.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_MARKER = "run.json"
STUDENT = "student"
FORMAT_VERSION = 1


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can load the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return value


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}. Check the directory exists, is writable and has space.") from None


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line with a single write(2) on an O_APPEND descriptor: a kill at any moment
    leaves the line whole or absent, never torn (a write is not interrupted by a signal)."""
    data = (json.dumps(json_safe(record)) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # only on exotic filesystems; finish the line
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot append to {path}: {err.strerror or err}.") from None


def read_json(path: str | Path) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise KdgeoError(f"{path} does not exist.") from None
    except OSError as err:
        raise KdgeoError(f"{path} cannot be read: {describe_os_error(err, path)}.") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line, column = utf8_position(raw, err)
        raise KdgeoError(f"{path} cannot be read as JSON: line {line}, column {column} is not UTF-8 text; restore the file.") from None
    except json.JSONDecodeError as err:
        raise KdgeoError(f"{path} cannot be read as JSON ({err}).") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; [] when it does not exist.

    A crash can cut the last line short (it then has no newline): reading stops there, and
    everything before it is good. Any other line that is not UTF-8 JSON means the file was
    damaged or edited: a KdgeoError names the file and the line, rather than silently dropping
    that line and every one after it.
    """
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise KdgeoError(f"{path} cannot be read: {describe_os_error(err, path)}.") from None
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if number == len(lines):  # no newline after it: a line cut short
                break
            reason = "is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"is not JSON ({err.msg})"
            raise KdgeoError(
                f"{path}, line {number} {reason}: the file was damaged or edited by hand. Restore it, delete that "
                "line, or leave this run out."
            ) from None
    return records


def path_component_problem(name: str) -> str | None:
    """Why ``name`` cannot be one directory name inside output.dir (None when it can).

    A run never writes outside output.dir: a separator, ``..``, an absolute path or a drive
    would move it elsewhere; control characters (newlines, NUL, DEL) break file names and every
    log line that shows them; more than 255 bytes fails with ENAMETOOLONG.
    """
    if not name:
        return "is empty; give a directory name"
    if name in (".", ".."):
        return f"{name!r} is '.' or '..', which names no new directory; give a directory name"
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return f"{_short(name)} is a path, not a single directory name (no '/' or '\\'); the run goes under output.dir"
    bad = next((c for c in name if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        return f"{_short(name)} contains the control character {bad!r}; use printable characters"
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > NAME_MAX_BYTES:
        return f"is {size} bytes long (UTF-8); a directory name holds at most {NAME_MAX_BYTES} bytes"
    return None


def _short(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def prepare_run_dir(parent: str | Path, name: str, overwrite: bool) -> Path:
    """Create ``parent/name``; refuse to touch an existing run unless ``overwrite``.

    The spec already refuses names that are not one directory name; this checks again where the
    path is made, since ``name`` may come from elsewhere (a run directory passed as SPEC).
    """
    problem = path_component_problem(name)
    if problem:
        raise OutputError(f"output.name: {problem}.")
    parent = Path(os.path.expanduser(str(parent)))
    run = parent / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"output.dir = '{parent}': cannot create it ({err.strerror or err}); set output.dir (or --out) to a writable directory."
        ) from None
    # Resolved, so that a symbolic link named like the run cannot lead the writes elsewhere either.
    try:
        outside = run.resolve().parent != parent.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop
        outside = True
    if outside:
        raise OutputError(
            f"output.name = {name!r}: {run} leads outside output.dir = '{parent}' (a symbolic link?); "
            "choose another output.name."
        )
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output.dir = '{parent}' is not writable; set output.dir (or --out) to a writable directory.")
    if run.exists():
        if not overwrite:
            raise OutputError(
                f"the run directory {run} already exists; choose another output.name (--set output.name=...), "
                "or set output.overwrite = true to replace it."
            )
        if not (run / SPEC_JSON).exists() and any(run.iterdir()):
            raise OutputError(
                f"{run} exists and is not a kdgeo run directory (no {SPEC_JSON}); refusing to overwrite it. "
                "Choose another output.name."
            )
    return run


def truncate_lines(path: str | Path, keep: int) -> None:
    """Keep the first ``keep`` lines of a JSON-lines file (what existed at a checkpoint)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()[:keep]
    except FileNotFoundError:
        lines = []
    write_text_atomic(path, "".join(line if line.endswith("\n") else line + "\n" for line in lines))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable_dir(path: str | Path, setting: str, why: str) -> Path:
    """Create ``path`` if needed and prove a file can be made in it, before long work depends on it.

    ``os.access`` is not enough (read-only mounts, ACLs, root on a read-only filesystem): a real
    temporary file is created and removed.
    """
    where = Path(os.path.expanduser(str(path)))
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kdgeo-write-check.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"{setting} = '{where}' is not writable ({err.strerror or err}), and {why}. Set {setting} to a writable "
            "directory (or fix its permissions) before the run starts."
        ) from None
    return where
