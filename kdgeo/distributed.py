"""Data-parallel training on PyTorch's own engine: ``torchrun --nproc-per-node N -m kdgeo distill run.toml``.

kdgeo adds no launcher and no communication of its own: torchrun starts the N processes and sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; this module turns that environment into a
:class:`Dist` and a device (nccl on GPUs, gloo on CPUs), wraps the student in DDP or FSDP2, and
offers the handful of collectives the training loop needs. Without torchrun (or with one
process) every function here is the identity and nothing is initialised, so the loop has a
single code path.

How N processes reproduce one process
-------------------------------------
One process with global batch ``G`` (a list of example indices) minimises, per micro-batch,
``loss(G) * len(G) / n_step`` (``n_step``: the examples in the optimizer step). Under N ranks,
rank r holds ``shard(G, dist)`` (contiguous, sizes differ by at most one) and its parameters'
gradient is DDP's **average** over ranks. Two kinds of loss terms, two rules:

* Per-example mean terms (cross-entropy, logit KD) computed on the rank's own rows: multiply the
  local mean by :func:`loss_share` ``= N * n_local / n_step`` (not ``n_local / n_step``). DDP's
  average then gives ``(1/N) * sum_r N * n_r/n_step * grad(mean_r) = grad(sum over all rows / n_step)``,
  exactly the one-process gradient, also when the shards are unequal.

* Terms over the whole batch's rows (procrustes, gram, CKA: not a sum over examples): gather the
  rows with :func:`gather_rows`, compute the term on every rank identically, and multiply by
  **1** (the one-process share ``len(G) / n_step``, no factor N). Proof: let ``L(Y)`` with
  ``Y = cat(Y_0 .. Y_{N-1})``. Every rank computes the same ``L``, so every rank holds
  ``dL/dY_r`` for each block; the backward of the autograd all-gather
  (``torch.distributed.nn.functional.all_gather``: reduce-scatter SUM on nccl, all-to-all + sum
  on gloo) hands rank r the **sum** over ranks of its block's gradient, ``N * dL/dY_r``. Its
  parameter gradient is ``N * dL/dY_r * dY_r/dtheta``, and DDP's average gives
  ``(1/N) * sum_r N * dL/dY_r * dY_r/dtheta = dL/dtheta``. The factor N of the gather and
  the 1/N of DDP cancel. (A gather *without* that backward, e.g. a plain all_gather with the
  local block spliced back in, yields ``dL/dtheta / N`` and would need a factor N: that is the
  ``world_size`` scaling seen in SimCLR-style code, and it is wrong here.)
  ``tests/test_distributed.py`` checks both rules against one process to 1e-6 in float64.

Parameters outside the wrapped student (the objective's learned projections) get no averaging
from DDP or FSDP: call :func:`average_gradients` on them once per optimizer step. The same
cancellation applies, so their averaged gradient is the one-process gradient whether they act on
local rows before the gather or on gathered rows after it.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from kdgeo.errors import KdgeoError
from kdgeo.models import find_layer_list

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

Strategy = Literal["ddp", "fsdp"]

DEFAULT_TIMEOUT = timedelta(minutes=120)
"""How long a collective may wait for the other ranks when :func:`setup` is given no timeout: 120
minutes, as the spec's ``train.timeout_minutes`` (what `kdgeo distill` passes). Generous because rank 0
may work alone for a while (fine-tuning or caching the teacher) while the others wait in :func:`on_main`."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job. Built by :func:`from_environment` or :func:`setup`."""

    rank: int
    """Global rank, 0..world_size-1."""
    world_size: int
    """Number of processes in the job (1: not distributed)."""
    local_rank: int
    """Rank on this node: the GPU index this process drives."""
    backend: str | None
    """"nccl" or "gloo" once :func:`setup` has initialised the group; None before, or when disabled."""

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are real."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


SINGLE = Dist(rank=0, world_size=1, local_rank=0, backend=None)
"""The disabled Dist of a plain (non-torchrun) run."""


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise KdgeoError(
            f"the environment variable {name}={raw!r} is not an integer. It is set by torchrun; launch with "
            "`torchrun --nproc-per-node N -m kdgeo distill SPEC` and do not set it by hand."
        ) from None


