"""kdgeo.locks: one writer per run directory and per cache entry, with real concurrent processes."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kdgeo import locks
from kdgeo.rundir import read_jsonl

from cli_helpers import REPO, run_cli, tiny_spec, write_spec

# ---- the lock itself ---------------------------------------------------------------------------


def test_a_lock_records_its_holder_refuses_a_second_taker_and_is_gone_after_release(tmp_path):
    path = tmp_path / "x.lock"
    lock = locks.try_lock(path, busy_retry=0.0)
    assert isinstance(lock, locks.Lock)
    other = locks.try_lock(path, busy_retry=0.0)  # another open file: flock refuses it, even in this process
    assert isinstance(other, locks.Holder)
    assert other.pid == os.getpid() and other.host == socket.gethostname() and other.started.endswith(" UTC")
    # this process's own command line (pytest, with whatever arguments it was given)
    assert other.command is not None and other.command.endswith(shlex.join(sys.argv[1:]))
    assert locks.holder_of(path) == other
    assert other.describe() == f"PID {os.getpid()} on host {socket.gethostname()}, started {other.started}"
    lock.release()
    assert not path.exists() and locks.holder_of(path) is None
    again = locks.try_lock(path, busy_retry=0.0)
    assert isinstance(again, locks.Lock)
    again.release()


def test_entry_locks_exclude_each_other_across_release_and_recreation(tmp_path):
    """Many takers in a tight loop: the holder deletes the file on release, so a waiter may lock a
    deleted file; it must notice and take the new one, or two would be inside at once."""
    path, inside, overlaps, rounds = tmp_path / ".entry.lock", [0], [], 40

    def worker() -> None:
        for _ in range(rounds):
            with locks.entry_lock(path, "the entry", lambda _m: None):
                inside[0] += 1
                if inside[0] != 1:
                    overlaps.append(inside[0])
                time.sleep(0.0005)
                inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert overlaps == [] and not path.exists()


def test_a_waiter_is_told_whom_it_waits_for(tmp_path):
    path, told = tmp_path / ".k.lock", []
    first = locks.try_lock(path, busy_retry=0.0)
    assert isinstance(first, locks.Lock)
    threading.Timer(0.6, first.release).start()
    with locks.entry_lock(path, "the cache entry K", told.append):
        pass
    assert len(told) == 1, told
    who = f"PID {os.getpid()} on host {socket.gethostname()}, started "
    assert told[0].startswith(f"waiting for another kdgeo process building the cache entry K ({who}")
    assert told[0].endswith(" UTC)")


# ---- two real `kdgeo distill` processes into one run directory ----------------------------------


GATED = r"""
import os, sys, time
from pathlib import Path
import kdgeo.teacher

prepare = kdgeo.teacher.prepare


def gated(*args, **kwargs):  # the run holds its lock in pre-flight until the test opens the gate
    while not Path(os.environ["GATE"]).exists():
        time.sleep(0.02)
    return prepare(*args, **kwargs)


kdgeo.teacher.prepare = gated
sys.argv[0] = "kdgeo"
from kdgeo.cli import main

