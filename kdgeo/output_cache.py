"""Teacher-output cache: the frozen teacher's logits and features, computed once per sweep.

When the teacher is frozen and the inputs are deterministic, every run of a sweep would run the
same teacher forward on the same examples. Instead the first run writes, for every training
example, the teacher's logits and the paired layers' feature rows to disk, and every later run
reads them back. An entry lives at ``<root>/<key>/``::

    manifest.json            format version, key and key payload, n_examples, per-field layout
                             (width, dtype, shards with rows/bytes/sha256, offsets file), created,
                             complete; written last
    <field>.00000.bin ...    shards: the field's rows of consecutive examples, one flat
                             little-endian (rows_in_shard, width) array of float16, or of bfloat16
                             stored as its uint16 bit patterns (numpy has no bfloat16)
    <field>.offsets.i64      int64 little-endian, n_examples + 1 entries: example i is global rows
                             offsets[i]:offsets[i + 1] of the field, concatenated over its shards

Each field is *ragged*: example i has ``rows_i`` rows (its token count for token rows, 1 for
pooled rows or sequence-classification logits), and different fields may have different row
counts. An example is never split across shards; a shard is closed when the next example would
take it past ``shard_bytes`` (an example bigger than that gets a shard of its own).

Writing is incremental and in index order 0..n-1 (one example at a time, so the teacher's
outputs never have to fit in memory), hashed with sha256 as the bytes go out (no second read); the
hashes are recorded in the manifest for people and tools (``sha256sum``), while :func:`check_entry`
checks only what is cheap on every open (sizes and offsets: re-hashing would read the whole cache).
The entry is built in ``<root>/<key>.tmp-<pid>/`` and renamed into place by
:meth:`CacheWriter.commit`, so a crash or ``kill -9`` leaves no half entry; tmp directories
whose process is gone are removed by the next build. Reading goes through read-only
``numpy.memmap`` views, so opening a 100 GiB cache and reading a batch costs the batch.

The key is the sha256 of everything that determines the content (:func:`cache_key`); a manifest
written for another key or another format version is *stale*, a damaged one is *corrupt*
(:func:`check_entry`). Both are reasons to :func:`remove_entry` and rebuild, never to read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdgeo.errors import OutputError
from kdgeo.rundir import fsync_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 256 * 2**20
KEY_CHARS = 20
FP16_MAX = 65504.0
OFFSETS_SUFFIX = ".offsets.i64"

Status = Literal["ok", "missing", "corrupt", "stale"]

# name -> (torch dtype written, numpy dtype of the stored bits). Little-endian on disk whatever the host.
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
}
_DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_OFFSET_DTYPE = np.dtype("<i8")
# Keys and field names become file names: no separators, no dots in keys (so a key can never look
# like a "<key>.tmp-<pid>" build directory).
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_FIELD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_BUILD_DIR = re.compile(r"^(?P<key>[A-Za-z0-9_-]+)\.(?:tmp|trash)-(?P<pid>\d+)$")


# --------------------------------------------------------------------------------------------
# keys and sizes


def cache_key(payload: Mapping[str, Any], chars: int = KEY_CHARS, compact: bool = True) -> str:
    """First ``chars`` hex chars of sha256 over the canonical JSON (sorted keys; no spaces when
    ``compact``) of ``payload``: the one way kdgeo names a cache entry (the teacher-output cache
    here, the fine-tuned teacher cache in :func:`kdgeo.teacher.cache_key`, which keeps its
    16-char, spaced form so existing entries stay valid).

    ``payload`` must hold everything that determines the cached values: the teacher's
    fingerprint, the data's fingerprint, the tokenization, the feature settings (layers, rows)
    and the storage dtype. Values must be JSON types (``torch.dtype`` and paths are written as
    ``str``); anything else raises ``TypeError`` rather than hashing an address-bearing repr.
    """
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(payload, sort_keys=True, separators=separators, ensure_ascii=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    raise TypeError(
        f"cache_key: {type(value).__name__} is not JSON-serializable; pass plain values (str, int, float, bool, "
        "list, dict)"
    )


def estimate_bytes(
    rows_per_example: Sequence[int] | Mapping[str, Sequence[int]],
    widths: Mapping[str, int],
    dtype: torch.dtype | str = torch.float16,
) -> int:
    """Bytes the entry's shards and offsets files will take (the manifest adds a few KiB).

    ``rows_per_example`` is either one sequence used for every field, or a mapping from field
    name to its own sequence (e.g. token counts for a token-row layer, ``[1] * n`` for
    classification logits). Exact: ``sum_f rows_f * width_f * 2 + (n + 1) * 8`` per field.
    """
    itemsize = _DTYPES[_dtype_name(dtype)][1].itemsize
    if isinstance(rows_per_example, Mapping) and set(widths) - set(rows_per_example):
        raise ValueError(f"estimate_bytes: no row counts for fields {sorted(set(widths) - set(rows_per_example))}")
    total = 0
    for name, width in widths.items():
        rows = rows_per_example[name] if isinstance(rows_per_example, Mapping) else rows_per_example
        total += int(sum(int(r) for r in rows)) * int(width) * itemsize + (len(rows) + 1) * _OFFSET_DTYPE.itemsize
    return total


def format_bytes(n: int | float) -> str:
    """Binary-prefixed size for humans: ``512 B``, ``3.0 KiB``, ``1.4 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        # Move up a unit when rounding would print "1024.0 KiB".
        if round(value, 1) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# writing


