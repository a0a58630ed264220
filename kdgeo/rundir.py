"""What goes on disk, and reading it back.

A run directory holds::

    run.json         the run-directory format version and the kdgeo that wrote it
    spec.toml        the resolved run spec (every default filled in)
    spec.json        the same, as JSON (what `kdgeo compare` reads)
    metrics.jsonl    one JSON object per logged step, monitor measurement and evaluation
    summary.json     final metrics, wall time, samples/s, versions, seed, layer pairs
    predictions.jsonl  the final evaluation, one JSON object per evaluated example (format:
                     :func:`read_predictions`), written by rank 0 just before summary.json
    student/         the trained student: save_pretrained (safetensors) + tokenizer
    checkpoint-N/    training state for --resume (see kdgeo.checkpoint)
    .kdgeo.lock      while a `kdgeo distill` writes here: its lock, naming it (see kdgeo.locks)

Files are written atomically (temporary file in the same directory, fsync, rename), so a
crash never leaves a half-written ``summary.json``; ``metrics.jsonl`` is appended a line at a
time and flushed.

Reading back: :func:`read_run` returns a :class:`RunDirectory` (spec.json as written, the
:class:`RunSummary` once the run has finished); `kdgeo eval` and `kdgeo compare` read runs only
through it. ``RunSummary(...).to_dict()`` is summary.json, key for key; ``RunSummary.from_dict``
reads run format 1 (keys an older run lacks read as absent) and refuses a newer format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kdgeo import files
from kdgeo.errors import KdgeoError, OutputError
from kdgeo.files import NAME_MAX_BYTES, describe_os_error, utf8_position

SPEC_TOML = "spec.toml"
SPEC_JSON = "spec.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_MARKER = "run.json"
STUDENT = "student"
PREDICTIONS = "predictions.jsonl"
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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status, read without changing it; elsewhere the only
    reader, os.umask, also writes it, so it is set to a stricter mask and restored at once, under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all (temporary file, fsync, rename), with the mode a plain ``open`` would
    give it: mkstemp creates 0600 whatever the umask, which would hide shared runs from their readers."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                with contextlib.suppress(OSError):  # filesystems without modes (some network mounts) keep theirs
                    os.fchmod(fh.fileno(), 0o666 & ~current_umask())
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as err:
        raise OutputError(
            f"cannot write {path}: {err.strerror or err}. Check the directory exists, is writable and has space."
        ) from None


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
        raise KdgeoError(
            f"{path} cannot be read as JSON: line {line}, column {column} is not UTF-8 text; restore the file."
        ) from None
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


# ---- predictions.jsonl: the final evaluation, example by example -------------------------------
#
# Seeds are few and expensive, evaluation examples many: the per-example records let `kdgeo compare`
# pair two runs example by example (paired bootstrap, McNemar), which a summary's mean cannot.

FIELD_SEPARATOR = "\x1f"
"""Joins an example's text fields before hashing (U+001F, the ASCII unit separator): no field a dataset
holds contains it in practice, so ("ab", "c") and ("a", "bc") hash differently."""


def text_sha256(fields: Sequence[str]) -> str:
    """sha256 hex of one example's text fields as read from the data (before any template, tokenizer or
    cut), UTF-8, joined by :data:`FIELD_SEPARATOR`: a classifier's text (and its pair text), a causal LM's
    instruction, context ("" when none) and reference response. Tokenizer-free, so two students with
    different tokenizers give the same hash for the same example."""
    return hashlib.sha256(FIELD_SEPARATOR.join(fields).encode("utf-8")).hexdigest()


def eval_sha256(examples: Iterable[tuple[str, str]]) -> str:
    """The content hash of an evaluation set, summary.json's ``data.eval_sha256``:

        sha256( concat_i  text_sha256_i + U+001F + target_i + "\\n" )

    over the evaluated examples in order, with target_i the label id (classification, as decimal text)
    or the sha256 hex of the reference response (causal LM). Runs that evaluate the same examples in the
    same order, with the same labels, share it whatever the student or its tokenizer; another
    max_eval_samples, split or file changes it (and so does a causal-LM example dropped for length)."""
    digest = hashlib.sha256()
    for text_hash, target in examples:
        digest.update(f"{text_hash}{FIELD_SEPARATOR}{target}\n".encode())
    return digest.hexdigest()


def write_predictions(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """predictions.jsonl, whole or not at all (:func:`write_text_atomic`; OutputError on OSError).
    NaN/inf are written as null, as everywhere in a run directory."""
    body = "".join(json.dumps(json_safe(dict(r)), ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, body)


def read_predictions(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The records of ``run_dir``/predictions.jsonl, in order; None when the run has none (a run from
    before kdgeo wrote them, or one still running).

    One JSON object per evaluated example, in evaluation order::

        classification: {"index": int, "text_sha256": str, "label": int, "prediction": int, "correct": bool}
        causal-lm:      {"index": int, "text_sha256": str, "rougeL": float|null, "nll": float|null, "tokens": int}

    ``index`` is the example's position in the evaluated set (after max_eval_samples; for causal LMs
    after examples that fit no tokenizer were dropped); ``text_sha256`` is :func:`text_sha256`. A
    classifier's accuracy is mean(correct). A causal LM's ``rougeL`` is the example's ROUGE-L F x 100
    (null when it was not generated for: beyond generate.max_samples, or an evaluation without
    generation), so the summary's rougeL is the mean of the non-null values; ``nll`` is the mean NLL
    per response token of that example (nats; null when it has no response token) over its
    ``tokens`` response tokens, so the summary's response_nll = sum(nll * tokens) / sum(tokens) and
    perplexity = exp(response_nll) (a token-level mean, see :func:`kdgeo.generation.response_nll`).

    Unlike metrics.jsonl the file is written atomically, so a line that is not a JSON object with an
    integer ``index`` and a string ``text_sha256`` (the keys records are paired by) means damage or a
    hand edit: a KdgeoError names the file and the line rather than pairing the wrong examples.
    """
    path = Path(os.path.expanduser(str(run_dir))) / PREDICTIONS
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise KdgeoError(f"{path} cannot be read: {describe_os_error(err, path)}.") from None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        reason = None
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            reason = "is not UTF-8 text"
        except json.JSONDecodeError as err:
            reason = f"is not JSON ({err.msg})"
        else:
            if not isinstance(record, dict):
                reason = f"holds a JSON {type(record).__name__}, not an object"
            elif as_int(record.get("index")) is None or not isinstance(record.get("text_sha256"), str):
                reason = 'lacks an integer "index" or a string "text_sha256"'
        if reason is not None:
            raise KdgeoError(
                f"{path}, line {number} {reason}: the file was damaged or edited by hand. Restore it, delete "
                f"{PREDICTIONS} to compare this run by its summary alone, or leave the run out."
            )
        records.append(record)
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
    path is made, since ``name`` may come from elsewhere (a run directory passed as SPEC). A
    directory holding only the run's lock file (:data:`kdgeo.locks.LOCK_NAME`, which
    :func:`kdgeo.distillation.run_distill` takes first, or one left by a killed run) is a new run's.
    """
    from kdgeo.locks import LOCK_NAME

    run = check_run_path(parent, name)
    held = {LOCK_NAME} if run.is_dir() and not run.is_symlink() else set()
    if run.exists() and (held == set() or _entries(run) != held):
        if not overwrite:
            raise OutputError(
                f"the run directory {run} already exists; choose another output.name (--set output.name=...), "
                "or set output.overwrite = true to replace it."
            )
        if not (run / SPEC_JSON).exists() and _entries(run) - held:
            raise OutputError(
                f"{run} exists and is not a kdgeo run directory (no {SPEC_JSON}); refusing to overwrite it. "
                "Choose another output.name."
            )
    return run


def _entries(run: Path) -> set[str]:
    try:
        return {entry.name for entry in run.iterdir()}
    except OSError:
        return {"?"}  # unreadable: not a new run's directory


def check_run_path(parent: str | Path, name: str) -> Path:
    """``parent/name`` when a run may be made there: one directory name, ``parent`` created and
    writable, no symbolic link leading outside it. Nothing is written inside the run directory."""
    problem = path_component_problem(name)
    if problem:
        raise OutputError(f"output.name: {problem}.")
    parent = Path(os.path.expanduser(str(parent)))
    run = parent / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"output.dir = '{parent}': cannot create it ({err.strerror or err}); set output.dir (or --out) to a "
            "writable directory."
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
        raise OutputError(
            f"output.dir = '{parent}' is not writable; set output.dir (or --out) to a writable directory."
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


def apply_umask(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` would have: safetensors (0.8) writes its files 0600 whatever the
    umask, which would hide a shared run's weights from the readers its other files allow."""
    with contextlib.suppress(OSError):  # filesystems without modes keep theirs
        os.chmod(path, 0o666 & ~current_umask())


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk before it is renamed into place (a rename is durable only after it)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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


