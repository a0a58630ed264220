"""The teacher-output cache: round trips, sizes, corruption and staleness, crash safety, errors.

Stored values are compared exactly (rtol=0, atol=0) against the originals rounded to the storage
dtype (``x.to(dtype).float()``): the cache must add no error beyond that rounding.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdgeo.errors import KdgeoError, OutputError
from kdgeo.output_cache import (
    FORMAT_VERSION,
    MANIFEST,
    CacheEntryError,
    CacheReader,
    CacheWriter,
    cache_key,
    check_entry,
    clean_stale_builds,
    estimate_bytes,
    format_bytes,
    open_entry,
    remove_entry,
)

WIDTHS = {"logits": 3, "layer2": 8}
PAYLOAD = {"teacher": "tiny-bert@abc", "data": "demo@123", "tokenizer": "wordpiece", "layers": [2], "rows": "tokens", "dtype": "float16"}
KEY = cache_key(PAYLOAD)


def ragged(n: int, seed: int = 0, scale: float = 3.0) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
    """n examples: one logits row each, and 0..9 token rows of layer2 (example 3 has none)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [int(r) for r in torch.randint(1, 10, (n,), generator=gen)]
    tokens[3] = 0  # a zero-row example must survive the round trip too
    arrays = {
        "logits": [torch.randn(1, WIDTHS["logits"], generator=gen) * scale for _ in range(n)],  # (1, 3) each
        "layer2": [torch.randn(t, WIDTHS["layer2"], generator=gen) * scale for t in tokens],  # (t_i, 8) each
    }
    return tokens, arrays


def build(
    root: Path, n: int = 12, dtype: torch.dtype = torch.float16, shard_bytes: int = 200, seed: int = 0
) -> tuple[Path, dict[str, list[torch.Tensor]]]:
    """Write ``ragged(n, seed)`` as an entry under ``root``; return its path and the originals."""
    payload = {**PAYLOAD, "dtype": str(dtype), "seed": seed}
    _, arrays = ragged(n, seed)
    with CacheWriter(root, cache_key(payload), payload, WIDTHS, n, dtype=dtype, shard_bytes=shard_bytes) as writer:
        for i in range(n):
            writer.append(i, {name: items[i] for name, items in arrays.items()})
        path = writer.commit()
    return path, arrays


def entry_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.name != MANIFEST)


def append_all(writer: CacheWriter, arrays: dict[str, list[torch.Tensor]]) -> None:
    """Append every example of ``arrays`` (per field a list of (rows_i, width) tensors) in index order."""
    for i in range(len(next(iter(arrays.values())))):
        writer.append(i, {name: items[i] for name, items in arrays.items()})


def hash_mismatches(path: Path) -> list[str]:
    """The files of an entry whose sha256 differs from the one its manifest records (check_entry checks sizes only)."""
    import hashlib

    manifest = json.loads((path / MANIFEST).read_text())
    listed = [(s["file"], s["sha256"]) for f in manifest["fields"].values() for s in f["shards"]]
    listed += [(f["offsets_file"], f["offsets_sha256"]) for f in manifest["fields"].values()]
    return [name for name, digest in listed if hashlib.sha256((path / name).read_bytes()).hexdigest() != digest]


# --------------------------------------------------------------------------------------------
# keys and sizes