class _FieldWriter:
    """One field's shards and offsets, written as examples arrive."""

    def __init__(
        self, directory: Path, name: str, width: int, n_examples: int, np_dtype: np.dtype, shard_bytes: int
    ) -> None:
        self.directory = directory
        self.name = name
        self.width = width
        self.np_dtype = np_dtype
        self.shard_bytes = shard_bytes
        self.offsets = np.zeros(n_examples + 1, dtype=_OFFSET_DTYPE)  # (n + 1,)
        self.shards: list[dict[str, Any]] = []
        self.offsets_record: dict[str, Any] = {}
        self._fh: Any = None
        self._hash: Any = None
        self._rows = 0
        self._bytes = 0

    def write(self, index: int, block: np.ndarray) -> None:
        """Append example ``index``'s ``block`` (rows, width), starting a new shard when this one is full."""
        rows = block.shape[0]
        self.offsets[index + 1] = self.offsets[index] + rows
        if rows == 0:
            return
        if self._fh is not None and self._bytes + block.nbytes > self.shard_bytes:
            self._close_shard()
        if self._fh is None:
            self._fh = open(self.directory / self._shard_name(len(self.shards)), "xb")
            self._hash = hashlib.sha256()
        data = block.data.cast("B")  # the array's bytes, no copy (`.data` is memoryview(block))
        self._fh.write(data)
        self._hash.update(data)
        self._rows += rows
        self._bytes += block.nbytes

    def finish(self) -> None:
        """Close the last shard and write the offsets file."""
        if self._fh is not None:
            self._close_shard()
        data = self.offsets.tobytes()
        path = self.directory / f"{self.name}{OFFSETS_SUFFIX}"
        with open(path, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.offsets_record = {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def close_quietly(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None

    def _shard_name(self, k: int) -> str:
        return f"{self.name}.{k:05d}.bin"

    def _close_shard(self) -> None:
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        self.shards.append(
            {"file": Path(fh.name).name, "rows": self._rows, "bytes": self._bytes, "sha256": self._hash.hexdigest()}
        )
        self._rows = self._bytes = 0


class CacheWriter:
    """Build one cache entry incrementally; use as a context manager.

    ::

        with CacheWriter(root, key, payload, {"logits": 2, "layer3": 384}, n_examples=len(ds)) as w:
            for i, example in enumerate(examples):            # in index order 0..n-1
                w.append(i, {"logits": ..., "layer3": ...})     # (rows_i, width) each
            path = w.commit()

    Examples must be appended in index order 0, 1, ..., n-1 (that is what makes the writing
    incremental). Leaving the ``with`` block through an exception (including Ctrl-C) deletes the
    build directory; leaving it without :meth:`commit` deletes it too and raises
    ``RuntimeError`` (a forgotten commit would silently cache nothing). ``setting`` names where
    the user chose ``root`` (e.g. ``"output.output_cache"``), for error messages.
    """

    def __init__(
        self,
        root: str | Path,
        key: str,
        payload: Mapping[str, Any],
        fields: Mapping[str, int],
        n_examples: int,
        dtype: torch.dtype | str = torch.float16,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        setting: str | None = None,
    ) -> None:
        _check_key(key)
        if cache_key(payload) != key:
            raise ValueError(
                f"key {key!r} is not cache_key(payload) = {cache_key(payload)!r}; pass the key made from this payload"
            )
        if not fields:
            raise ValueError("CacheWriter needs at least one field")
        for name, width in fields.items():
            if not _FIELD.match(name):
                raise ValueError(f"field name {name!r}: use letters, digits, '_' and '-' only (it becomes a file name)")
            if int(width) < 1:
                raise ValueError(f"field {name!r}: width must be >= 1, got {width}")
        if n_examples < 0:
            raise ValueError(f"n_examples must be >= 0, got {n_examples}")
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.root = Path(os.path.expanduser(str(root)))
        self.key = key
        self.payload = dict(payload)
        self.n_examples = int(n_examples)
        self.dtype = _dtype_name(dtype)
        self.setting = setting
        self.final = self.root / key
        self.tmp = self.root / f"{key}.tmp-{os.getpid()}"
        self._torch_dtype, np_dtype = _DTYPES[self.dtype]
        self._widths = {name: int(w) for name, w in fields.items()}
        self._next = 0
        self._state: Literal["open", "committed", "aborted"] = "open"
        self._fields: dict[str, _FieldWriter] = {}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            clean_stale_builds(self.root)
            if self.tmp.exists():  # left by this process (an earlier writer never closed); nobody else writes it
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as err:
            self._fail(err)
        self._fields = {
            name: _FieldWriter(self.tmp, name, width, self.n_examples, np_dtype, shard_bytes)
            for name, width in self._widths.items()
        }

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "open":
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError(f"CacheWriter for {self.final} left its with-block without commit(); nothing was cached")

    # -- writing -------------------------------------------------------------------------

    @property
    def written(self) -> int:
        """How many examples have been appended so far (the next index expected)."""
        return self._next

    def append(self, index: int, arrays: Mapping[str, Tensor]) -> None:
        """Write example ``index`` (must equal :attr:`written`): one (rows, width) tensor per field.

        Every field is converted and checked before any byte is written, so a rejected example
        leaves the writer as it was. Raises :class:`OutputError` when a finite value would
        become inf in the storage dtype (float16 tops out at 65504); non-finite inputs are
        stored as they are, so the cache stays a faithful stand-in for the teacher.
        """
        self._check_open()
        if index != self._next:
            raise ValueError(f"examples must be appended in index order: expected index {self._next}, got {index}")
        if index >= self.n_examples:
            raise ValueError(f"index {index} is past the last example ({self.n_examples} were declared)")
        missing = sorted(set(self._widths) - set(arrays))
        extra = sorted(set(arrays) - set(self._widths))
        if missing or extra:
            raise ValueError(
                f"example {index}: fields missing {missing}, unexpected {extra}; the writer has {sorted(self._widths)}"
            )
        blocks = {name: self._encode(name, index, arrays[name]) for name in self._widths}
        try:
            for name, block in blocks.items():
                self._fields[name].write(index, block)
        except OSError as err:
            self._fail(err)
        self._next += 1

    def commit(self) -> Path:
        """Close the shards, write offsets and manifest, fsync, and rename the entry into place.

        Returns ``<root>/<key>``. An existing entry with the same key (a corrupt or stale one
        being rebuilt, or a concurrent build that finished first) is replaced.
        """
        self._check_open()
        if self._next != self.n_examples:
            raise ValueError(f"commit() after {self._next} of {self.n_examples} examples; append every example first")
        trash = self.root / f"{self.key}.trash-{os.getpid()}"
        try:
            for field in self._fields.values():
                field.finish()
            manifest = self._manifest()
            with open(self.tmp / MANIFEST, "x", encoding="utf-8") as fh:
                fh.write(json.dumps(manifest, indent=1) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self.tmp)
            if self.final.exists():
                # os.replace cannot overwrite a non-empty directory: move the old one aside first.
                # A reader that has it open keeps its memmaps (unlinked files stay mapped).
                os.replace(self.final, trash)
            os.replace(self.tmp, self.final)
            fsync_dir(self.root)
        except OSError as err:
            if trash.exists() and not self.final.exists():
                try:  # put the entry we were replacing back; it is no worse than before this build
                    os.replace(trash, self.final)
                except OSError:
                    pass
            self._fail(err)
        shutil.rmtree(trash, ignore_errors=True)
        self._state = "committed"
        return self.final

    def abort(self) -> None:
        """Stop and delete the build directory (idempotent; nothing of this build remains)."""
        for field in self._fields.values():
            field.close_quietly()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._state == "open":
            self._state = "aborted"

    # -- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"CacheWriter for {self.final} is already {self._state}")

    def _encode(self, name: str, index: int, value: Tensor) -> np.ndarray:
        """The storage bits of one example's field: (rows, width) array of float16 or uint16 (bfloat16)."""
        width = self._widths[name]
        tensor = torch.as_tensor(value).detach()
        if tensor.ndim != 2 or tensor.shape[1] != width:
            raise ValueError(
                f"example {index}, field {name!r}: expected a (rows, {width}) tensor, got shape {tuple(tensor.shape)}"
            )
        tensor = tensor.to("cpu")
        stored = tensor.to(self._torch_dtype).contiguous()  # (rows, width)
        overflow = torch.isinf(stored) & torch.isfinite(tensor)  # (rows, width)
        if bool(overflow.any()):
            raise OutputError(self._overflow_message(name, index, float(tensor[overflow].abs().max())))
        if self.dtype == "bfloat16":
            # numpy has no bfloat16: keep the 16 bits as uint16 (reinterpreted, not converted).
            return stored.view(torch.int16).numpy().view(_DTYPES["bfloat16"][1])  # (rows, width)
        return stored.numpy().astype(_DTYPES["float16"][1], copy=False)  # (rows, width)

    def _overflow_message(self, name: str, index: int, largest: float) -> str:
        if self.dtype == "float16":
            return (
                f"the teacher-output cache cannot store field {name!r} of example {index} in float16: it holds "
                f"values up to {largest:.6g} in magnitude, beyond float16's largest finite value {FP16_MAX:g}, and "
                "they would be stored as inf. Build the cache in bfloat16 instead: the same 2 bytes per value with "
                "float32's range, at 8 significant bits instead of 11 (the cache key includes the dtype, so this "
                "makes a new entry)."
            )
        return (
            f"the teacher-output cache cannot store field {name!r} of example {index} in bfloat16: it holds values "
            f"up to {largest:.6g} in magnitude, beyond bfloat16's range (about 3.39e38), so they would be stored as "
            "inf. The teacher's outputs are numerically broken; check the teacher (run it in float32) before "
            "caching."
        )

    def _manifest(self) -> dict[str, Any]:
        fields = {}
        for name, field in self._fields.items():
            fields[name] = {
                "width": field.width,
                "dtype": self.dtype,
                "rows": int(field.offsets[-1]),
                "shards": field.shards,
                "offsets_file": field.offsets_record["file"],
                "offsets_bytes": field.offsets_record["bytes"],
                "offsets_sha256": field.offsets_record["sha256"],
            }
        total = sum(f["offsets_bytes"] + sum(s["bytes"] for s in f["shards"]) for f in fields.values())
        return {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "payload": self.payload,
            "n_examples": self.n_examples,
            "dtype": self.dtype,
            "bytes": total,
            "fields": fields,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": True,
        }

    def _fail(self, err: OSError) -> None:
        """Delete the build directory and turn an OSError into an OutputError that says what to do."""
        self.abort()
        self._state = "aborted"
        reason = err.strerror or str(err)
        where = f"{self.setting} = '{self.root}'" if self.setting else f"{self.root}"
        choose = f"set {self.setting} to" if self.setting else "choose"
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            written = sum(s["bytes"] for f in self._fields.values() for s in f.shards) + sum(
                f._bytes for f in self._fields.values()
            )
            fix = (
                f"The disk is full (or a quota or file-size limit was hit) after {format_bytes(written)} of this "
                f"entry; free some space or {choose} a directory on a disk with room. Nothing of this entry was kept."
            )
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"It is not writable; {choose} a writable directory. Nothing of this entry was kept."
        else:
            fix = (
                f"{choose[0].upper()}{choose[1:]} a writable directory with free space. Nothing of this entry was kept."
            )
        raise OutputError(
            f"{where}: cannot write the teacher-output cache entry {self.key} ({reason}). {fix}"
        ) from None


def clean_stale_builds(root: str | Path) -> list[Path]:
    """Delete ``<key>.tmp-<pid>`` / ``<key>.trash-<pid>`` directories whose process is gone.

    Called by every :class:`CacheWriter`. The process check is per host: do not share one cache
    directory between machines that build at the same time.
    """
    root = Path(root)
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        match = _BUILD_DIR.match(child.name)
        if match and child.is_dir() and not _pid_alive(int(match.group("pid"))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


# --------------------------------------------------------------------------------------------
# checking and reading


def check_entry(root: str | Path, key: str) -> tuple[Status, str]:
    """Whether ``<root>/<key>`` can be read, as ``(status, reason)``.

    status is ``"ok"``, ``"missing"`` (no entry), ``"corrupt"`` (manifest unreadable or
    incomplete, a shard or offsets file missing or of the wrong size, offsets that disagree with
    the shards) or ``"stale"`` (the manifest was written for another key or another cache format).
    Cheap: sizes and offsets only, no shard is read (a byte changed in place goes unseen; the
    manifest's sha256 of each file is there to check by hand).
    """
    status, reason, _, _ = _check(Path(os.path.expanduser(str(root))), key)
    return status, reason


class CacheEntryError(OutputError):
    """An entry exists but is corrupt or stale; ``status`` and ``reason`` say why."""

    def __init__(self, path: Path, status: Status, reason: str) -> None:
        self.path = path
        self.status = status
        self.reason = reason
        super().__init__(
            f"the teacher-output cache entry {path} is {status}: {reason}. Delete that directory and the next run "
            "rebuilds it."
        )


def open_entry(root: str | Path, key: str) -> CacheReader | None:
    """A reader for ``<root>/<key>``, or ``None`` when there is no entry.

    Raises :class:`CacheEntryError` (an :class:`OutputError`) when the entry is corrupt or
    stale; call :func:`check_entry` first to decide to :func:`remove_entry` and rebuild instead.
    """
    path = Path(os.path.expanduser(str(root))) / key
    status, reason, manifest, offsets = _check(path.parent, key)
    if status == "missing":
        return None
    if status != "ok":
        raise CacheEntryError(path, status, reason)
    # _check returns both whenever the status is "ok"
    assert manifest is not None and offsets is not None
    return CacheReader(path, manifest, offsets)


def remove_entry(root: str | Path, key: str) -> bool:
    """Delete ``<root>/<key>``; True when there was something to delete."""
    _check_key(key)
    path = Path(os.path.expanduser(str(root))) / key
    if not os.path.lexists(path):
        return False
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as err:
        raise OutputError(
            f"cannot delete the teacher-output cache entry {path} ({err.strerror or err}); delete it by hand."
        ) from None
    return True


class CacheReader:
    """Read-only access to one committed entry. Rows come back as float32 torch tensors.

    Shards are opened lazily as read-only ``numpy.memmap`` views; each read copies only the
    requested rows, so memory stays flat however large the cache. Offsets (8 bytes per example
    per field) are held in memory.
    """

    def __init__(self, path: Path, manifest: Mapping[str, Any], offsets: Mapping[str, np.ndarray]) -> None:
        self.path = path
        self.manifest = dict(manifest)
        self.key: str = manifest["key"]
        self.payload: dict[str, Any] = manifest["payload"]
        self.n_examples: int = int(manifest["n_examples"])
        self.dtype: str = manifest["dtype"]
        self.fields: dict[str, int] = {name: int(f["width"]) for name, f in manifest["fields"].items()}
        """Field name -> width."""
        self._np_dtype = _DTYPES[self.dtype][1]
        self._offsets = dict(offsets)  # name -> (n + 1,) int64
        self._shard_files = {name: [path / s["file"] for s in f["shards"]] for name, f in manifest["fields"].items()}
        self._shard_rows = {name: [int(s["rows"]) for s in f["shards"]] for name, f in manifest["fields"].items()}
        # Global row where each shard starts. Examples never straddle shards, so one lookup finds an example.
        self._shard_starts = {
            name: np.cumsum([0, *rows[:-1]], dtype=np.int64) for name, rows in self._shard_rows.items()
        }  # (n_shards,)
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A pickled np.memmap carries its whole contents; DataLoader workers (spawn) reopen the maps instead.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory maps (they are also released when the reader is garbage-collected)."""
        self._maps.clear()

    def row_counts(self, name: str) -> np.ndarray:
        """(n_examples,) rows of each example in field ``name``."""
        return np.diff(self._field_offsets(name))

    def rows(self, name: str, i: int) -> Tensor:
        """Example ``i``'s rows of field ``name``: (rows_i, width) float32."""
        offsets = self._field_offsets(name)
        if not 0 <= i < self.n_examples:
            raise IndexError(f"example {i} is out of range for a cache of {self.n_examples} examples")
        start, stop = int(offsets[i]), int(offsets[i + 1])
        width = self.fields[name]
        if stop == start:
            return torch.zeros(0, width)  # (0, width)
        k = int(np.searchsorted(self._shard_starts[name], start, side="right")) - 1
        local = start - int(self._shard_starts[name][k])
        block = np.array(
            self._map(name, k)[local : local + stop - start]
        )  # (rows_i, width), a copy: the map is read-only
        if self.dtype == "bfloat16":
            return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16).float()  # (rows_i, width)
        return torch.from_numpy(block).float()  # (rows_i, width)

    def batch(self, name: str, indices: Sequence[int]) -> list[Tensor]:
        """``[rows(name, i) for i in indices]``: B tensors of (rows_i, width) float32."""
        return [self.rows(name, int(i)) for i in indices]

    def _field_offsets(self, name: str) -> np.ndarray:
        if name not in self.fields:
            raise KeyError(f"the cache has no field {name!r}; it has {sorted(self.fields)}")
        return self._offsets[name]

    def _map(self, name: str, k: int) -> np.memmap:
        mm = self._maps.get((name, k))
        if mm is None:
            shape = (self._shard_rows[name][k], self.fields[name])
            mm = np.memmap(
                self._shard_files[name][k], dtype=self._np_dtype, mode="r", shape=shape
            )  # (rows_in_shard, width)
            self._maps[(name, k)] = mm
        return mm


# --------------------------------------------------------------------------------------------
# helpers


def _check(root: Path, key: str) -> tuple[Status, str, dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """check_entry, also returning the manifest and offsets it read (for open_entry)."""
    _check_key(key)
    entry = root / key
    if not entry.exists():
        return "missing", f"no entry {entry}", None, None
    if not entry.is_dir():
        return "corrupt", f"{entry} is not a directory", None, None
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "corrupt", f"{MANIFEST} is missing (the entry was not written by a completed build)", None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return "corrupt", f"{MANIFEST} cannot be read ({err})", None, None
    if not isinstance(manifest, dict):
        return "corrupt", f"{MANIFEST} is not a JSON object", None, None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        return (
            "stale",
            f"it was written in cache format {version!r}; this kdgeo reads format {FORMAT_VERSION}",
            None,
            None,
        )
    if manifest.get("key") != key:
        return (
            "stale",
            f"its manifest is for key {manifest.get('key')!r}, not {key!r} (the directory was renamed or copied)",
            None,
            None,
        )
    try:
        if cache_key(manifest["payload"]) != key:
            return (
                "stale",
                f"its key payload hashes to {cache_key(manifest['payload'])!r}, not {key!r} (the manifest was edited)",
                None,
                None,
            )
        if manifest.get("complete") is not True:
            return "corrupt", f"{MANIFEST} does not mark the entry complete", None, None
        problem, offsets = _check_fields(entry, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return "corrupt", f"{MANIFEST} is malformed ({type(err).__name__}: {err})", None, None
    if problem:
        return "corrupt", problem, None, None
    checked = f"{manifest['n_examples']} examples, {', '.join(manifest['fields'])}; sizes and offsets checked"
    return "ok", checked, manifest, offsets


def _check_fields(entry: Path, manifest: Mapping[str, Any]) -> tuple[str | None, dict[str, np.ndarray]]:
    """The first problem with the files the manifest lists (or None), and each field's offsets."""
    n = manifest["n_examples"]
    dtype = manifest["dtype"]
    if not isinstance(n, int) or n < 0:
        return f"n_examples is {n!r}", {}
    if dtype not in _DTYPES:
        return f"unknown dtype {dtype!r}", {}
    if not isinstance(manifest["fields"], dict) or not manifest["fields"]:
        return "the manifest lists no fields", {}
    itemsize = _DTYPES[dtype][1].itemsize
    all_offsets = {}
    for name, field in manifest["fields"].items():
        width = field["width"]
        if not isinstance(width, int) or width < 1 or field["dtype"] != dtype:
            return f"field {name!r} has width {width!r} and dtype {field['dtype']!r}", {}
        shard_rows = []
        for shard in field["shards"]:
            path, problem = _listed_file(entry, shard["file"], shard["bytes"])
            if problem:
                return f"field {name!r}: {problem}", {}
            if shard["bytes"] != shard["rows"] * width * itemsize:
                return (
                    f"field {name!r}: shard {shard['file']} lists {shard['rows']} rows of width {width} but "
                    f"{shard['bytes']} bytes",
                    {},
                )
            shard_rows.append(int(shard["rows"]))
        path, problem = _listed_file(entry, field["offsets_file"], field["offsets_bytes"])
        if problem:
            return f"field {name!r}: {problem}", {}
        if field["offsets_bytes"] != (n + 1) * _OFFSET_DTYPE.itemsize:
            return (
                f"field {name!r}: the offsets file has {field['offsets_bytes']} bytes, not (n_examples + 1) * 8 = "
                f"{(n + 1) * 8}",
                {},
            )
        offsets = np.fromfile(path, dtype=_OFFSET_DTYPE)  # (n + 1,)
        starts = np.cumsum([0, *shard_rows])  # (n_shards + 1,)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != starts[-1]:
            return f"field {name!r}: the offsets do not run from 0 up to the shards' {int(starts[-1])} rows", {}
        if not np.all(np.isin(starts, offsets)):
            return f"field {name!r}: a shard boundary falls inside an example", {}
        all_offsets[name] = offsets
    return None, all_offsets


def _listed_file(entry: Path, name: Any, size: Any) -> tuple[Path, str | None]:
    """Check one file the manifest lists: a plain name inside the entry, present, of the listed size."""
    if not isinstance(name, str) or Path(name).name != name or not _FIELD.match(name.split(".", 1)[0]):
        return entry, f"the manifest lists an invalid file name {name!r}"
    path = entry / name
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return path, f"{name} is missing"
    except OSError as err:
        return path, f"{name} cannot be read ({err.strerror or err})"
    if actual != size:
        return path, f"{name} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
    return path, None


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).lower()
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"the teacher-output cache stores float16 or bfloat16, not {dtype!r}")
    return _DTYPE_ALIASES[name]


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"cache key {key!r}: use letters, digits, '_' and '-' only (cache_key() makes one)")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True