# ---- reading a run back --------------------------------------------------------------------------
#
# summary.json and spec.json are read in one place, into types, so that `kdgeo eval` and
# `kdgeo compare` agree on what a run recorded and on what an absent key means.


class RunFileError(KdgeoError):
    """A file of a run directory is missing, unreadable, or not the JSON object it should be.

    ``reason`` is the problem alone (``"is not valid JSON (...)"``), so that a reader of many runs
    (`kdgeo compare`) can list every damaged file in one message.
    """

    def __init__(self, path: Path, reason: str, message: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            message or f"{path} {reason}: the run directory is damaged. Restore the file, or run the run again."
        )


def read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; RunFileError naming the file, the line and what is wrong otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RunFileError(path, f"cannot be read ({describe_os_error(err, path)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = utf8_position(raw, err)
        # The long form names the bad bytes and how to convert the file.
        try:
            files.decode_utf8(raw, f"{path} (the run directory is damaged)")
            message = None
        except KdgeoError as long_form:
            message = long_form.message
        raise RunFileError(path, f"is not UTF-8 text at line {line}, column {column}", message) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunFileError(path, f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise RunFileError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def as_int(value: object) -> int | None:
    """An integer as a hand-edited or older JSON file may hold it (``3``, ``3.0``, ``"3"``); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _number(value: object) -> float | int | None:
    """A JSON number as written (an int stays an int, so a summary reads back byte for byte)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _object(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _array(value: object) -> list[Any] | None:
    return value if isinstance(value, list) else None


_CLASSIFICATION_KEYS = ("text_column", "label_column")
_EVAL_SET_KEYS = ("eval_sha256", "eval_examples")
_CAUSAL_LM_KEYS = (
    "prompt_column",
    "response_column",
    "context_column",
    "max_prompt_length",
    "long_examples",
    "truncation",
)


@dataclass(frozen=True, kw_only=True)
class RunData:
    """summary.json's ``data``: the data a run trained and was evaluated on.

    The task's own settings are on :class:`ClassificationData` and :class:`CausalLMData`, so a
    summary holds the keys of its task and no others. A summary from before ``data`` was written
    has none (``RunSummary.data is None``); `kdgeo compare` then reads spec.json's.
    """

    dataset: str | None
    config: str | None
    train_split: str | None
    eval_split: str | None
    eval_dataset: str | None
    max_train_samples: int | None
    max_eval_samples: int | None
    eval_sha256: str | None = None
    """The content hash of the evaluated examples (:func:`eval_sha256`); None for a run from before it
    was recorded, and for a spec's data table."""
    eval_examples: int | None = None
    """How many examples the final evaluation scored (after max_eval_samples and any dropped for length)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: keys in declaration order (the order summary.json has always had), the task's
        own after the common ones, and the evaluation set's hash and size last; those two only when
        recorded, so an older run's summary reads back key for key."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _EVAL_SET_KEYS}
        out.update({k: v for k in _EVAL_SET_KEYS if (v := getattr(self, k)) is not None})
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RunData:
        """Read any ``data`` table (a summary's, or a spec's: unknown keys are ignored)."""
        common: dict[str, Any] = {
            "dataset": _text(data.get("dataset")),
            "config": _text(data.get("config")),
            "train_split": _text(data.get("train_split")),
            "eval_split": _text(data.get("eval_split")),
            "eval_dataset": _text(data.get("eval_dataset")),
            "max_train_samples": as_int(data.get("max_train_samples")),
            "max_eval_samples": as_int(data.get("max_eval_samples")),
            "eval_sha256": _text(data.get("eval_sha256")),
            "eval_examples": as_int(data.get("eval_examples")),
        }
        if any(key in data for key in _CAUSAL_LM_KEYS):
            return CausalLMData(
                **common,
                prompt_column=_text(data.get("prompt_column")),
                response_column=_text(data.get("response_column")),
                context_column=_text(data.get("context_column")),
                max_prompt_length=as_int(data.get("max_prompt_length")),
                long_examples=_text(data.get("long_examples")),
                truncation=_object(data.get("truncation")),
            )
        if any(key in data for key in _CLASSIFICATION_KEYS):
            return ClassificationData(
                **common, text_column=_text(data.get("text_column")), label_column=_text(data.get("label_column"))
            )
        return RunData(**common)


@dataclass(frozen=True, kw_only=True)
class ClassificationData(RunData):
    text_column: str | None
    label_column: str | None


@dataclass(frozen=True, kw_only=True)
class CausalLMData(RunData):
    prompt_column: str | None
    response_column: str | None
    context_column: str | None
    max_prompt_length: int | None
    """The prompt budget the run used (``data.max_prompt_length``, else half of ``data.max_length``)."""
    long_examples: str | None
    truncation: dict[str, Any] | None
    """What fitting prompts and examples cut or dropped: {"train": counts, "eval": counts}, counts
    keyed by the roles that share a tokenizer (``TextSplit.truncation``)."""


_OPTIONAL_SUMMARY_KEYS = (
    "processes",
    "distributed",
    "gather_features",
    "best_metric",
    "best_step",
    "best_score",
    "final_scores",
    "stopped_early",
    "on_policy",
    "sequence_kd",
    "variant_base",
    "swept",
)
"""Written only by a run under torchrun (the first three), with train.save_best (the next five), with
train.on_policy > 0 (``on_policy``), with train.sequence_kd (``sequence_kd``) or by a grid sweep (``variant_base``,
``swept``)."""


def loss_record(term: Any) -> dict[str, Any]:
    """A loss term (:class:`kdgeo.losses.LossTerm`) as summary.json records it: kind, weight and every option
    its ``[[losses]]`` kind has, under the spec's names, defaults filled in (kd: temperature, direction, mix;
    procrustes: form). The options come from the spec's loss classes, so a new option is recorded without an
    edit here; without them a run's summary could not tell T = 2 from T = 4, or forward from reverse KL."""
    from kdgeo.spec import LOSS_CLASSES

    record: dict[str, Any] = {"kind": term.kind, "weight": term.weight}
    for name in LOSS_CLASSES[term.kind].model_fields:
        if name == "beta" and term.beta is None:
            continue  # kd's beta exists for direction = "jsd" only; other runs' records stay as they were
        if name not in record:
            # the term stores procrustes' form as a flag (it selects the formula); the spec's value is the word
            record[name] = ("angular" if term.angular else "squared") if name == "form" else getattr(term, name)
    return record


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """summary.json: what a finished run did and measured. ``to_dict()`` is the file's JSON.

    The fields are the file's keys, in the file's order. ``None`` in a scalar field means the
    run did not record it (an older kdgeo, a hand-made file) unless the field says otherwise.
    """

    format_version: int
    name: str | None
    variant: str | None
    variant_base: str | None = None
    """A grid sweep's run only (so are the next): the variant the grid crossed (``kd-procrustes`` of
    ``kd-procrustes/weight=0.3``)."""
    swept: dict[str, Any] | None = None
    """The run's grid values by key as [sweep.grid] writes it, e.g. {"losses[2].weight": 0.3}."""
    data: RunData | None
    run_dir: str | None
    task: str | None
    seed: int | None
    teacher: str | None
    """teacher.model as the spec gives it."""
    teacher_path: str | None
    """Where the teacher was loaded from: teacher.model, or the fine-tuned copy in the teacher cache."""
    teacher_finetune: dict[str, Any] | None
    """{"cached", "path", "key", ...the fine-tune's own record}; None when the teacher was not fine-tuned."""
    student_init: str | None
    student_layers: int | None
    student_width: int | None
    student_widths: list[int]
    student_parameters: int | None
    teacher_parameters: int | None
    copied_teacher_layers: list[int] | None
    student_dir: str | None
    """None when output.save_student = false."""
    losses: list[dict[str, Any]]
    """One record per loss term, every parameter resolved (:func:`loss_record`): {"kind", "weight"} plus the
    kind's options, e.g. kd's temperature, direction and mix, procrustes' form (older runs: kind and weight)."""
    pairs: list[list[int]]
    """[student layer, teacher layer] per monitored pair."""
    rows: str | None
    label_names: list[str] | None
    """None for causal-lm runs."""
    steps: int | None
    epochs: float | None
    train_samples: int | None
    eval_samples: int | None
    scores: Mapping[str, float | None]
    """The student's final task scores (null: not finite)."""
    teacher_scores: Mapping[str, float | None]
    geometry: list[dict[str, Any]]
    """Final per-layer-pair geometry: {student, teacher, procrustes, cka, gram}."""
    skipped_steps_nonfinite: int
    skipped_steps_fp16_overflow: int
    resumed_from: str | None
    teacher_outputs: str | None
    """The teacher-output cache file the run read, when output.teacher_outputs = true."""
    wall_seconds: float | None
    train_seconds: float | None
    samples_per_s: float | None
    device: str | None
    precision: str | None
    versions: dict[str, str]
    processes: int | None = None
    """torchrun only: the world size."""
    distributed: str | None = None
    """torchrun only: "ddp" or "fsdp"."""
    gather_features: bool | None = None
    """torchrun only: train.gather_features."""
    best_metric: str | None = None
    """train.save_best only (so are the four below): the metric that chose the student."""
    best_step: int | None = None
    """The step of the best evaluation, whose student is ``student_dir`` and whose scores are ``scores``."""
    best_score: float | None = None
    """Its ``best_metric`` score (null: no evaluation gave a finite one, and the final student was kept)."""
    final_scores: Mapping[str, float | None] | None = None
    """The final student's scores (the last step's; equal to ``scores`` when the final evaluation was the best)."""
    stopped_early: bool | None = None
    """Whether train.early_stopping_patience ended training before its last step (``steps`` says where)."""
    on_policy: dict[str, Any] | None = None
    """train.on_policy > 0 only (:func:`kdgeo.on_policy.summary`): ``rate`` (lambda), ``micro_batches`` trained
    on the student's samples, ``generations`` (samples drawn by this process; rank 0's under torchrun),
    ``generated_tokens_mean``, ``hit_max_new_tokens`` (the share of samples without a stop token: cut at
    generate.max_new_tokens or data.max_length) and ``generation_seconds`` (sampling time, included in
    ``train_seconds``)."""
    sequence_kd: dict[str, Any] | None = None
    """train.sequence_kd only (:func:`kdgeo.sequence_kd.record`): the cache entry of the teacher's responses
    (``entry``: its key, ``path``), whether this run ``generated`` it (false: read from the cache) and in how
    many ``generation_seconds``, the ``decoding``, and ``examples``, ``empty_kept_reference`` (responses that
    were empty: the reference was kept), ``hit_token_limit`` (cut at the token limit) and
    ``generated_tokens_mean``."""

    def to_dict(self) -> dict[str, Any]:
        """The summary.json object, key for key and in order as kdgeo has always written it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL_SUMMARY_KEYS and value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, RunData) else value
        return out

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = SUMMARY) -> RunSummary:
        """Read run format 1 (``source`` names the file in errors).

        Keys an older run lacks read as None (containers as empty, skip counters as 0); values of
        the wrong JSON type read as absent; unknown keys are ignored. A newer format is refused:
        its keys may mean something else.
        """
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            from kdgeo import __version__

            raise KdgeoError(
                f"{source} is in run format {version!r}, and this kdgeo ({__version__}) reads format {FORMAT_VERSION}: "
                "the run was written by a newer kdgeo. Upgrade kdgeo (pip install -U kdgeo) to read it."
            )
        raw_data = _object(data.get("data"))
        widths = _array(data.get("student_widths")) or []
        return RunSummary(
            format_version=FORMAT_VERSION,
            name=_text(data.get("name")),
            variant=_text(data.get("variant")),
            variant_base=_text(data.get("variant_base")),
            swept=_object(data.get("swept")),
            data=RunData.from_dict(raw_data) if raw_data is not None else None,
            run_dir=_text(data.get("run_dir")),
            task=_text(data.get("task")),
            seed=as_int(data.get("seed")),
            teacher=_text(data.get("teacher")),
            teacher_path=_text(data.get("teacher_path")),
            teacher_finetune=_object(data.get("teacher_finetune")),
            student_init=_text(data.get("student_init")),
            student_layers=as_int(data.get("student_layers")),
            student_width=as_int(data.get("student_width")),
            student_widths=[w for w in widths if as_int(w) is not None],
            student_parameters=as_int(data.get("student_parameters")),
            teacher_parameters=as_int(data.get("teacher_parameters")),
            copied_teacher_layers=_array(data.get("copied_teacher_layers")),
            student_dir=_text(data.get("student_dir")),
            losses=[t for t in _array(data.get("losses")) or [] if isinstance(t, dict)],
            pairs=[p for p in _array(data.get("pairs")) or [] if isinstance(p, list)],
            rows=_text(data.get("rows")),
            label_names=[str(n) for n in labels] if (labels := _array(data.get("label_names"))) is not None else None,
            steps=as_int(data.get("steps")),
            epochs=_number(data.get("epochs")),
            train_samples=as_int(data.get("train_samples")),
            eval_samples=as_int(data.get("eval_samples")),
            scores={str(k): v for k, v in (_object(data.get("scores")) or {}).items()},
            teacher_scores={str(k): v for k, v in (_object(data.get("teacher_scores")) or {}).items()},
            geometry=[p for p in _array(data.get("geometry")) or [] if isinstance(p, dict)],
            skipped_steps_nonfinite=as_int(data.get("skipped_steps_nonfinite")) or 0,
            skipped_steps_fp16_overflow=as_int(data.get("skipped_steps_fp16_overflow")) or 0,
            resumed_from=_text(data.get("resumed_from")),
            teacher_outputs=_text(data.get("teacher_outputs")),
            wall_seconds=_number(data.get("wall_seconds")),
            train_seconds=_number(data.get("train_seconds")),
            samples_per_s=_number(data.get("samples_per_s")),
            device=_text(data.get("device")),
            precision=_text(data.get("precision")),
            versions={str(k): str(v) for k, v in (_object(data.get("versions")) or {}).items()},
            processes=as_int(data.get("processes")),
            distributed=_text(data.get("distributed")),
            gather_features=_flag(data.get("gather_features")),
            best_metric=_text(data.get("best_metric")),
            best_step=as_int(data.get("best_step")),
            best_score=_number(data.get("best_score")),
            final_scores=(
                {str(k): v for k, v in final.items()}
                if (final := _object(data.get("final_scores"))) is not None
                else None
            ),
            stopped_early=_flag(data.get("stopped_early")),
            sequence_kd=_object(data.get("sequence_kd")),
            on_policy=_object(data.get("on_policy")),
        )


@dataclass(frozen=True)
class RunDirectory:
    """A run directory read back once: its spec.json as written, and its summary when it has finished."""

    path: Path
    spec: dict[str, Any] = field(default_factory=dict)
    """spec.json as written (every field resolved; validate with kdgeo.spec.validate_spec where a
    RunSpec is needed). Empty when the file is absent or unreadable (see ``spec_problem``)."""
    summary: RunSummary | None = None
    """None while the run has not finished (or failed): there is no summary.json yet."""
    spec_problem: RunFileError | None = None
    """Why spec.json could not be read; raise it where the spec is needed, warn where it is not."""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def student_dir(self) -> Path:
        return self.path / STUDENT

    @property
    def variant(self) -> str:
        """The sweep variant; for a single run its name (summary first, then spec.json, then the directory name)."""
        s = self.summary
        for value in (s and s.variant, s and s.name, self.spec.get("variant"), self.spec.get("name")):
            if value:
                return str(value)
        return self.path.name

    @property
    def swept(self) -> dict[str, Any] | None:
        """A grid sweep's run: its grid values by key (summary first, then spec.json); None for other runs."""
        if self.summary is not None and self.summary.swept is not None:
            return self.summary.swept
        return _object(self.spec.get("swept"))

    @property
    def variant_base(self) -> str | None:
        """A grid sweep's run: the variant the grid crossed (recorded, else the variant up to its first ``/``)."""
        if self.swept is None:
            return None
        recorded = self.summary.variant_base if self.summary is not None else None
        return recorded or self.variant.partition("/")[0]

    @property
    def seed(self) -> int | None:
        if self.summary is not None and self.summary.seed is not None:
            return self.summary.seed
        return as_int(self.spec.get("seed"))

    @property
    def task(self) -> str | None:
        if self.summary is not None and self.summary.task is not None:
            return self.summary.task
        return _text(self.spec.get("task"))

    @property
    def data(self) -> RunData | None:
        """The summary's data table; for a summary that lacks one, spec.json's."""
        if self.summary is not None and self.summary.data is not None:
            return self.summary.data
        spec_data = _object(self.spec.get("data"))
        return RunData.from_dict(spec_data) if spec_data is not None else None

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records (a last line cut short by a crash is left out; see :func:`read_jsonl`)."""
        return [r for r in read_jsonl(self.path / METRICS) if isinstance(r, dict)]


def read_run(path: str | Path) -> RunDirectory:
    """Read the run directory at ``path``: spec.json, and summary.json when the run has finished.

    A damaged summary.json raises RunFileError (naming the file and the line); a damaged spec.json
    is kept as ``spec_problem``, since a finished run's summary holds what most readers need. A
    directory with neither file raises RunFileError: it is not a run directory.
    """
    run = Path(os.path.expanduser(str(path)))
    label = f"run directory '{path}'"
    spec_file, summary_file = run / SPEC_JSON, run / SUMMARY
    has_spec, has_summary = files.is_file(spec_file, label), files.is_file(summary_file, label)
    if not (has_spec or has_summary):
        raise RunFileError(
            run,
            f"is not a kdgeo run directory (it has no {SPEC_JSON} and no {SUMMARY})",
            f"{run} is not a kdgeo run directory (it has no {SPEC_JSON} and no {SUMMARY}); pass the directory "
            "`kdgeo distill` wrote (output.dir/output.name).",
        )
    spec: dict[str, Any] = {}
    problem: RunFileError | None = None
    if has_spec:
        try:
            spec = read_object(spec_file)
        except RunFileError as err:
            problem = err
    summary = RunSummary.from_dict(read_object(summary_file), str(summary_file)) if has_summary else None
    return RunDirectory(run, spec, summary, problem)
