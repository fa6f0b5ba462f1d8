"""The one door to torch.distributed: process-group setup, feature gathers, and per-sample state sync.

Launch with ``torchrun`` (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) or SLURM ``srun``
(SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, MASTER_ADDR from MASTER_ADDR or the first host of SLURM_NODELIST,
MASTER_PORT from MASTER_PORT or SLURM_JOB_ID). NCCL on CUDA, gloo on CPU. With ``world_size == 1`` every function
here is the identity or a no-op and makes no torch.distributed call, so train.py calls them unconditionally.

Per-sample state (GloFND's λ, m, v, steps and the losses' u): replicated on every rank, each rank updates the rows
of its local anchors, then :func:`sync_rows` all-gathers those rows and writes them everywhere, so every rank holds
the full, identical state before any row is read again. Sharded by id (clip_glofnd/state.py), rows travel between
their owner and the rank that needs them with :func:`exchange_rows`, an all-to-all with uneven splits (gloo supports
it as ``all_to_all_single`` with split sizes; its list form ``all_to_all`` needs equal sizes there). Rows travel as
raw bytes, so every dtype arrives exactly. README "Multi-GPU" gives the memory and communication of each choice.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as tdist
from torch import Tensor

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
# Ranks wait at a barrier while rank 0 evaluates and writes a checkpoint; NCCL's default 10 min would kill them.
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, local_rank on its node, its device, and the backend.

    ``backend`` is None for a single process; ``init_method`` is the torch.distributed URL (``env://`` under
    torchrun, ``tcp://MASTER_ADDR:MASTER_PORT`` under SLURM, None for a single process).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    init_method: str | None = None


class HasRows(Protocol):
    """Holder of per-sample state rows (GloFND, the losses' u)."""

    def export_rows(self, ids: Tensor) -> dict[str, Tensor]: ...

    def import_rows(self, ids: Tensor, rows: dict[str, Tensor]) -> None: ...


def dist_info_from_env(env: Mapping[str, str], device: str | torch.device | None = None) -> DistInfo:
    """DistInfo from launcher variables (torchrun first, then SLURM, else one process); pure apart from a CUDA probe.

    SLURM counts only with SLURM_PROCID set (srun sets it; an salloc shell does not) and SLURM_NTASKS > 1.
    ``device`` None picks ``cuda:<local_rank>`` when CUDA is available, else CPU; "cuda" without an index becomes
    ``cuda:<local_rank>``. A partially set launcher environment raises ValueError naming the missing variable.
    """
    if any(key in env for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        launcher, init_method = "torchrun", "env://"                             # torchrun's store at MASTER_*
        rank, local_rank, world_size = (_int_var(env, key) for key in _TORCHRUN_VARS[:3])
        _require(env, "MASTER_ADDR", launcher), _require(env, "MASTER_PORT", launcher)
    elif "SLURM_PROCID" in env and _int_var(env, "SLURM_NTASKS") > 1:          # a task of `srun`
        launcher, init_method = "SLURM", f"tcp://{_slurm_master_addr(env)}:{_slurm_master_port(env)}"
        rank, local_rank, world_size = (_int_var(env, key) for key in _SLURM_VARS)
    else:
        launcher, init_method, rank, local_rank, world_size = "no launcher", None, 0, 0, 1
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"{launcher} environment: rank {rank} / local rank {local_rank} invalid for world size "
                         f"{world_size}; need 0 <= rank < world_size")
    dev = _pick_device(device, local_rank)
    backend = None if world_size == 1 else ("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, dev, backend, init_method if world_size > 1 else None)


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Read the launcher environment, set the CUDA device, and join the process group (no-op for one process)."""
    info = dist_info_from_env(os.environ, device)
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if info.world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group(info.backend, init_method=info.init_method, rank=info.rank,
                                 world_size=info.world_size, timeout=_COLLECTIVE_TIMEOUT)
        logger.info("joined %s process group: rank %d/%d on %s", info.backend, info.rank, info.world_size, info.device)
    return info


def all_gather_with_grad(tensors: Sequence[Tensor], dist: DistInfo) -> list[Tensor]:
    """Each tensor concatenated over ranks along dim 0 (rank order), differentiable: the gradient of every rank's
    loss w.r.t. the gathered tensor flows back, summed over ranks, into each rank's local slice. Same shapes on
    every rank."""
    if dist.world_size == 1:
        return list(tensors)
    return [_AllGather.apply(t) for t in tensors]


@torch.no_grad()
def all_gather_no_grad(tensors: Sequence[Tensor], dist: DistInfo) -> list[Tensor]:
    """Each tensor concatenated over ranks along dim 0 (rank order), detached; for ids, labels, metrics."""
    if dist.world_size == 1:
        return list(tensors)
    return [_all_gather(t.detach()) for t in tensors]


@torch.no_grad()
def sync_rows(holders: Sequence[HasRows], ids: Tensor, dist: DistInfo) -> None:
    """Make the per-sample state identical on all ranks after each rank updated the rows of its local `ids` [b].

    Pass the ids THIS rank wrote (its local anchors), not the gathered batch. All holders' rows travel with the ids
    in one all-gather of raw bytes (exact for every dtype). An id present on several ranks (or twice on one) gets
    the row of its first occurrence in rank order: the lowest rank wins, on every rank.
    """
    if dist.world_size == 1 or not holders:
        return
    exported = [holder.export_rows(ids) for holder in holders]
    ids_all, *columns = gather_rows([ids.to(torch.long)] + [rows[key] for rows in exported for key in sorted(rows)],
                                    dist)                                     # [W*b] and one [W*b, ...] per field
    first = first_occurrence(ids_all)                                         # [W*b] row index of the winner
    columns = [column[first] for column in columns]                           # duplicates carry equal rows
    for holder, rows in zip(holders, exported):
        keys = sorted(rows)
        holder.import_rows(ids_all, dict(zip(keys, columns[:len(keys)])))
        columns = columns[len(keys):]


@torch.no_grad()
def gather_rows(fields: Sequence[Tensor], dist: DistInfo) -> list[Tensor]:
    """Each field [b, ...] concatenated over ranks along dim 0 ([W*b, ...], rank order), all fields in one all-gather
    of their raw bytes; on `dist.device`. The identity for one process."""
    if dist.world_size == 1:
        return list(fields)
    return unpack_rows(_all_gather(pack_rows(fields).to(dist.device)), fields)


@torch.no_grad()
def exchange_rows(fields: Sequence[Tensor], send_splits: Sequence[int], recv_splits: Sequence[int], dist: DistInfo
                  ) -> list[Tensor]:
    """All-to-all of rows: this rank sends rows [sum(send_splits), ...] of every field, the first send_splits[0] to
    rank 0, the next send_splits[1] to rank 1, ..., and receives [sum(recv_splits), ...] per field, rank 0's first.

    All fields travel in one ``all_to_all_single`` of their raw bytes (uneven splits; gloo and NCCL), on
    `dist.device`. Every rank must pass the splits that agree with the others' (recv_splits[s] here = send_splits[r]
    on rank s). The identity for one process.
    """
    if dist.world_size == 1:
        return list(fields)
    packed = pack_rows(fields).to(dist.device)                               # [sum(send), bytes per row]
    received = packed.new_empty((sum(recv_splits), packed.shape[1]))          # [sum(recv), bytes per row]
    tdist.all_to_all_single(received, packed, output_split_sizes=list(recv_splits),
                            input_split_sizes=list(send_splits))
    return unpack_rows(received, fields)


@torch.no_grad()
def average_gradients(params: Iterable[Tensor], dist: DistInfo) -> None:
    """All-reduce-mean the .grad of parameters outside DDP (e.g. FastCLIP's τ); params without a grad are skipped
    (every rank must agree on which those are)."""
    if dist.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])                  # one collective for all
    tdist.all_reduce(flat)
    flat /= dist.world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def broadcast_object(obj: Any, dist: DistInfo, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects; e.g. a resolved config or a resume path)."""
    if dist.world_size == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=dist.device if dist.backend == "nccl" else None)
    return box[0]


def all_gather_objects(obj: Any, dist: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; e.g. each rank's data position)."""
    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def all_true(flag: Tensor, dist: DistInfo) -> bool:
    """True when the bool scalar `flag` is True on every rank: `all_true_on_device`, then read (a host sync)."""
    return bool(all_true_on_device(flag, dist))


@torch.no_grad()
def all_true_on_device(flag: Tensor, dist: DistInfo) -> Tensor:
    """bool 0-d on the flag's device: True when `flag` is True on every rank (one all-reduce MIN). Nothing is read
    on the host: the caller acts on it with tensor ops (e.g. the non-finite guard)."""
    flag = flag.detach().reshape(()).bool()
    if dist.world_size == 1:
        return flag
    value = flag.to(device=dist.device, dtype=torch.int32)
    tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
    return value.bool()


def all_gather_cpu(tensor: Tensor, dist: DistInfo) -> Tensor:
    """`tensor` (on the CPU, same shape on every rank) concatenated over ranks along dim 0, through a gloo group:
    host data stays on the host and the GPU's queue is not touched (e.g. the loader's ids). The identity for one
    process."""
    if dist.world_size == 1:
        return tensor
    group = _cpu_group(dist)
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    tdist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


_CPU_GROUPS: dict[int, Any] = {}


def _cpu_group(dist: DistInfo) -> Any:
    """The default group when it is gloo, else a gloo group over all ranks, made on first use (a collective call:
    every rank reaches it at the same point) and kept for the process group's life."""
    if dist.backend == "gloo":
        return None
    key = id(tdist.group.WORLD)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS.clear()
        _CPU_GROUPS[key] = tdist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def is_main(dist: DistInfo) -> bool:
    """True on rank 0 (logging, checkpoints, evaluation)."""
    return dist.rank == 0


def barrier(dist: DistInfo) -> None:
    """Wait for all ranks (no-op for one process)."""
    if dist.world_size == 1:
        return
    if dist.backend == "nccl":
        tdist.barrier(device_ids=[dist.device.index])
    else:
        tdist.barrier()


def cleanup(dist: DistInfo) -> None:
    """Leave the process group (no-op for one process or when never joined)."""
    if dist.world_size > 1 and tdist.is_initialized():
        tdist.destroy_process_group()


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each slice's gradient over ranks (a reduce-scatter).

    Written out because torch.distributed.nn.functional.all_gather (which OpenCLIP uses) warns as deprecated from
    torch 2.9 on, and its replacement lives in the private torch.distributed._functional_collectives.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rows = tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()                                                  # [W*b, ...]
        if tdist.get_backend() == "nccl":
            local = grad.new_empty((ctx.rows, *grad.shape[1:]))
            tdist.reduce_scatter_tensor(local, grad)
            return local
        grad = grad.clone()                                                       # all_reduce is in place
        tdist.all_reduce(grad)                                                    # gloo has no reduce-scatter
        return grad.narrow(0, tdist.get_rank() * ctx.rows, ctx.rows)


def _all_gather(tensor: Tensor) -> Tensor:
    """Concatenation over ranks along dim 0 (no autograd)."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, tensor)
    return torch.cat(parts)


def pack_rows(fields: Sequence[Tensor]) -> Tensor:
    """[b, total bytes] uint8: the raw bytes of each field's row i side by side (fields shaped [b, ...])."""
    rows = fields[0].shape[0]
    device = fields[0].device
    return torch.cat([f.detach().to(device).contiguous().reshape(rows, _row_bytes(f) // f.element_size())
                      .view(torch.uint8) for f in fields], dim=1)                # explicit width: rows may be 0


def unpack_rows(packed: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Inverse of `pack_rows` for any number of rows, with dtypes and trailing shapes taken from `like`."""
    if packed.shape[0] == 0:                                                     # no rows: nothing to view
        return [torch.empty((0, *f.shape[1:]), dtype=f.dtype, device=packed.device) for f in like]
    out, start = [], 0
    for field in like:
        width = _row_bytes(field)
        chunk = packed.new_empty((packed.shape[0], width)).copy_(packed[:, start:start + width])   # fresh strides
        chunk = chunk.view(field.dtype)                                        # [R, row numel] (also for R = 1)
        out.append(chunk.reshape(packed.shape[0], *field.shape[1:]))
        start += width
    return out


def _row_bytes(field: Tensor) -> int:
    """Bytes in one row of `field` [b, ...]."""
    per_row = 1
    for size in field.shape[1:]:
        per_row *= size
    return per_row * field.element_size()


def first_occurrence(ids: Tensor) -> Tensor:
    """[R] index of the first position holding the same id as position i (pure tensor code, no host sync)."""
    sorted_ids, order = ids.sort(stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = starts.cumsum(0) - 1                                                  # [R] group of each sorted position
    first_of_group = torch.zeros_like(order).scatter_reduce_(0, group, order, "amin", include_self=False)
    return torch.empty_like(order).scatter_(0, order, first_of_group[group])


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The requested device, with CUDA bound to this process's local rank unless an index is given.

    Modulo the visible GPU count: under `srun --gpus-per-task=1` every task sees its one GPU as cuda:0."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        visible = torch.cuda.device_count()
        dev = torch.device("cuda", local_rank % visible if visible else local_rank)
    return dev


def _require(env: Mapping[str, str], key: str, launcher: str) -> str:
    """env[key], or ValueError naming the missing variable (dinov2's "partially set environment")."""
    value = env.get(key)
    if value is None or value == "":
        present = [k for k in _TORCHRUN_VARS + _SLURM_VARS if k in env]
        raise ValueError(f"Partially set {launcher} environment: {key} is missing (set: {', '.join(present)}); "
                         f"launch with torchrun, or srun with {key} exported, or unset the others for one process")
    return value


def _int_var(env: Mapping[str, str], key: str) -> int:
    """Integer launcher variable, or ValueError naming it."""
    launcher = "SLURM" if key.startswith("SLURM") else "torchrun"
    value = _require(env, key, launcher)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{launcher} environment: {key}={value!r} is not an integer") from None


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    """MASTER_ADDR if set, else the first host of SLURM_NODELIST (e.g. "gpu[003-004,9],cpu1" -> "gpu003")."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("Partially set SLURM environment: MASTER_ADDR is missing and so is SLURM_NODELIST; export "
                         "MASTER_ADDR=$(scontrol show hostnames $SLURM_NODELIST | head -n1)")
    return first_host(nodelist)


def _slurm_master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 40000 (the same on every task of the job)."""
    if env.get("MASTER_PORT"):
        return _int_var(env, "MASTER_PORT")
    if env.get("SLURM_JOB_ID"):
        return 20000 + _int_var(env, "SLURM_JOB_ID") % 40000
    raise ValueError("Partially set SLURM environment: MASTER_PORT is missing and so is SLURM_JOB_ID; "
                     "export MASTER_PORT=<free port> before srun")


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist expression, without calling scontrol: "n[01-04,7]-ib,m2" -> "n01-ib"."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[-,]", match.group(1))[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"SLURM_NODELIST={nodelist!r}: cannot read its first host; export MASTER_ADDR")
    return host
