"""The run specs shipped inside the package: examples.toml, its demo (the top level) and its presets.

The repository keeps one examples.toml, at its top level (the README's `kdgeo distill examples.toml` reads it
from a checkout); ``kdgeo/examples.toml`` is a symlink to it, listed as package data, so a wheel holds the
file's content and an installed kdgeo finds it with :mod:`importlib.resources` (no checkout needed). Where a
checkout has the link as a one-line text file (git with ``core.symlinks = false``, e.g. on Windows), the line is
followed to the top-level file.

`kdgeo distill` names a shipped spec without a path (:func:`resolve_spec_argument`): ``examples.toml`` when no
such file is in the directory, or a bare preset name (``demo``, ``glue-cola``). `kdgeo init` writes one out as a
commented, standalone spec (:func:`starter_spec`). No torch here.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdgeo.errors import KdgeoError, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

EXAMPLES = "examples.toml"


@dataclass(frozen=True)
class Preset:
    """A shipped spec: the demo (examples.toml's top level, ``preset`` None) or one of its ``[presets.NAME]``."""

    name: str
    description: str
    preset: str | None


def examples_path() -> Path:
    """The shipped examples.toml on disk (inside the installed package, or the checkout's through the link)."""
    resource = importlib.resources.files("kdgeo").joinpath(EXAMPLES)
    path = Path(str(resource))
    try:
        head = path.read_bytes()[:512]
    except OSError as err:
        raise KdgeoError(
            f"the shipped {EXAMPLES} cannot be read at {path} ({err.strerror or err}): this kdgeo is installed "
            'without its package data; reinstall it (pip install --force-reinstall "kdgeo[demo]").'
        ) from None
    target = head.decode("utf-8", "replace").strip()
    if target.endswith(EXAMPLES) and "\n" not in target and len(head) < 512:  # a symlink checked out as text
        return (path.parent / target).resolve()
    return path


@functools.lru_cache(maxsize=1)
def _examples_text() -> str:
    return examples_path().read_text(encoding="utf-8")


def load_examples() -> dict[str, Any]:
    """The shipped examples.toml as tables (a fresh copy each call: callers merge into it)."""
    return tomllib.loads(_examples_text())


def presets() -> list[Preset]:
    """The demo first, then every preset in file order, each with its description (inherited when it has none)."""
    raw = load_examples()
    top = str(raw.get("name", "demo"))
    found = [Preset(top, str(raw.get("description", "")), None)]
    for name, table in (raw.get("presets") or {}).items():
        described = table.get("description") if isinstance(table, dict) else None
        found.append(Preset(name, str(described or raw.get("description", "")), name))
    return found


def find(name: str) -> Preset | None:
    """The shipped spec called ``name`` (``demo`` or a preset name), else None."""
    return next((p for p in presets() if p.name == name), None)


@dataclass(frozen=True)
class SpecChoice:
    """What a SPEC argument of `kdgeo distill` means: a file, with the preset to merge, the overrides that come
    before the user's (a run directory's: where the run lives now), and a note to print when the file is the
    shipped one."""

    path: Path
    preset: str | None
    note: str | None = None
    overrides: tuple[str, ...] = ()


def resolve_spec_argument(argument: Path, preset: str | None) -> SpecChoice:
    """``argument`` when it exists; else the shipped examples.toml for ``examples.toml``, or a shipped preset for
    its bare name (``glue-cola``, no ``.toml``, no directory). Anything else is the "file not found" SpecError,
    listing the shipped names.

    An existing path always wins, so a user's own examples.toml or a run directory named ``demo`` is read as
    before; ``--preset`` with a preset name is refused (two presets), with ``demo`` it merges as usual. A run
    directory (one holding spec.toml) means its resolved spec, with the run where the directory is now.
    """
    if os.path.isdir(argument) and os.path.exists(argument / "spec.toml"):  # never raise: load_spec reports bad paths
        run_path = argument.resolve()
        where = (f"output.dir={json.dumps(str(run_path.parent))}", f"output.name={json.dumps(run_path.name)}")
        return SpecChoice(argument / "spec.toml", preset, overrides=where)
    try:
        os.lstat(argument)
        return SpecChoice(argument, preset)  # a dangling link is the user's file too: load_spec reports it
    except FileNotFoundError:
        pass
    except OSError:  # a name too long, no permission: load_spec says which
        return SpecChoice(argument, preset)
    if argument == Path(EXAMPLES):
        path = examples_path()
        return SpecChoice(path, preset, f"note: no {EXAMPLES} here; using the one shipped with kdgeo: {path}")
    name = str(argument)
    shipped = find(name) if argument.suffix != ".toml" and len(argument.parts) == 1 else None
    if shipped is None:
        names = [p.name for p in presets()]
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise SpecError(
            name,
            [
                (
                    "",
                    f"file not found; pass the path of a TOML run spec, or the name of a spec shipped with kdgeo: "
                    f"{', '.join(names)} ({hint}`kdgeo init --list` describes them); `kdgeo init` writes a "
                    "commented starter spec to edit",
                )
            ],
        )
    path = examples_path()
    if shipped.preset is None:
        return SpecChoice(path, preset, f"note: {name} is the shipped demo: {path}")
    if preset is not None:
        raise SpecError(
            name,
            [
                (
                    "",
                    f"names the shipped preset {name}, and --preset {preset} would merge a second one over the demo; "
                    f"give one: `kdgeo distill {name}` or `kdgeo distill {EXAMPLES} --preset {preset}`",
                )
            ],
        )
    return SpecChoice(path, shipped.preset, f"note: {name} is the shipped preset: {path} --preset {name}")


def starter_spec(preset: str | None, path: str = "run.toml") -> tuple[str, Preset]:
    """The demo, or ``preset`` merged over it, as a standalone commented TOML spec (no ``[presets]``) that
    validates; ``path`` is named in its header comment. Returns the text and what it was made from."""
    from kdgeo.spec import resolve_preset, validate_spec
    from kdgeo.spec_doc import commented_toml

    raw = load_examples()
    source = f"{EXAMPLES} (shipped with kdgeo)"
    chosen = find(preset) if preset is not None else presets()[0]
    if chosen is None:
        names = [p.name for p in presets()]
        near = difflib.get_close_matches(str(preset), names, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise SpecError(
            source, [("--preset", f"no shipped spec is called {preset!r} (there are: {', '.join(names)}){hint}")]
        )
    resolved = resolve_preset(raw, source, chosen.preset)
    validate_spec(resolved, source)
    origin = "the demo" if chosen.preset is None else f"the preset {chosen.name} merged over the demo"
    header = [
        f"A kdgeo run spec, written by `kdgeo init` from {EXAMPLES}: {origin}.",
        *([chosen.description] if chosen.description else []),
        "",
        f"Check it (trains nothing):  kdgeo distill {path} --dry-run",
        f"Run it:                     kdgeo distill {path}",
        f"Change a value for one run: kdgeo distill {path} --set train.epochs=1",
        "Every key, with its type, default and allowed values: kdgeo spec",
    ]
    return commented_toml(resolved, header), chosen