main(sys.argv[1:])
"""


def test_a_second_run_into_a_run_directory_in_use_exits_2_naming_the_holder(tiny, tmp_path):
    """The first run takes the lock before it writes anything and holds it through pre-flight
    (held there by a gate until the others have tried); a second run, with or without
    output.overwrite, exits 2 naming it, and the first finishes whole."""
    steps = 6
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"max_steps": steps}))
    gate = tmp_path / "gate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "GATE": str(gate)}
    args = ["distill", str(path), "-q"]
    first = subprocess.Popen(
        [sys.executable, "-c", GATED, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    run = tmp_path / "runs" / "t"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and locks.run_holder(run) is None:
        time.sleep(0.02)
    holder = locks.run_holder(run)
    assert holder is not None and holder.pid == first.pid, first.communicate()
    assert holder.command == f"kdgeo distill {path} -q"
    seconds = [
        subprocess.Popen(
            [sys.executable, "-m", "kdgeo", *args, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for extra in ([], ["--set", "output.overwrite=true"])
    ]
    for proc in seconds:
        _, err = proc.communicate(timeout=300)
        flat = " ".join(err.split())
        assert proc.returncode == 2, err
        assert f"{run} is in use by another kdgeo run (PID {first.pid} on host {socket.gethostname()}, started " in flat
        assert "wait for it to finish, or give this run another output.name" in flat and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == [locks.LOCK_NAME]  # nothing of theirs got in
    gate.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["run_dir"] == str(run)
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["event"] for e in events].count("start") == 1
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, steps + 1))
    assert json.loads((run / "spec.json").read_text())["output"].get("overwrite") in (None, False)
    assert not (run / locks.LOCK_NAME).exists() and locks.run_holder(run) is None


def test_a_run_that_fails_its_preflight_leaves_no_directory_and_no_lock(tiny, tmp_path, capsys):
    spec = tiny_spec(tiny, tmp_path, teacher={"model": str(tmp_path / "no-such-teacher")})
    code, _, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "s.toml", spec)), "-q")
    assert code == 2, err
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_lock_left_by_a_killed_run_does_not_stop_the_next(tiny, tmp_path, capsys):
    """kill -9 leaves the file (with the dead holder's record) but not the lock."""
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / locks.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    path = write_spec(tmp_path / "s.toml", tiny_spec(tiny, tmp_path, train={"max_steps": 2}))
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    assert (run / "summary.json").exists() and not (run / locks.LOCK_NAME).exists()


def test_a_sweep_reports_a_locked_run_as_failed_and_runs_the_others(tiny, tmp_path, capsys):
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 2})
    spec["name"] = "sw"
    spec["sweep"] = {"seeds": [0, 1]}
    busy = tmp_path / "runs" / "sw" / "sw-seed1"
    busy.parent.mkdir(parents=True)
    held = locks.lock_run_dir(busy, str(busy), create=True)
    try:
        code, out, err = run_cli(capsys, "distill", str(write_spec(tmp_path / "sw.toml", spec)))
    finally:
        held.release()
    flat = " ".join((out + err).split())
    assert code != 0 and f"is in use by another kdgeo run (PID {os.getpid()}" in flat
    done = [p.name for p in (tmp_path / "runs" / "sw").iterdir() if (p / "summary.json").exists()]
    assert len(done) == 1 and not busy.exists()


# ---- caches: two runs that need one entry, one builds it ---------------------------------------


def _slowed(monkeypatch, module, name: str) -> None:
    """The build takes at least a second, so the other run surely arrives while it is under way."""
    original = getattr(module, name)

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)


def _two_runs_at_once(monkeypatch, module, name: str, spec: dict, tmp_path: Path) -> list[list[str]]:
    """Run two distills in threads (other output.names) whose first look at the cache (``module.name``)
    is made at the same moment; return each run's Stage messages."""
    from kdgeo.distillation import run_distill
    from kdgeo.events import Stage
    from kdgeo.spec import load_spec

    original, barrier, first_call = getattr(module, name), threading.Barrier(2, timeout=120), threading.local()

    def together(*args, **kwargs):
        if not getattr(first_call, "seen", False):
            first_call.seen = True
            barrier.wait()  # both runs have found the entry missing before either builds
            return original(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, together)
    stages: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            path = write_spec(tmp_path / f"s{k}.toml", {**spec, "output": {**spec["output"], "name": f"r{k}"}})
            run_distill(
                load_spec(path), progress=lambda e: stages[k].append(e.message) if isinstance(e, Stage) else None
            )
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    return stages


def test_two_runs_needing_one_teacher_output_entry_build_it_once(tiny, tmp_path, monkeypatch):
    from kdgeo import output_cache

    cache = tmp_path / "touts"
    spec = tiny_spec(
        tiny,
        tmp_path,
        losses=[{"kind": "ce"}, {"kind": "kd"}],
        train={"max_steps": 2},
        output={"teacher_outputs": True, "teacher_outputs_dir": str(cache)},
    )
    from kdgeo import teacher_outputs

    _slowed(monkeypatch, teacher_outputs, "_build")
    stages = _two_runs_at_once(monkeypatch, output_cache, "check_entry", spec, tmp_path)
    built = [k for k in (0, 1) if any(m.startswith("caching teacher outputs") for m in stages[k])]
    assert len(built) == 1, stages
    other = stages[1 - built[0]]
    waited = [m for m in other if m.startswith("waiting for another kdgeo process building the teacher-output cache")]
    assert len(waited) == 1 and f"(PID {os.getpid()} on host" in waited[0]
    assert any(m.startswith("teacher outputs read from the cache") for m in other)
    entries = [
        json.loads((tmp_path / "runs" / f"r{k}" / "summary.json").read_text())["teacher_outputs"] for k in (0, 1)
    ]
    assert entries[0] == entries[1] and sorted(p.name for p in cache.iterdir()) == [Path(entries[0]).name]


def test_two_runs_needing_one_fine_tuned_teacher_fine_tune_it_once(tiny, tmp_path, monkeypatch):
    from kdgeo import teacher

    spec = tiny_spec(
        tiny,
        tmp_path,
        teacher={"model": str(tiny["teacher"]), "finetune": {"epochs": 0.5, "batch_size": 16}},
        train={"max_steps": 1},
    )
    _slowed(monkeypatch, teacher, "finetune")
    stages = _two_runs_at_once(monkeypatch, teacher, "cached_teacher", spec, tmp_path)
    tuned = [k for k in (0, 1) if any(m.startswith("fine-tuning the teacher") for m in stages[k])]
    assert len(tuned) == 1, stages
    assert any(
        m.startswith("waiting for another kdgeo process building the fine-tuned teacher") for m in stages[1 - tuned[0]]
    )
    infos = [json.loads((tmp_path / "runs" / f"r{k}" / "summary.json").read_text())["teacher_finetune"] for k in (0, 1)]
    assert infos[tuned[0]]["cached"] is False and infos[1 - tuned[0]]["cached"] is True
    assert infos[0]["path"] == infos[1]["path"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(infos[0]["path"]).name]


# ---- readers: compare and eval on a run still being written -------------------------------------


def test_compare_and_eval_say_a_locked_run_is_still_running(tiny, tmp_path, capsys):
    spec = tiny_spec(tiny, tmp_path, train={"max_steps": 2})
    for name in ("a", "b"):
        code, _, err = run_cli(
            capsys, "distill", str(write_spec(tmp_path / "s.toml", spec)), "-q", "--set", f"output.name={name}"
        )
        assert code == 0, err
    runs = tmp_path / "runs"
    held = locks.lock_run_dir(runs / "b", "runs/b", create=False)  # as an overwriting run holds it: summary.json is old
    try:
        who = f"PID {os.getpid()} on host {socket.gethostname()}"
        code, out, err = run_cli(capsys, "compare", str(runs), "--metric", "accuracy")
        flat = " ".join(err.split())
        assert code == 0, err
        assert f"skipped {runs / 'b'} is still running (a kdgeo run holds it: {who}" in flat
        code, _, err = run_cli(capsys, "compare", str(runs / "b"))
        assert code == 2 and f"{runs / 'b'} is still running (a kdgeo run holds it: {who}" in " ".join(err.split())
        code, _, err = run_cli(capsys, "eval", str(runs / "b"))
        flat = " ".join(err.split())
        assert code == 2 and f"is still running (a kdgeo run holds it: {who}" in flat
        assert "Wait for the run to finish, then run kdgeo eval again" in flat and "Traceback" not in err
    finally:
        held.release()
    code, _, err = run_cli(capsys, "compare", str(runs / "b"), "--metric", "accuracy")
    assert code == 0, err


def test_a_waiter_can_give_up_on_a_signal(tmp_path):
    """``stop`` is asked at every poll (run_distill passes kdgeo.stopping.check): Ctrl-C ends the wait."""
    path = tmp_path / ".k.lock"
    first = locks.try_lock(path, busy_retry=0.0)
    assert isinstance(first, locks.Lock)

    def stop() -> None:
        raise KeyboardInterrupt

    try:
        with locks.entry_lock(path, "the entry", lambda _m: None, stop):
            raise AssertionError("took a lock that another holds")
    except KeyboardInterrupt:
        pass
    assert locks.holder_of(path).pid == os.getpid()
    first.release()