def from_environment() -> Dist:
    """The Dist that torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) describes; initialises nothing.

    Without WORLD_SIZE, or with WORLD_SIZE=1, the run is a plain single process: :data:`SINGLE`.
    """
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return SINGLE
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        missing = [name for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)) if value is None]
        raise KdgeoError(
            f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "kdgeo's multi-process mode expects torchrun's environment. Launch with `torchrun --nproc-per-node N -m "
            "kdgeo distill SPEC`, or unset WORLD_SIZE for a single process."
        )
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise KdgeoError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank} "
            "(need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)."
        )
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=None)


def _choose_device(env: Dist, device_setting: str, setting: str) -> torch.device:
    """The device of this rank under torchrun: one GPU per process, picked by LOCAL_RANK."""
    try:
        asked = torch.device(device_setting) if device_setting != "auto" else None
    except RuntimeError:
        raise KdgeoError(f"{setting} = '{device_setting}' is not a device; use auto, cpu or cuda.") from None
    if asked is not None and asked.type not in ("cpu", "cuda"):
        raise KdgeoError(
            f"{setting} = '{device_setting}': multi-process training runs on CUDA GPUs (nccl) or on CPUs (gloo); "
            "set it to auto, cuda or cpu."
        )
    if asked is not None and asked.type == "cuda" and asked.index is not None:
        raise KdgeoError(
            f"{setting} = '{device_setting}' pins one GPU, but under torchrun each process takes the GPU of its "
            f"LOCAL_RANK (this one: cuda:{env.local_rank}). Set {setting} to cuda (or auto), and choose the GPUs "
            "with CUDA_VISIBLE_DEVICES."
        )
    cuda = torch.cuda.is_available()
    if asked is not None and asked.type == "cuda" and not cuda:
        raise KdgeoError(
            f"{setting} = 'cuda' was asked for, but CUDA is not available here; set {setting} to cpu (or auto)."
        )
    if (asked is not None and asked.type == "cpu") or not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", "more")
        raise KdgeoError(
            f"torchrun started {per_node} processes on this node, but only {count} CUDA device(s) are visible "
            f"(LOCAL_RANK {env.local_rank} has none). Use --nproc-per-node {count} or fewer (one process per GPU), "
            f"or set {setting} = 'cpu'."
        )
    return torch.device("cuda", env.local_rank)