def test_cache_key_is_canonical_and_content_addressed():
    shuffled = dict(reversed(list(PAYLOAD.items())))
    assert cache_key(shuffled) == KEY
    assert len(KEY) == 20 and all(c in "0123456789abcdef" for c in KEY)
    assert cache_key({**PAYLOAD, "dtype": "bfloat16"}) != KEY
    assert cache_key({**PAYLOAD, "layers": [3]}) != KEY
    assert cache_key({"dtype": torch.float16}) == cache_key({"dtype": "torch.float16"})
    with pytest.raises(TypeError, match="not JSON-serializable"):
        cache_key({"model": object()})


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (int(1.4 * 2**30), "1.4 GiB"), (2**20 - 1, "1.0 MiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_estimate_bytes_equals_the_files_on_disk(tmp_path, dtype):
    path, arrays = build(tmp_path, dtype=dtype)
    rows = {name: [t.shape[0] for t in items] for name, items in arrays.items()}
    on_disk = sum(p.stat().st_size for p in entry_files(path))
    assert estimate_bytes(rows, WIDTHS, dtype) == on_disk
    assert json.loads((path / MANIFEST).read_text())["bytes"] == on_disk
    # One sequence for every field: the token counts, for both.
    assert estimate_bytes([5, 7], {"a": 4, "b": 2}, "bf16") == (12 * 4 * 2 + 3 * 8) + (12 * 2 * 2 + 3 * 8)
    with pytest.raises(ValueError, match="no row counts"):
        estimate_bytes({"logits": [1]}, WIDTHS)


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_is_exact_after_dtype_rounding_across_shards(tmp_path, dtype):
    path, arrays = build(tmp_path, n=12, dtype=dtype, shard_bytes=200)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["complete"] and manifest["dtype"] == str(dtype).removeprefix("torch.")
    assert len(manifest["fields"]["layer2"]["shards"]) >= 4  # 200-byte shards force many rollovers
    reader = open_entry(tmp_path, path.name)
    assert isinstance(reader, CacheReader)
    assert reader.n_examples == 12 and reader.fields == WIDTHS
    for name, items in arrays.items():
        assert reader.row_counts(name).tolist() == [t.shape[0] for t in items]
        for i, original in enumerate(items):
            got = reader.rows(name, i)
            assert got.dtype == torch.float32 and got.shape == original.shape
            torch.testing.assert_close(got, original.to(dtype).float(), rtol=0, atol=0)
        for got, original in zip(reader.batch(name, [5, 0, 11]), [items[5], items[0], items[11]]):
            torch.testing.assert_close(got, original.to(dtype).float(), rtol=0, atol=0)


def test_no_example_is_split_across_shards_and_big_examples_get_their_own(tmp_path):
    path, arrays = build(tmp_path, n=12, shard_bytes=100)  # 100 B < a 9-row layer2 example (144 B)
    field = json.loads((path / MANIFEST).read_text())["fields"]["layer2"]
    offsets = np.fromfile(path / field["offsets_file"], dtype="<i8")  # (n + 1,)
    starts = np.cumsum([0] + [s["rows"] for s in field["shards"]])  # (n_shards + 1,)
    assert set(starts.tolist()) <= set(offsets.tolist())  # every shard boundary is an example boundary
    for k, shard in enumerate(field["shards"]):
        inside = [i for i in range(12) if starts[k] <= offsets[i] < starts[k + 1] and offsets[i + 1] > offsets[i]]  # non-empty, in shard k
        assert shard["bytes"] <= 100 or len(inside) == 1
    assert any(shard["bytes"] > 100 for shard in field["shards"])  # the case that needs its own shard happened


def test_batch_reads_ragged_examples_and_bad_fields_or_indices_raise(tmp_path):
    n = 10
    _, arrays = ragged(n)
    with CacheWriter(tmp_path, KEY, PAYLOAD, WIDTHS, n, shard_bytes=256) as writer:
        append_all(writer, arrays)
        writer.commit()
    assert hash_mismatches(tmp_path / KEY) == []
    reader = open_entry(tmp_path, KEY)
    indices = [2, 3, 7]  # 3 has no rows
    for got, i in zip(reader.batch("layer2", indices), indices):
        assert got.shape == arrays["layer2"][i].shape
        torch.testing.assert_close(got, arrays["layer2"][i].half().float(), rtol=0, atol=0)
    with pytest.raises(KeyError, match="no field 'layer9'"):
        reader.rows("layer9", 0)
    with pytest.raises(IndexError):
        reader.rows("logits", n)


def test_reader_reads_through_read_only_memmaps_and_pickles_without_data(tmp_path):
    import pickle

    path, _ = build(tmp_path)
    reader = open_entry(tmp_path, path.name)
    reader.rows("layer2", 0)
    maps = list(reader._maps.values())
    assert maps and all(isinstance(m, np.memmap) and m.mode == "r" for m in maps)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps == {}
    torch.testing.assert_close(clone.rows("layer2", 5), reader.rows("layer2", 5), rtol=0, atol=0)


def test_reading_one_example_of_a_200_mib_cache_keeps_memory_flat(tmp_path):
    width, rows, n = 1024, 256, 400  # 400 x 256 x 1024 x 2 B = 200 MiB
    payload = {"memory": True}
    with CacheWriter(tmp_path, cache_key(payload), payload, {"h": width}, n, shard_bytes=64 * 2**20) as writer:
        block = torch.ones(rows, width)  # (rows, width)
        for i in range(n):
            writer.append(i, {"h": block * (i % 50)})
        writer.commit()
    assert estimate_bytes([rows] * n, {"h": width}) >= 200 * 2**20

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    reader = open_entry(tmp_path, cache_key(payload))
    got = reader.rows("h", 321)
    grown = rss() - before
    torch.testing.assert_close(got, torch.full((rows, width), 321 % 50.0), rtol=0, atol=0)
    assert grown < 20 * 2**20, f"RSS grew by {format_bytes(grown)} reading one 512 KiB example"


# --------------------------------------------------------------------------------------------
# check_entry: missing, corrupt, stale


def test_missing_entry(tmp_path):
    assert check_entry(tmp_path, KEY)[0] == "missing"
    assert check_entry(tmp_path / "nowhere", KEY)[0] == "missing"
    assert open_entry(tmp_path, KEY) is None


def test_good_entry_is_ok_and_matches_its_recorded_hashes(tmp_path):
    path, _ = build(tmp_path)
    assert check_entry(tmp_path, path.name)[0] == "ok"
    assert hash_mismatches(path) == []


def test_truncated_shard_is_corrupt_with_a_size_reason(tmp_path):
    path, _ = build(tmp_path)
    shard = path / "layer2.00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    status, reason = check_entry(tmp_path, path.name)
    assert status == "corrupt"
    assert "layer2.00001.bin" in reason and f"has {len(data) - 2} bytes" in reason and f"says {len(data)}" in reason
    with pytest.raises(CacheEntryError, match="corrupt: .*truncated") as info:
        open_entry(tmp_path, path.name)
    assert isinstance(info.value, OutputError) and info.value.status == "corrupt"


def test_missing_shard_is_corrupt(tmp_path):
    path, _ = build(tmp_path)
    (path / "logits.00000.bin").unlink()
    assert check_entry(tmp_path, path.name) == ("corrupt", "field 'logits': logits.00000.bin is missing")


def test_flipped_byte_passes_the_size_check_but_not_the_recorded_hash(tmp_path):
    path, arrays = build(tmp_path)
    shard = path / "layer2.00002.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x40
    shard.write_bytes(bytes(data))
    assert check_entry(tmp_path, path.name)[0] == "ok"  # cheap on every open: sizes and offsets only
    assert hash_mismatches(path) == ["layer2.00002.bin"]  # the manifest's sha256 still tells, checked by hand


def test_inconsistent_offsets_are_corrupt(tmp_path):
    path, _ = build(tmp_path)
    offsets_file = path / "layer2.offsets.i64"
    offsets = np.fromfile(offsets_file, dtype="<i8")
    offsets[-1] += 1  # same size, so only the consistency check can see it
    offsets.tofile(offsets_file)
    status, reason = check_entry(tmp_path, path.name)
    assert status == "corrupt" and "offsets do not run from 0" in reason


def test_manifest_for_another_key_or_format_is_stale(tmp_path):
    path, _ = build(tmp_path)
    manifest_path = path / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "key": KEY}))
    status, reason = check_entry(tmp_path, path.name)
    assert status == "stale" and "renamed or copied" in reason
    manifest_path.write_text(json.dumps({**manifest, "payload": {**manifest["payload"], "layers": [3]}}))
    assert check_entry(tmp_path, path.name)[0] == "stale"
    manifest_path.write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    status, reason = check_entry(tmp_path, path.name)
    assert status == "stale" and f"format {FORMAT_VERSION + 1}" in reason
    with pytest.raises(CacheEntryError, match="is stale"):
        open_entry(tmp_path, path.name)


