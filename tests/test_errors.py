"""kdgeo.errors: what a user-fixable error says, and the exit code the CLI gives it."""

from __future__ import annotations

import pytest

from kdgeo import errors
from kdgeo.errors import KdgeoError, RunInterrupted, SpecError


def test_the_message_is_the_whole_text_with_its_hint_on_the_next_line():
    plain = KdgeoError("  the file is missing.\n")
    assert str(plain) == plain.message == "the file is missing." and plain.hint is None
    hinted = KdgeoError("the file is missing.", hint="  Give --data.  ")
    assert str(hinted) == "the file is missing.\nGive --data." and hinted.hint == "Give --data."


def test_a_spec_error_lists_every_problem_under_its_dotted_path():
    one = SpecError("run.toml", [("train.lr", "must be > 0")])
    assert str(one) == "run.toml: 1 problem in the run spec:\n  - train.lr: must be > 0"
    two = SpecError("run.toml", [("train.lr", "must be > 0"), ("", "unknown section [trian]")])
    assert str(two).splitlines() == [
        "run.toml: 2 problems in the run spec:", "  - train.lr: must be > 0", "  - unknown section [trian]",
    ]
    assert two.problems[0] == ("train.lr", "must be > 0") and two.source == "run.toml"


@pytest.mark.parametrize("name", [n for n in dir(errors) if n.endswith("Error")])
def test_every_user_error_is_a_kdgeo_error_that_exits_2(name):
    """The CLI catches exactly KdgeoError and exits with its exit_code: 2 for everything a user can fix."""
    cls = getattr(errors, name)
    assert issubclass(cls, KdgeoError) and cls.exit_code == 2


def test_an_interrupt_exits_with_the_signals_shell_code():
    err = RunInterrupted("stopped at step 7; checkpoint written.", exit_code=130, run_dir="runs/t", step=7)
    assert isinstance(err, KdgeoError) and (err.exit_code, err.run_dir, err.step) == (130, "runs/t", 7)
    assert KdgeoError.exit_code == 2  # the instance's code does not leak into the class
