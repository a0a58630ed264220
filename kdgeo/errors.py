"""The exceptions kdgeo turns into friendly messages.

Every error a user can cause (a bad spec, a missing model, an impossible layer map, a dataset
without the label column, ...) is raised as a :class:`KdgeoError`. The CLI catches exactly this
family, prints its message as one paragraph (no traceback) and exits with code 2. Anything
else is a bug in kdgeo and keeps its traceback.
"""

from __future__ import annotations


class KdgeoError(Exception):
    """A problem the user can fix. ``str(err)`` is the whole message."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message.strip()
        self.hint = hint.strip() if hint else None
        super().__init__(self.render())

    def render(self) -> str:
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class SpecError(KdgeoError):
    """The run spec (TOML file or ``--set`` overrides) is malformed or invalid.

    ``problems`` lists every problem found, each as ``(dotted.path, message)``.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the run spec:"]
        for path, msg in problems:
            lines.append(f"  - {path}: {msg}" if path else f"  - {msg}")
        super().__init__("\n".join(lines))


class ModelLoadError(KdgeoError):
    """A model or tokenizer cannot be found or loaded."""


class DataError(KdgeoError):
    """A dataset cannot be loaded or does not have what the run needs."""


class LayerMapError(KdgeoError):
    """A layer index or layer map is impossible for the models at hand."""


class TokenizerMismatchError(KdgeoError):
    """Teacher and student tokenizers split text differently where token-level rows need them to agree."""


class OutputError(KdgeoError):
    """An output path cannot be written."""


class RunInterrupted(KdgeoError):
    """SIGINT / SIGTERM in any phase of `distill` (:mod:`kdgeo.stopping`): what was kept is in the
    message; exit 130 or 143. ``next_step`` says what continues it: "resume" (the same command with
    ``--resume``: the run directory holds the run's spec), "rerun" (the same command: nothing of the
    run was written yet) or "nothing" (the run had finished)."""

    def __init__(self, message: str, exit_code: int, run_dir: str, step: int, next_step: str = "resume") -> None:
        self.exit_code = exit_code
        self.run_dir = run_dir
        self.step = step
        self.next_step = next_step
        super().__init__(message)