def test_deleted_or_garbled_manifest_is_corrupt(tmp_path):
    path, _ = build(tmp_path)
    manifest_path = path / MANIFEST
    text = manifest_path.read_text()
    manifest_path.write_text(text[: len(text) // 2])
    status, reason = check_entry(tmp_path, path.name)
    assert status == "corrupt" and "cannot be read" in reason
    manifest = json.loads(text)
    del manifest["fields"]["logits"]["shards"]
    manifest_path.write_text(json.dumps(manifest))
    status, reason = check_entry(tmp_path, path.name)
    assert status == "corrupt" and "malformed" in reason
    manifest_path.unlink()
    status, reason = check_entry(tmp_path, path.name)
    assert status == "corrupt" and "manifest.json is missing" in reason


def test_manifest_cannot_point_outside_the_entry(tmp_path):
    path, _ = build(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["fields"]["logits"]["shards"][0]["file"] = "../../etc/passwd"
    (path / MANIFEST).write_text(json.dumps(manifest))
    status, reason = check_entry(tmp_path, path.name)
    assert status == "corrupt" and "invalid file name" in reason


def test_remove_entry_then_rebuild(tmp_path):
    path, _ = build(tmp_path)
    assert remove_entry(tmp_path, path.name) is True
    assert not path.exists() and remove_entry(tmp_path, path.name) is False
    assert check_entry(tmp_path, path.name)[0] == "missing"
    build(tmp_path)
    assert check_entry(tmp_path, path.name)[0] == "ok" and hash_mismatches(path) == []


def test_commit_replaces_a_corrupt_entry_with_the_same_key(tmp_path):
    path, _ = build(tmp_path)
    (path / "layer2.00000.bin").write_bytes(b"junk")
    assert check_entry(tmp_path, path.name)[0] == "corrupt"
    build(tmp_path)
    assert check_entry(tmp_path, path.name)[0] == "ok" and hash_mismatches(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no trash left


# --------------------------------------------------------------------------------------------
# crash safety


def test_exception_inside_the_writer_leaves_nothing(tmp_path):
    _, arrays = ragged(6)
    with pytest.raises(RuntimeError, match="teacher blew up"):
        with CacheWriter(tmp_path, KEY, PAYLOAD, WIDTHS, 6, shard_bytes=64) as writer:
            for i in range(4):
                writer.append(i, {name: items[i] for name, items in arrays.items()})
            assert any(writer.tmp.iterdir())
            raise RuntimeError("teacher blew up")
    assert list(tmp_path.iterdir()) == []
    assert check_entry(tmp_path, KEY)[0] == "missing"


def test_leaving_the_block_without_commit_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="without commit"):
        with CacheWriter(tmp_path, KEY, PAYLOAD, WIDTHS, 0):
            pass
    assert list(tmp_path.iterdir()) == []


def test_build_after_a_crash_cleans_the_dead_builds_tmp_dir(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited and reaped: no such process any more
    leftover = tmp_path / f"{KEY}.tmp-{dead_pid}"
    leftover.mkdir()
    (leftover / "layer2.00000.bin").write_bytes(b"\0" * 100)  # what a kill -9 mid-build leaves
    live = tmp_path / f"otherkey.tmp-{os.getppid()}"  # a build still running elsewhere: left alone
    live.mkdir()
    assert check_entry(tmp_path, KEY)[0] == "missing"
    _, arrays = ragged(5)
    with CacheWriter(tmp_path, KEY, PAYLOAD, WIDTHS, 5) as writer:
        append_all(writer, arrays)
        writer.commit()
    assert not leftover.exists() and live.exists()
    assert check_entry(tmp_path, KEY)[0] == "ok" and hash_mismatches(tmp_path / KEY) == []
    assert clean_stale_builds(tmp_path) == []


# --------------------------------------------------------------------------------------------
# bad values and bad directories


def test_fp16_overflow_raises_and_suggests_bf16(tmp_path):
    fine = torch.tensor([[65504.0, -65504.0, 1.0]])  # (1, 3): float16's largest finite value is still fine
    too_big = torch.tensor([[1.0, -70000.0, 2.0]])  # (1, 3)
    with pytest.raises(OutputError, match=r"values up to 70000.*bfloat16") as info:
        with CacheWriter(tmp_path, cache_key({"x": 1}), {"x": 1}, {"logits": 3}, 2) as writer:
            writer.append(0, {"logits": fine})
            writer.append(1, {"logits": too_big})
    assert isinstance(info.value, KdgeoError) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    # The same values fit bfloat16.
    payload = {"x": 1, "dtype": "bf16"}
    with CacheWriter(tmp_path, cache_key(payload), payload, {"logits": 3}, 2, dtype="bf16") as writer:
        append_all(writer, {"logits": [fine, too_big]})
        writer.commit()
    reader = open_entry(tmp_path, cache_key(payload))
    torch.testing.assert_close(reader.rows("logits", 1), too_big.bfloat16().float(), rtol=0, atol=0)


def test_non_finite_teacher_values_are_stored_as_they_are(tmp_path):
    weird = torch.tensor([[float("inf"), float("nan"), -float("inf")]])  # (1, 3)
    with CacheWriter(tmp_path, cache_key({"x": 2}), {"x": 2}, {"logits": 3}, 1) as writer:
        writer.append(0, {"logits": weird})
        writer.commit()
    got = open_entry(tmp_path, cache_key({"x": 2})).rows("logits", 0)
    torch.testing.assert_close(got, weird, rtol=0, atol=0, equal_nan=True)


def test_writer_rejects_misuse(tmp_path):
    _, arrays = ragged(4)
    example = {name: items[0] for name, items in arrays.items()}
    with pytest.raises(ValueError, match="is not cache_key"):
        CacheWriter(tmp_path, KEY, {**PAYLOAD, "layers": [9]}, WIDTHS, 4)
    with pytest.raises(ValueError, match="field name"):
        CacheWriter(tmp_path, KEY, PAYLOAD, {"layer/2": 4}, 4)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        CacheWriter(tmp_path, KEY, PAYLOAD, WIDTHS, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="cache key"):
        check_entry(tmp_path, "../elsewhere")
    writer = CacheWriter(tmp_path, KEY, PAYLOAD, WIDTHS, 4)
    with pytest.raises(ValueError, match="expected index 0, got 1"):
        writer.append(1, example)
    with pytest.raises(ValueError, match=r"fields missing \['logits'\]"):
        writer.append(0, {"layer2": example["layer2"]})
    with pytest.raises(ValueError, match=r"expected a \(rows, 8\) tensor, got shape \(2, 7\)"):
        writer.append(0, {**example, "layer2": torch.zeros(2, 7)})
    writer.append(0, example)
    with pytest.raises(ValueError, match="after 1 of 4 examples"):
        writer.commit()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_root_raises_output_error_naming_it(tmp_path):
    # We run as root, so chmod cannot make a directory unwritable: put the cache under a regular file.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    root = blocker / "cache"
    with pytest.raises(OutputError, match=rf"output.output_cache = '{root}': cannot write .*Set output.output_cache to a writable") as info:
        CacheWriter(root, KEY, PAYLOAD, WIDTHS, 1, setting="output.output_cache")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_disk_full_mid_build_raises_output_error_and_leaves_no_tmp_dir(tmp_path):
    # A real write error from the kernel: a 64 KiB file-size limit makes a larger shard fail with EFBIG.
    n, width = 64, 256  # 64 examples x 8 rows x 256 x 2 B = 256 KiB in one shard
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OutputError, match=r"File too large.*disk is full.*free some space") as info:
            with CacheWriter(tmp_path / "cache", cache_key({"big": 1}), {"big": 1}, {"h": width}, n) as writer:
                for i in range(n):
                    writer.append(i, {"h": torch.ones(8, width)})
                writer.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(tmp_path / "cache") in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []
