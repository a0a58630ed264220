"""kdgeo.distributed: single-process identities, shard properties, torchrun-environment errors,
and, under a real ``torchrun --nproc-per-node 2`` on CPU (gloo), the collectives and the
gradient rules that make N ranks reproduce one process (DDP with gathered rows, DDP with
per-example means and accumulation, FSDP2 state dicts and an optimizer step).

The two-process part runs one worker script once per session (torch starts slowly: ~10 s for
the launch) and each test reads its own section of the ranks' result files. Gradients are
compared in float64 against the same computation done by one process on the full batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdgeo import distributed as D
from kdgeo.errors import KdgeoError

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---- one process ------------------------------------------------------------------------------


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Rank 1 of 2 on one node, as torchrun would set it (no process group is created)."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_without_torchrun_the_run_is_single_and_initialises_nothing(no_torchrun: None) -> None:
    assert D.from_environment() == D.SINGLE
    assert not D.SINGLE.enabled and D.SINGLE.is_main
    dist, device = D.setup("cpu")
    assert dist == D.SINGLE and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    D.teardown(dist)  # a no-op


def test_world_size_one_is_single(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert D.from_environment() == D.SINGLE


def test_from_environment_reads_torchrun(fake_torchrun: pytest.MonkeyPatch) -> None:
    dist = D.from_environment()
    assert dist == D.Dist(rank=1, world_size=2, local_rank=1, backend=None)
    assert dist.enabled and not dist.is_main


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "2"}, "RANK and LOCAL_RANK are not"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK is not"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "inconsistent torchrun environment: RANK=2, WORLD_SIZE=2"),
    ],
)
def test_broken_torchrun_environment_is_reported(no_torchrun: None, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KdgeoError, match=expected) as err:
        D.from_environment()
    assert "torchrun" in str(err.value)


@pytest.mark.parametrize(
    ("setting", "cuda_count", "expected"),
    [
        ("cuda:1", 2, r"train.device = 'cuda:1' pins one GPU, but under torchrun each process takes the GPU of its LOCAL_RANK \(this one: cuda:1\)"),
        ("cuda", 0, "train.device = 'cuda' was asked for, but CUDA is not available here"),
        ("auto", 1, r"torchrun started 2 processes on this node, but only 1 CUDA device\(s\) are visible .*--nproc-per-node 1 or fewer"),
        ("cuda", 1, "only 1 CUDA device"),
        ("mps", 0, "multi-process training runs on CUDA GPUs \\(nccl\\) or on CPUs \\(gloo\\)"),
        ("gpu7", 0, "train.device = 'gpu7' is not a device"),
    ],
)
def test_bad_device_under_torchrun_is_reported_before_any_init(
    fake_torchrun: pytest.MonkeyPatch, setting: str, cuda_count: int, expected: str
) -> None:
    fake_torchrun.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    fake_torchrun.setattr(torch.cuda, "device_count", lambda: cuda_count)
    with pytest.raises(KdgeoError, match=expected):
        D.setup(setting)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
def test_shard_splits_every_batch_evenly_and_in_order(world: int) -> None:
    gen = torch.Generator().manual_seed(world)
    for n in range(0, 40):
        batch = torch.randperm(100, generator=gen)[:n].tolist()
        parts = [D.shard(batch, D.Dist(rank=r, world_size=world, local_rank=r, backend="gloo")) for r in range(world)]
        assert sum(parts, []) == batch  # the ranks' slices, rank 0 first, are the batch
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert all(p == batch[r * n // world : (r + 1) * n // world] for r, p in enumerate(parts))


def test_shards_of_global_batches_let_n_ranks_see_what_one_process_sees() -> None:
    from kdgeo.data import batch_indices

    world, per_rank = 3, 4
    one = batch_indices(50, world * per_rank, shuffle=True, seed=7, epoch=2)
    ranks = [[D.shard(b, D.Dist(r, world, r, "gloo")) for b in one] for r in range(world)]
    for step, batch in enumerate(one):
        assert sum((ranks[r][step] for r in range(world)), []) == batch
        assert all(len(ranks[r][step]) <= per_rank for r in range(world))


def test_loss_share_is_the_plain_share_for_one_process() -> None:
    assert D.loss_share(3, 12, D.SINGLE) == 3 / 12
    assert D.loss_share(3, 12, D.Dist(0, 2, 0, "gloo")) == 2 * 3 / 12


def test_disabled_dist_makes_every_collective_the_identity() -> None:
    d = D.SINGLE
    values = {"b": 1.5, "a": -2.0}
    assert D.all_reduce_sum(values, d) == values
    obj = {"x": [1]}
    assert D.broadcast_object(obj, d) is obj
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather_rows(x, d) is x
    assert D.shard([5, 1, 9], d) == [5, 1, 9]
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    D.average_gradients([p], d)
    assert p.grad.tolist() == [3.0, 3.0]


def test_disabled_dist_leaves_the_model_alone() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for strategy in ("ddp", "fsdp"):
        assert D.wrap_student(model, D.SINGLE, torch.device("cpu"), strategy) is model  # type: ignore[arg-type]
    assert D.shard_frozen(model, D.SINGLE) is model
    assert D.unwrap(model) is model and not D.is_fsdp(model)
    with D.maybe_no_sync(model, sync=False):
        model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sd = D.full_state_dict(model, D.SINGLE)
    assert sd.keys() == model.state_dict().keys()
    D.load_full_state_dict(model, sd, D.SINGLE)
    osd = D.full_optimizer_state(model, opt, D.SINGLE)
    assert osd == opt.state_dict()
    D.load_full_optimizer_state(model, opt, osd, D.SINGLE)


def test_unknown_strategy_is_reported() -> None:
    with pytest.raises(KdgeoError, match="unknown distributed strategy 'zero3'; use ddp or fsdp"):
        D.wrap_student(nn.Linear(2, 2), D.SINGLE, torch.device("cpu"), "zero3")  # type: ignore[arg-type]


# find_layer_list (used to shard blocks) lives in kdgeo.models: tests/test_models.py.


# ---- two processes under torchrun (gloo) --------------------------------------------------------

WORKER = r'''
"""Run by torchrun with 2 CPU processes; writes rank<r>.json into the directory argv[1]."""
import copy, json, sys, traceback
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from kdgeo import distributed as D

torch.set_default_dtype(torch.float64)
out_dir = sys.argv[1]
d, device = D.setup("auto", timeout=timedelta(seconds=60))
r, N = d.rank, d.world_size
results = {"dist": [d.rank, d.world_size, d.local_rank, d.backend], "device": str(device),
           "initialised": tdist.is_initialized()}


def check(fn):
    try:
        results[fn.__name__] = fn()
    except Exception:
        results[fn.__name__] = {"error": traceback.format_exc()}
    return fn


def grads(*params):
    return [p.grad.tolist() for p in params]


@check
def collectives():
    out = {
        "sum": D.all_reduce_sum({"b": r + 1.0, "a": 0.5 * r, "c": 1e-3}, d),
        "bcast": D.broadcast_object({"x": [1, 2], "s": "hi"} if r == 0 else None, d),
        "bcast_src1": D.broadcast_object(f"from rank {r}", d, src=1),
    }
    try:
        D.all_reduce_sum({"a": 1.0, ("b" if r == 0 else "z"): 2.0}, d)
        out["mismatch"] = "no error"
    except RuntimeError as err:
        out["mismatch"] = str(err)
    return out


@check
def gather_forward():
    n = 2 if r == 0 else 3
    x = torch.arange(n * 2.0).reshape(n, 2) + 100 * r  # (n, 2), rank-specific values
    empty = D.gather_rows(torch.ones(0 if r == 0 else 2, 4), d)  # rank 0 contributes no rows
    return {"rows": D.gather_rows(x, d).tolist(), "with_empty_rank": list(empty.shape)}


X7 = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))  # the global batch


def build_gather():
    torch.manual_seed(1)
    lin = nn.Linear(3, 4)
    p1 = nn.Parameter(torch.randn(4, 4) / 2)  # outside DDP, acts on local rows before the gather
    p2 = nn.Parameter(torch.randn(4, 4) / 2)  # outside DDP, acts on gathered rows
    return lin, p1, p2


def feature_loss(rows, p2):
    """Not a sum over rows: (Y P2)^T Y couples every pair of examples."""
    return ((rows @ p2).T @ rows).norm() ** 2 / rows.shape[0]


@check
def gather_gradient():
    lin, p1, p2 = build_gather()
    feature_loss(lin(X7) @ p1, p2).backward()  # one process, whole batch
    reference = grads(lin.weight, lin.bias, p1, p2)

    lin, p1, p2 = build_gather()
    model = D.wrap_student(lin, d, device, "ddp")
    local = D.shard(range(7), d)  # 3 rows on rank 0, 4 on rank 1
    rows = D.gather_rows(model(X7[local]) @ p1, d)  # (7, 4)
    feature_loss(rows, p2).backward()  # the loss times 1: no world_size factor
    D.average_gradients([p1, p2], d)
    ranks = grads(lin.weight, lin.bias, p1, p2)

    # Control: a gather whose backward keeps only the local block (the other ranks' rows are
    # constants) gives 1/N of the gradient, so the rule above is not true by accident.
    lin, p1, p2 = build_gather()
    model = D.wrap_student(lin, d, device, "ddp")
    y = model(X7[local]) @ p1
    others = D.gather_rows(y.detach(), d)
    rows = torch.cat([others[: local[0]], y, others[local[-1] + 1 :]])
    feature_loss(rows, p2).backward()
    ratio = (torch.tensor(reference[0]) / lin.weight.grad).flatten().tolist()
    return {"reference": reference, "ranks": ranks, "local_only_ratio": ratio}


X12 = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
Y12 = torch.randn(12, 2, generator=torch.Generator().manual_seed(3))
MICRO = [list(range(0, 7)), list(range(7, 12))]  # one optimizer step of two micro-batches


def build_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def mean_loss(out, target):
    return ((out - target) ** 2).sum(1).mean()  # a per-example mean, like cross-entropy


@check
def ddp_mean():
    net = build_net()
    for b in MICRO:
        (mean_loss(net(X12[b]), Y12[b]) * len(b) / 12).backward()
    reference = [p.grad.tolist() for p in net.parameters()]

    net = build_net()
    model = D.wrap_student(net, d, device, "ddp")
    after_first = None
    for i, b in enumerate(MICRO):
        local = D.shard(b, d)  # 3+4 and 2+3 rows: unequal shards
        with D.maybe_no_sync(model, sync=i == len(MICRO) - 1):
            (mean_loss(model(X12[local]), Y12[local]) * D.loss_share(len(local), 12, d)).backward()
        if after_first is None:
            g = net[0].weight.grad.clone()
            seen = [torch.zeros_like(g) for _ in range(N)]
            tdist.all_gather(seen, g)
            after_first = bool(torch.equal(seen[0], seen[1]))  # no_sync: still rank-local
    return {"reference": reference, "ranks": [p.grad.tolist() for p in net.parameters()], "synced_after_first": after_first}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = h + block(h)
        return self.head(h)


def maxdiff(a, b):
    if a.keys() != b.keys():
        return f"keys differ: {sorted(a)} vs {sorted(b)}"
    return max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)


def fsdp_step(container, opt, x, y):
    """One AdamW step of two accumulated micro-batches on this rank's shards."""
    opt.zero_grad(set_to_none=True)
    student = container["student"]
    for i, b in enumerate([list(range(0, 5)), list(range(5, 8))]):
        local = D.shard(b, d)
        with D.maybe_no_sync(student, sync=i == 1):
            out = container["proj"](student(x[local]))
            (mean_loss(out, y[local]) * D.loss_share(len(local), 8, d)).backward()
    D.average_gradients(container["proj"].parameters(), d)
    opt.step()


def ref_step(container, opt, x, y):
    opt.zero_grad(set_to_none=True)
    mean_loss(container["proj"](container["student"](x)), y).backward()
    opt.step()


@check
def fsdp():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.manual_seed(5)
    start = nn.ModuleDict({"student": Tiny(), "proj": nn.Linear(2, 2)})
    ref = copy.deepcopy(start)
    cont = copy.deepcopy(start)
    D.wrap_student(cont["student"], d, device, "fsdp")
    out = {
        "is_fsdp": D.is_fsdp(cont),
        "blocks_sharded": [isinstance(b, FSDPModule) for b in cont["student"].layers],
        "local_shape": list(cont["student"].layers[0][0].weight.to_local().shape),
    }
    sd = D.full_state_dict(cont, d)
    out["full_sd_keys"] = len(sd)
    if r == 0:
        out["full_sd_diff"] = maxdiff(sd, start.state_dict())
        out["full_sd_on_cpu"] = all(v.device.type == "cpu" for v in sd.values())
    shifted = {k: v + 1.0 for k, v in start.state_dict().items()}
    D.load_full_state_dict(cont, shifted, d)
    back = D.full_state_dict(cont, d)
    if r == 0:
        out["round_trip_diff"] = maxdiff(back, shifted)
    D.load_full_state_dict(cont, start.state_dict(), d)

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(cont.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    fsdp_step(cont, opt, x, y)
    ref_step(ref, ref_opt, x, y)
    sd = D.full_state_dict(cont, d)
    osd = D.full_optimizer_state(cont, opt, d)
    if r == 0:
        out["step_diff"] = maxdiff(sd, ref.state_dict())
        ref_w = ref_opt.state[ref["student"].layers[1][0].weight]["exp_avg"]
        out["exp_avg_diff"] = float((osd["state"]["student.layers.1.0.weight"]["exp_avg"] - ref_w).abs().max())

    # Resume: a fresh sharded copy loads the full weights and optimizer state (every rank
    # reads the checkpoint: here rank 0 hands them over), then both take one more step.
    sd, osd = D.broadcast_object((sd, osd), d)
    again = copy.deepcopy(start)
    D.wrap_student(again["student"], d, device, "fsdp")
    again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2, weight_decay=0.1)
    D.load_full_state_dict(again, sd, d)
    before = copy.deepcopy(osd)
    D.load_full_optimizer_state(again, again_opt, osd, d)
    out["osd_untouched"] = repr(before) == repr(osd)
    fsdp_step(again, again_opt, x, y)
    ref_step(ref, ref_opt, x, y)
    resumed = D.full_state_dict(again, d)
    if r == 0:
        out["resumed_step_diff"] = maxdiff(resumed, ref.state_dict())

    torch.manual_seed(8)
    teacher = Tiny().requires_grad_(False).eval()
    sharded = D.shard_frozen(copy.deepcopy(teacher), d)
    local = D.shard(range(8), d)
    with torch.no_grad():
        out["teacher_diff"] = float((sharded(x[local]) - teacher(x[local])).abs().max())
    out["teacher_sharded"] = isinstance(sharded.head.weight, DTensor) and not sharded.head.weight.requires_grad
    return out


D.teardown(d)
results["initialised_after_teardown"] = tdist.is_initialized()
with open(f"{out_dir}/rank{r}.json", "w") as fh:
    json.dump(results, fh)
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' results of the worker, launched exactly as users launch kdgeo: torchrun."""
    tmp = tmp_path_factory.mktemp("torchrun")
    script = tmp / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script), str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def section(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    for r, res in enumerate(ranks):
        assert "error" not in res[name], f"rank {r}, {name}:\n{res[name]['error']}"
    return [res[name] for res in ranks]


def close(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_setup_under_torchrun_picks_gloo_on_cpu_and_teardown_ends_it(ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(ranks):
        assert res["dist"] == [r, 2, r, "gloo"]
        assert res["device"] == "cpu"
        assert res["initialised"] and not res["initialised_after_teardown"]


def test_collectives_agree_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for res in section(ranks, "collectives"):
        assert res["sum"] == pytest.approx({"a": 0.5, "b": 3.0, "c": 2e-3})
        assert res["bcast"] == {"x": [1, 2], "s": "hi"}
        assert res["bcast_src1"] == "from rank 1"
        assert "ranks passed different keys" in res["mismatch"]


def test_gather_rows_puts_rank_zero_first_and_handles_unequal_counts(ranks: list[dict[str, Any]]) -> None:
    expected = [[0, 1], [2, 3], [100, 101], [102, 103], [104, 105]]
    for res in section(ranks, "gather_forward"):
        assert res["rows"] == expected
        assert res["with_empty_rank"] == [2, 4]


def test_loss_on_gathered_rows_times_one_gives_the_one_process_gradient(ranks: list[dict[str, Any]]) -> None:
    """all_gather's backward sums over ranks (x N), DDP averages (/ N): no rescaling needed,
    also for parameters outside DDP once average_gradients has run."""
    for res in section(ranks, "gather_gradient"):
        for got, want in zip(res["ranks"], res["reference"]):  # weight, bias, p1 (before gather), p2 (after)
            close(got, want)
        # Without the summing backward the same setup gets half the gradient (N = 2).
        close(res["local_only_ratio"], [2.0] * len(res["local_only_ratio"]))


def test_ddp_mean_loss_on_unequal_shards_with_accumulation_gives_the_one_process_gradient(ranks: list[dict[str, Any]]) -> None:
    for res in section(ranks, "ddp_mean"):
        assert res["synced_after_first"] is False  # maybe_no_sync skipped the first all-reduce
        for got, want in zip(res["ranks"], res["reference"]):
            close(got, want)


def test_fsdp2_on_cpu_gloo_round_trips_state_and_matches_the_unsharded_step(ranks: list[dict[str, Any]]) -> None:
    main, other = section(ranks, "fsdp")
    for res in (main, other):
        assert res["is_fsdp"] and res["blocks_sharded"] == [True, True]
        assert res["local_shape"] == [4, 8]  # an (8, 8) weight split over 2 ranks
        assert res["teacher_sharded"] and res["teacher_diff"] < 1e-12
    assert main["full_sd_keys"] == 10 and other["full_sd_keys"] == 0  # gathered on rank 0 only
    assert main["full_sd_on_cpu"]
    assert main["full_sd_diff"] == 0.0 and main["round_trip_diff"] == 0.0
    assert main["step_diff"] < 1e-6 and main["exp_avg_diff"] < 1e-6
    assert main["resumed_step_diff"] < 1e-6
    assert main["osd_untouched"] and other["osd_untouched"]  # loading leaves the caller's dicts alone
