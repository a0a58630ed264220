"""train.sequence_kd: training on the teacher's generated responses (Kim & Rush 2016), cached per example."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, tiny_lm_spec, tiny_spec, write_spec
from kdgeo import generation, lm_data, output_cache, sequence_kd
from kdgeo.rundir import read_jsonl

SHORT = {"template": "Q: {prompt}\nA:", "context_template": "Q: {prompt}\nC: {context}\nA:"}
CPU = torch.device("cpu")


def _spec(tiny_lm, tmp_path: Path, **sections) -> dict:
    """8 training prompts (batches of 4), 4 evaluation examples, 8 new tokens, sequence_kd on; ``sections`` merge
    table by table."""
    base = tiny_lm_spec(tiny_lm, tmp_path)
    spec = tiny_lm_spec(
        tiny_lm, tmp_path,
        data={**base["data"], **SHORT, "max_train_samples": 8, "max_eval_samples": 4},
        train={"sequence_kd": True, "max_steps": 2, "batch_size": 4},
        generate={"max_new_tokens": 8, "batch_size": 4},
        monitor={"every": 0, "samples": 4},
        output={**base["output"], "teacher_outputs_dir": str(tmp_path / "outputs")},
    )
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return spec


def _plan(tiny_lm, tmp_path: Path, **sections):
    from kdgeo.plan import make_plan
    from kdgeo.spec import load_spec

    name = f"spec-{len(list(tmp_path.glob('spec-*')))}.toml"
    path = write_spec(tmp_path / name, _spec(tiny_lm, tmp_path, **sections))
    return make_plan(load_spec(path), 1, False, lambda e: None)


def _key(plan, precision: str = "fp32", finetune: str | None = None) -> str:
    return output_cache.cache_key(sequence_kd.entry_payload(plan, precision, finetune))


def _ensure(plan, teacher, root: Path, events: list | None = None) -> sequence_kd.Generations:
    emit = (lambda e: events.append(e)) if events is not None else (lambda e: None)
    return sequence_kd.ensure(
        root, sequence_kd.entry_payload(plan, "fp32", None), teacher, plan.t_tok, plan.train,
        sequence_kd.Decoding.of(plan.generation), int(plan.data["max_length"]), CPU, None, emit,
    )


@pytest.fixture(scope="module")
def opt_teacher(tiny_lm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm["opt_teacher"]).eval()


# ---- the training split --------------------------------------------------------------------------------------


def test_training_responses_are_the_teachers_greedy_continuation(tiny_lm, opt_teacher, tmp_path):
    """Each training response is what generating from its prompt alone gives (+ eos where it ended); prompts,
    the examples kept and the evaluation split are unchanged; a second call reads the entry back."""
    plan = _plan(tiny_lm, tmp_path)
    events: list = []
    gens = _ensure(plan, opt_teacher, tmp_path / "outputs" / "sequence-kd", events)
    assert gens.generated and (gens.path / "manifest.json").exists()
    assert any("generating the teacher's responses to 8 training prompts (greedy" in e.message for e in events)
    assert any("8 of 8 responses generated" in e.message for e in events)
    tokenizers = {"student": plan.s_tok, "teacher": plan.t_tok}
    new = sequence_kd.apply(plan.train, gens, tokenizers, 96, pair_tokens=True)
    pad, eos = sequence_kd.pad_and_eos(plan.t_tok)
    old = plan.train.encodings["teacher"]
    assert new.encodings["student"] is new.encodings["teacher"]  # one tokenizer: one encoding, as before
    for k, prompt in enumerate(lm_data.prompt_ids(old)):
        limit = min(8, 96 - len(prompt))
        alone = generation.generate(opt_teacher, pad, eos, [prompt], limit, 1, CPU)[0]
        assert alone, "the tiny teacher should say something"
        enc = new.encodings["teacher"]
        assert enc.input_ids[k][: enc.response_start[k]] == prompt
        assert enc.input_ids[k][enc.response_start[k]:] == alone + ([eos] if len(alone) < limit else [])
    assert len(new) == len(plan.train) and new.texts == plan.train.texts
    assert new.responses == [plan.t_tok.decode(t, skip_special_tokens=True) for t in gens.tokens]
    assert plan.train.encodings["teacher"] is old  # the plan's split is not changed in place
    again = _ensure(plan, opt_teacher, tmp_path / "outputs" / "sequence-kd")
    assert not again.generated and again.tokens == gens.tokens and again.stopped == gens.stopped


def test_sampled_responses_depend_on_the_seed_and_example_not_the_batch_size(tiny_lm, opt_teacher, tmp_path):
    """generate.do_sample: example i draws from its own generator seeded by (run seed, i), so the entry equals
    sampling the prompts one at a time with kdgeo.generation.generate."""
    plan = _plan(tiny_lm, tmp_path, generate={"do_sample": True, "temperature": 1.5}, seed=7)
    gens = _ensure(plan, opt_teacher, tmp_path / "outputs" / "sequence-kd")
    prompts = lm_data.prompt_ids(plan.train.encodings["teacher"])
    pad, eos = sequence_kd.pad_and_eos(plan.t_tok)
    assert all(len(p) + 8 <= 96 for p in prompts)  # every limit is generate.max_new_tokens
    alone = generation.generate(
        opt_teacher, pad, eos, prompts, 8, 1, CPU, do_sample=True, temperature=1.5, top_p=1.0, seed=7
    )
    assert gens.tokens == alone
    greedy = generation.generate(opt_teacher, pad, eos, prompts, 8, 4, CPU)
    assert gens.tokens != greedy


def test_empty_responses_keep_the_reference_and_ended_ones_get_eos(tiny_lm, tmp_path):
    """Fabricated generations: an empty one keeps the reference (counted), an ended one gets eos, one at the token
    limit does not, a long one is cut to data.max_length; a student with another vocabulary re-tokenizes the text."""
    plan = _plan(tiny_lm, tmp_path)
    n, eos = len(plan.train), plan.t_tok.eos_token_id
    words = plan.t_tok(" a dog is an animal", add_special_tokens=False)["input_ids"]
    tokens = [[], words, words, words * 40] + [words[:2]] * (n - 4)
    stopped = [True, True, False, False] + [True] * (n - 4)
    gens = sequence_kd.Generations("k", tmp_path, tokens, stopped, generated=False, seconds=0.0)
    new = sequence_kd.apply(plan.train, gens, {"student": plan.s_tok, "teacher": plan.t_tok}, 96, pair_tokens=True)
    ref, enc = plan.train.encodings["teacher"], new.encodings["teacher"]
    responses = lm_data.response_ids(enc)
    assert enc.input_ids[0] == ref.input_ids[0] and new.responses[0] == plan.train.responses[0]
    assert responses[1] == words + [eos]
    assert responses[2] == words
    assert len(enc.input_ids[3]) == 96 and responses[3] == (words * 40)[: 96 - enc.response_start[3]]
    record = sequence_kd.record(gens, sequence_kd.Decoding.of(plan.generation))
    assert record["empty_kept_reference"] == 1 and record["hit_token_limit"] == 2 and record["examples"] == n

    # Another vocabulary: the student encodes the decoded text (pooled rows, no kd, so nothing pairs tokens).
    from kdgeo.models import ModelRef, load_tokenizer

    other = load_tokenizer(ModelRef(str(tiny_lm["opt_other_vocab"])))
    split = plan.train
    split = split.__class__(**{**split.__dict__, "encodings": {"teacher": ref, "student": ref}})
    mixed = sequence_kd.apply(split, gens, {"student": other, "teacher": plan.t_tok}, 96, pair_tokens=False)
    text = plan.t_tok.decode(words, skip_special_tokens=True)
    want = other(text, add_special_tokens=False)["input_ids"] + [other.eos_token_id]
    assert lm_data.response_ids(mixed.encodings["student"])[1] == want


# ---- the cache key --------------------------------------------------------------------------------------------


def test_a_changed_teacher_or_decoding_is_a_new_entry_and_a_greedy_seed_is_not(tiny_lm, tmp_path):
    base = _key(_plan(tiny_lm, tmp_path))
    assert _key(_plan(tiny_lm, tmp_path)) == base  # stable
    assert _key(_plan(tiny_lm, tmp_path, seed=3)) == base  # greedy decoding does not draw
    changed = {
        "max_new_tokens": _key(_plan(tiny_lm, tmp_path, generate={"max_new_tokens": 4})),
        "sampling": _key(_plan(tiny_lm, tmp_path, generate={"do_sample": True})),
        "max_length": _key(_plan(tiny_lm, tmp_path, data={"max_length": 80})),
        "precision": _key(_plan(tiny_lm, tmp_path), precision="bf16"),
        "fine-tune": _key(_plan(tiny_lm, tmp_path), finetune="abc"),
    }
    sampled = _key(_plan(tiny_lm, tmp_path, generate={"do_sample": True}, seed=3))
    copy = tmp_path / "teacher"
    shutil.copytree(tiny_lm["opt_teacher"], copy)
    changed["teacher"] = _key(_plan(tiny_lm, tmp_path, teacher={"model": str(copy)}))
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    changed["teacher weights"] = _key(_plan(tiny_lm, tmp_path, teacher={"model": str(copy)}))
    assert sampled != changed["sampling"]  # a sampled entry belongs to its seed
    assert len({base, *changed.values()}) == len(changed) + 1, changed


def test_sequence_kd_is_refused_for_classification(tiny, tmp_path, capsys):
    path = write_spec(tmp_path / "run.toml", tiny_spec(tiny, tmp_path, train={"sequence_kd": True}))
    code, _, err = run_cli(capsys, "distill", str(path), "--dry-run")
    assert code == 2, err
    assert "train.sequence_kd = true" in err and 'task = "causal-lm"' in err and "Traceback" not in err


# ---- stopping ------------------------------------------------------------------------------------------------


def test_a_signal_mid_generation_leaves_no_entry(tiny_lm, opt_teacher, tmp_path, monkeypatch):
    """SIGINT after the first batch: the next batch stops with a message saying nothing was written, and there is
    neither an entry nor a build directory; the next call generates the whole entry."""
    from kdgeo import stopping
    from kdgeo.errors import RunInterrupted

    plan = _plan(tiny_lm, tmp_path)
    real = generation._generate_batch

    def then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(generation, "_generate_batch", then_signal)
    root = tmp_path / "outputs" / "sequence-kd"
    with stopping.stop_on_signals(), pytest.raises(RunInterrupted) as info:
        _ensure(plan, opt_teacher, root)
    message = str(info.value)
    assert info.value.exit_code == 130
    assert "while generating the teacher's responses for train.sequence_kd (4 of 8 prompts)" in message
    assert "nothing of the cache entry was written" in message
    assert sorted(p.name for p in root.iterdir()) == []  # no entry, no build directory, no lock file
    monkeypatch.setattr(generation, "_generate_batch", real)
    assert _ensure(plan, opt_teacher, root).generated
    assert sequence_kd.check_entry(root, _key(plan), 8)[0] == "ok"


def test_a_second_process_waits_for_the_builder_and_reads_its_entry(tiny_lm, tmp_path, monkeypatch):
    """The entry's lock is held (another process generating): ensure says whom it waits for, then reads the entry
    that process wrote, generating nothing itself."""
    import threading
    import time

    from kdgeo import locks

    plan = _plan(tiny_lm, tmp_path)
    root = tmp_path / "outputs" / "sequence-kd"
    root.mkdir(parents=True)
    key = _key(plan)
    held = locks.try_lock(root / f".{key}.lock")
    assert isinstance(held, locks.Lock)
    calls: list = []
    monkeypatch.setattr(sequence_kd, "generate_responses", lambda *a, **k: calls.append(a))
    events: list = []
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(gens=_ensure(plan, None, root, events)))
    waiter.start()
    deadline = time.time() + 60
    while not any("waiting for another kdgeo process building" in e.message for e in list(events)):
        assert time.time() < deadline and waiter.is_alive(), events
        time.sleep(0.05)
    tokens, stopped = [[5, 6]] * 8, [True] * 8
    sequence_kd._write(root, key, sequence_kd.entry_payload(plan, "fp32", None), tokens, stopped, {})
    held.release()
    waiter.join(60)
    assert result["gens"].generated is False and result["gens"].tokens == tokens and calls == []


def test_a_damaged_entry_is_reported_and_generated_again(tiny_lm, opt_teacher, tmp_path):
    plan = _plan(tiny_lm, tmp_path)
    root = tmp_path / "outputs" / "sequence-kd"
    gens = _ensure(plan, opt_teacher, root)
    (gens.path / sequence_kd.TOKENS).write_bytes(b"\0" * 4)
    assert sequence_kd.check_entry(root, gens.key, 8)[0] == "corrupt"
    events: list = []
    again = _ensure(plan, opt_teacher, root, events)
    assert again.generated and again.tokens == gens.tokens
    assert any("is corrupt" in e.message and "generating it again" in e.message for e in events)


# ---- runs: a sweep shares one entry; resume ----------------------------------------------------------------------


def test_a_sweep_generates_once_and_records_the_entry(tiny_lm, tmp_path, capsys, monkeypatch):
    """Two variants: the first run generates, the second reads (one generation call); both summaries name the
    entry; the dry run says whether it is cached; the teacher-output cache key includes the entry."""
    calls = []
    real = sequence_kd.generate_responses

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sequence_kd, "generate_responses", counted)
    spec = _spec(
        tiny_lm, tmp_path, train={"max_steps": 1},
        output={"teacher_outputs": True},
        sweep={"variants": {"ce": {"losses": [{"kind": "ce"}]}, "kd": {"losses": [{"kind": "ce"}, {"kind": "kd"}]}}},
    )
    path = write_spec(tmp_path / "sweep.toml", spec)
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run", "--json")
    assert code == 0, err
    before = json.loads(out)["runs"]
    assert [r["sequence_kd_cached"] for r in before] == [False, False]
    assert before[0]["sequence_kd_entry"] == before[1]["sequence_kd_entry"] and before[0]["sequence_kd_bytes"] > 0
    code, _, err = run_cli(capsys, "distill", str(path), "-q")
    assert code == 0, err
    assert calls == [8]
    runs = tmp_path / "runs" / "lm"
    records = [json.loads((runs / f"{v}-seed0" / "summary.json").read_text())["sequence_kd"] for v in ("ce", "kd")]
    assert [r["generated"] for r in records] == [True, False]
    assert records[0]["entry"] == records[1]["entry"] == Path(before[0]["sequence_kd_entry"]).name
    assert records[0]["path"] == before[0]["sequence_kd_entry"] and records[0]["examples"] == 8
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run", "--json", "--set", "name=again")
    assert code == 0, err
    after = json.loads(out)["runs"]
    entry = Path(after[0]["sequence_kd_entry"])
    assert after[0]["sequence_kd_cached"] is True
    assert after[0]["sequence_kd_bytes"] == sum(f.stat().st_size for f in entry.iterdir())
    code, out, err = run_cli(capsys, "distill", str(path), "--dry-run", "--set", "name=again")
    assert code == 0, err
    assert f"sequence-KD responses (cached, read {output_cache.format_bytes(after[0]['sequence_kd_bytes'])}) in {entry}" in out
    # The kd run's teacher-output cache entry is keyed by the responses it was computed on.
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "outputs").glob("*/manifest.json")]
    assert len(manifests) == 1 and manifests[0]["payload"]["sequence_kd"] == records[1]["entry"]


@pytest.mark.slow
def test_resume_of_a_sequence_kd_run_is_bit_for_bit(tiny_lm, tmp_path, capsys):
    spec = _spec(tiny_lm, tmp_path, train={"max_steps": 4, "checkpoint_every": 2, "log_every": 1, "batch_size": 4},
                 losses=[{"kind": "ce"}, {"kind": "kd"}, {"kind": "procrustes"}])
    path = write_spec(tmp_path / "run.toml", spec)
    for name in ("full", "crash"):
        code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", f"output.name={name}")
        assert code == 0, err
    crash = tmp_path / "runs" / "crash"
    for name in ("summary.json", "predictions.jsonl"):
        (crash / name).unlink()
    shutil.rmtree(crash / "student")
    shutil.rmtree(crash / "checkpoint-4", ignore_errors=True)
    code, _, err = run_cli(capsys, "distill", str(path), "-q", "--set", "output.name=crash", "--resume")
    assert code == 0, err

    def final(run: Path) -> dict:
        summary = json.loads((run / "summary.json").read_text())
        steps = [(e["step"], e["loss"]) for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "step"]
        return {"scores": summary["scores"], "geometry": summary["geometry"], "steps": steps}

    from safetensors.torch import load_file

    assert final(tmp_path / "runs" / "full") == final(crash)
    wa, wb = (load_file(r / "student" / "model.safetensors") for r in (tmp_path / "runs" / "full", crash))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((crash / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["sequence_kd"]["generated"] is False


@pytest.mark.slow
def test_sigterm_while_generating_exits_143_and_leaves_no_entry(tiny_lm, tmp_path):
    """A real process and a real signal: exit 143, one message (no traceback) saying nothing was cached and how to
    continue, and neither an entry nor a build directory (on a machine fast enough to finish the 12 batches first,
    the run stops before training instead, with the entry complete)."""
    from test_resume import _Distill

    base = _spec(tiny_lm, tmp_path)
    spec = _spec(tiny_lm, tmp_path, data={**base["data"], "max_train_samples": 48}, generate={"max_new_tokens": 32})
    path = write_spec(tmp_path / "run.toml", spec)
    run = _Distill(tmp_path, str(path))
    run.wait_for(lambda err: "sequence_kd: generating the teacher's responses" in err)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    assert f"Continue with: kdgeo distill {path}" in flat, flat
    left = sorted(p.name for p in (tmp_path / "outputs" / "sequence-kd").iterdir())
    if "before training started" in flat:
        assert len(left) == 1 and (tmp_path / "outputs" / "sequence-kd" / left[0] / "manifest.json").exists()
    else:
        assert "SIGTERM while generating the teacher's responses for train.sequence_kd" in flat, flat
        assert "nothing of the cache entry was written" in flat and left == [], (flat, left)