def setup(
    device_setting: str, setting: str = "train.device", timeout: timedelta = DEFAULT_TIMEOUT
) -> tuple[Dist, torch.device]:
    """Initialise the process group when launched by torchrun; return this rank's Dist and device.

    Without torchrun (or with one process) nothing is initialised and the device is resolved as
    in a plain run. Under torchrun, ``device_setting`` may be auto, cuda or cpu: CUDA gives each
    process ``cuda:LOCAL_RANK`` and the nccl backend, CPU the gloo backend. ``setting`` names the
    spec field in error messages.
    """
    env = from_environment()
    if not env.enabled:
        from kdgeo.runtime import resolve_device  # lazy: keeps this module light for the workers

        return env, resolve_device(device_setting, setting)
    import torch.distributed as tdist

    if not tdist.is_available():
        raise KdgeoError(
            "this PyTorch build has no torch.distributed; install a standard PyTorch build to train with torchrun."
        )
    device = _choose_device(env, device_setting, setting)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not tdist.is_nccl_available():
        raise KdgeoError(
            f"this PyTorch build has no NCCL, which multi-GPU training needs; set {setting} = 'cpu' or install a "
            "CUDA build with NCCL."
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init, so nccl binds each process to its own GPU
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return Dist(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, backend=backend), device


def teardown(dist: Dist) -> None:
    """Destroy the process group if one was initialised (a no-op for a single process)."""
    import torch.distributed as tdist

    if dist.enabled and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# ---- batches ------------------------------------------------------------------------------------


def shard(batch: Sequence[int], dist: Dist) -> list[int]:
    """This rank's contiguous slice of a global batch: ``batch[r*n//N : (r+1)*n//N]``.

    The slices of ranks 0..N-1 concatenate to ``batch`` in order and their sizes differ by at
    most one, so N ranks with per-rank batch B see exactly the examples that one process with
    batch N*B sees. A batch shorter than N leaves some ranks an empty slice: such a rank must
    still take part in every collective of the step (e.g. forward one example with
    :func:`loss_share` 0).
    """
    n, world = len(batch), dist.world_size
    return list(batch[dist.rank * n // world : (dist.rank + 1) * n // world])


def loss_share(n_local: int, n_step: float, dist: Dist) -> float:
    """Weight of a rank's per-example *mean* loss so that DDP's gradient average equals the
    one-process gradient of the mean over all ``n_step`` examples of the step:
    ``world_size * n_local / n_step`` (``n_local / n_step`` for one process).

    Terms computed on :func:`gather_rows` output take the one-process share of the global
    micro-batch instead (no factor ``world_size``); see the module docstring.
    """
    return dist.world_size * n_local / n_step


# ---- collectives --------------------------------------------------------------------------------


def _comm_device(dist: Dist) -> torch.device:
    """Where small collective buffers live: nccl only moves CUDA tensors, gloo CPU ones."""
    import torch.distributed as tdist

    backend = dist.backend or tdist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Sum each value over ranks, in one float64 collective. Every rank must pass the same keys.

    Keys are sorted so that the buffer lines up across ranks; a checksum of the key names rides
    in the same buffer, so ranks that disagree on the names raise instead of summing unrelated
    numbers (ranks with a different *number* of keys cannot be caught in one collective).
    """
    if not dist.enabled:
        return dict(values)
    import torch.distributed as tdist

    keys = sorted(values)
    crc = zlib.crc32("\0".join(keys).encode("utf-8"))  # < 2**32: N of them sum exactly in float64
    buf = torch.tensor([float(values[k]) for k in keys] + [float(crc)], dtype=torch.float64, device=_comm_device(dist))
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    if buf[-1].item() != float(crc) * dist.world_size:
        raise RuntimeError(f"all_reduce_sum: ranks passed different keys (rank {dist.rank} has {keys})")
    return dict(zip(keys, buf[:-1].tolist()))


def broadcast_object(obj: Any, dist: Dist, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; the others' ``obj`` is ignored."""
    if not dist.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj if dist.rank == src else None]
    tdist.broadcast_object_list(box, src=src, device=_comm_device(dist))
    return box[0]


def gather_objects(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def on_main(fn: Any, dist: Dist) -> Any:
    """Run ``fn()`` on rank 0 only (writing files, fine-tuning the teacher once) and hand its
    result to every rank. A :class:`KdgeoError` on rank 0 is raised on every rank with the same
    message, so the others stop too instead of waiting at the next collective until it times out."""
    if not dist.enabled:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if dist.is_main:
        try:
            outcome = ("ok", fn())
        except BaseException as err:  # anything: the other ranks must not wait for a broadcast that never comes
            error = err
            text = err.render() if isinstance(err, KdgeoError) else f"rank 0 failed: {type(err).__name__}: {err}"
            outcome = ("error", text)  # the text only: exception subclasses need not pickle
    status, value = broadcast_object(outcome, dist)
    if status == "error":
        if error is not None:
            raise error
        raise KdgeoError(str(value))
    return value


def gather_rows(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """All ranks' rows, rank 0's first: (n_local, ...) -> (n_global, ...), differentiable.

    The backward hands each rank the gradient of its own rows summed over ranks (see the module
    docstring for why a loss on the result needs no extra scaling under DDP). Ranks may hold
    different numbers of rows (token rows, uneven shards): rows are padded to the largest count
    for the collective and trimmed after, at the cost of one small extra collective for the sizes.
    All ranks must pass the same dtype and trailing shape.
    """
    if not dist.enabled:
        return x
    import torch.distributed as tdist
    import torch.distributed.nn.functional as dnn

    n_local = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes_t = [torch.zeros_like(n_local) for _ in range(dist.world_size)]
    tdist.all_gather(sizes_t, n_local)
    sizes = [int(s.item()) for s in sizes_t]
    top = max(sizes)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])  # (top, ...)
    with warnings.catch_warnings():
        # torch 2.13 marks this function deprecated in favour of the private _functional_collectives;
        # it is still the public autograd all-gather, and its backward is what the scaling rule rests on.
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        parts = dnn.all_gather(x)  # world_size x (top, ...)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])  # (n_global, ...)


def average_gradients(params: Iterable[nn.Parameter], dist: Dist) -> None:
    """Average, in place and in one collective, the gradients of parameters that no DDP/FSDP
    wrapper averages (the objective's projections). Call once per optimizer step, after the last
    backward. A parameter whose gradient is None on some ranks counts as zero there; it is left
    None only where it is None on every rank, so all ranks keep identical parameters.
    """
    params = list(params)
    if not dist.enabled or not params:
        return
    import torch.distributed as tdist

    device = params[0].device
    # One buffer wide enough for every gradient: float64 projections must not be rounded to float32.
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = [
        p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
        for p in params
    ]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
    buf = torch.cat(flat + [present])
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    buf /= dist.world_size
    anywhere = buf[-len(params) :] > 0  # some rank had a gradient for this parameter
    offset = 0
    for i, p in enumerate(params):
        chunk = buf[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(chunk)
        elif anywhere[i]:
            p.grad = chunk.to(p.dtype).clone()


# ---- the training step's arithmetic ------------------------------------------------------------


@dataclass(frozen=True)
class Shares:
    """Weights of one micro-batch's losses in its optimizer step (see :func:`micro_shares`)."""

    log: float
    """Of its (unweighted) loss values in the logged step mean: this rank's part of the step."""
    logit: float
    """Of the per-row terms (logit losses, and feature losses on this rank's rows)."""
    feature: float
    """Of the feature terms: as ``logit``, or the one-process share when rows are gathered."""


def micro_shares(local_weight: int, global_weight: int, step_weight: float, dist: Dist, gathered: bool) -> Shares:
    """The shares that make a step's loss the mean over its examples (response tokens for a causal
    LM), however they are split into micro-batches and processes.

    ``local_weight``: what this rank's shard of the micro-batch counts; ``global_weight``: the whole
    micro-batch; ``step_weight``: the whole step. DDP averages gradients over processes, so per-row
    terms carry a factor N (:func:`loss_share`); terms on rows gathered from every process
    (``gathered``) are already the whole micro-batch's and take ``global_weight / step_weight``.
    """
    logit = loss_share(local_weight, step_weight, dist)
    feature = global_weight / step_weight if gathered else logit
    return Shares(log=local_weight / step_weight, logit=logit, feature=feature)


@dataclass(frozen=True)
class StepAgreement:
    """What every process agrees on after a step's backward passes."""

    parts: dict[str, float]
    """The logged loss values, summed over processes (each already weighted by its share)."""
    nonfinite_elsewhere: bool
    """Some process saw a non-finite loss."""
    stop: bool
    """Some process received a stop signal: all stop after this step."""


def reduce_step(
    parts: dict[str, float],
    nonfinite: bool,
    stop: bool,
    unwrapped: Iterable[nn.Parameter],
    dist: Dist,
) -> StepAgreement:
    """One collective for the step's bookkeeping and one for the gradients no wrapper averages
    (``unwrapped``: the objective's projections). One process: the inputs as they are."""
    if not dist.enabled:
        return StepAgreement(parts, nonfinite, stop)
    average_gradients(unwrapped, dist)
    flags = {"nonfinite": float(nonfinite), "stop": float(stop)}
    reduced = all_reduce_sum({**{f"part:{k}": v for k, v in parts.items()}, **flags}, dist)
    summed = {k[5:]: v for k, v in reduced.items() if k.startswith("part:")}
    return StepAgreement(summed, reduced["nonfinite"] > 0, reduced["stop"] > 0)


def clip_sharded(groups: list[list[torch.Tensor]], max_norm: float) -> torch.Tensor:
    """Global-norm clipping over FSDP-sharded parameters (DTensors) and plain ones (the
    projections): one norm per group, made whole, then combined, since torch cannot stack the
    two kinds of tensor into one norm."""
    norms = []
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            norms.append((n.full_tensor() if hasattr(n, "full_tensor") else n).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = max_norm / (float(total) + 1e-6)  # torch's clip_grad_norm_ formula, as a Python float:
    if coef < 1.0:  # a float scales DTensor and plain gradients alike
        for params in groups:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


# ---- wrapping the models ------------------------------------------------------------------------


def _fully_shard_blocks(model: nn.Module, device: torch.device, dist: Dist, frozen: bool = False) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # An explicit mesh: the default follows the accelerator, wrong for gloo on a machine with GPUs.
    mesh = init_device_mesh(device.type, (dist.world_size,))
    layers = find_layer_list(model)
    # Per block, so only one block is unsharded at a time; a model without a recognised block
    # list is sharded as one unit (still shards gradients and optimizer state, not peak weights).
    for block in layers if layers is not None else []:
        fully_shard(block, mesh=mesh)
    # FSDP2 keeps the root's weights unsharded after forward, expecting backward to need them at
    # once; a frozen teacher has no backward, so they would stay gathered for good (embeddings!).
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)
    return model


def wrap_student(
    model: nn.Module, dist: Dist, device: torch.device, strategy: Strategy = "ddp", find_unused_parameters: bool = False
) -> nn.Module:
    """The student ready for data-parallel training; the model itself when not distributed.

    ``ddp``: every rank keeps a full copy; gradients are averaged over ranks in backward.
    ``fsdp``: FSDP2 ``fully_shard`` per transformer block, then on the root; parameters become
    DTensors sharded over ranks (use :func:`full_state_dict` to save). ``model`` must already
    be on ``device``. ``find_unused_parameters`` (DDP only) is needed when some parameters get
    no gradient in a step (e.g. layers above the deepest distilled one with no logit loss).
    """
    if strategy not in ("ddp", "fsdp"):
        raise KdgeoError(f"unknown distributed strategy '{strategy}'; use ddp or fsdp.")
    if not dist.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    return _fully_shard_blocks(model, device, dist)


def shard_frozen(model: nn.Module, dist: Dist) -> nn.Module:
    """The frozen teacher sharded like an FSDP student (its weights split over ranks; it has no
    gradients or optimizer state). Every rank must run each teacher forward, since each forward
    all-gathers the weights. Move it to this rank's device first. Under DDP the teacher is
    simply copied to each rank: don't call this."""
    if not dist.enabled:
        return model
    device = next(model.parameters()).device  # already moved to this rank's device
    return _fully_shard_blocks(model, device, dist, frozen=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


@contextmanager
def maybe_no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) unless ``sync``.

    With gradient accumulation only the step's last micro-batch needs to communicate; the
    others accumulate local gradients. Wrap the forward *and* backward of each micro-batch:
    ``with maybe_no_sync(student, sync=is_last): loss.backward()``. FSDP2 keeps unsharded
    gradients meanwhile (more memory).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if sync:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---- full state dicts (checkpoints, saving) ----------------------------------------------------


def _full_options(cpu_offload: bool = False) -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_state_dict(model: nn.Module, dist: Dist) -> dict[str, Any]:
    """The unsharded weights, keyed as in the user's module (no ``module.`` prefix).

    Under FSDP2 this is a collective (call it on every rank) that gathers to CPU on rank 0 only:
    the other ranks get ``{}``. Under DDP or one process it is ``state_dict()`` on every rank.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options(cpu_offload=True))
    return unwrap(model).state_dict()


def load_full_state_dict(model: nn.Module, state: dict[str, Any], dist: Dist) -> None:
    """Load unsharded weights (as :func:`full_state_dict` returns them). Under FSDP2 every rank
    passes the full dict (each rank reads the checkpoint) and keeps its own shard."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # A shallow copy: set_model_state_dict puts this rank's DTensor shards into the dict it is given.
        set_model_state_dict(model, dict(state), options=_full_options())
    else:
        unwrap(model).load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """The optimizer's unsharded state. ``model`` must hold every parameter the optimizer updates
    (wrap student and objective together, e.g. ``nn.ModuleDict(student=..., objective=...)``).

    Under FSDP2: a collective, keyed by parameter name, on rank 0 only (others get ``{}``).
    Otherwise ``optimizer.state_dict()`` (keyed by position). The two layouts differ, so a
    checkpoint written under fsdp resumes under fsdp.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], dist: Dist
) -> None:
    """Load what :func:`full_optimizer_state` returned; under FSDP2 every rank passes the full state."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_full_options())
    else:
        optimizer.load_state_dict(state)
