"""distributed.py: launcher env parsing, the collectives, and the real `train_step` on 2 and 4 gloo processes
against 1 process on the concatenated batch, for every placement of the per-sample state (clip_glofnd/state.py).

Oracle: one process × batch 8 in the default placement (world size 1: every collective is the identity) is the
definition; W ranks × 8/W, rank r holding rows r·b:(r+1)·b of the same global batch, must give the same loss,
weights, λ/m/v/steps, u and τ, whether the state is replicated (on the training device or in CPU memory) or sharded
by id. The ranks are spawned once per module and world size (start-up costs seconds): the 2-rank job runs the
collectives, all three losses replicated and FastCLIP-v3 in the other placements, and writes a sharded checkpoint
after step 1; a 1-process run resumes it for step 2 and writes one; the 4-rank job runs every placement and resumes
that one for step 3 (2 → 1 → 4 processes). The tests compare.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import join_or_kill
import torch
from torch import Tensor, nn

from clip_glofnd import checkpoint, distributed, loop, train
from clip_glofnd.config import from_flat
from clip_glofnd.data import Batch
from clip_glofnd.distributed import DistInfo, dist_info_from_env, first_host
from clip_glofnd.glofnd import GloFND
from clip_glofnd.resume import lr_factor
from clip_glofnd.step import Parts, build_parts, set_lr, train_step

WORLD = 2
SINGLE = DistInfo()

# ---------------------------------------------------------------------------------------------------------- env


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 0, 1, None, None)),
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500"},
     (3, 1, 4, "gloo", "env://")),
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "MASTER_ADDR": "n7", "MASTER_PORT": "1234"},
     (5, 1, 8, "gloo", "tcp://n7:1234")),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[003-004,9],cpu1",
      "SLURM_JOB_ID": "123456"}, (0, 0, 8, "gloo", f"tcp://gpu003:{20000 + 123456 % 40000}")),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}, (0, 0, 1, None, None)),   # one task
    ({"SLURM_NTASKS": "8", "SLURM_NODELIST": "n1"}, (0, 0, 1, None, None)),                         # salloc shell
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",     # torchrun
      "SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16"}, (1, 1, 2, "gloo", "env://")),  # inside srun
])
def test_dist_info_from_env(env: dict[str, str], expected: tuple) -> None:
    info = dist_info_from_env(env, device="cpu")
    assert (info.rank, info.local_rank, info.world_size, info.backend, info.init_method) == expected
    assert info.device == torch.device("cpu")


def test_dist_info_cuda_device_follows_local_rank() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = dist_info_from_env(env, device="cuda")
    assert info.device == torch.device("cuda", 1) and info.backend == "nccl"


@pytest.mark.parametrize("env, missing", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"LOCAL_RANK": "0"}, "RANK"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "SLURM_LOCALID"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "MASTER_PORT": "1"}, "SLURM_NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}, "MASTER_PORT"),
])
def test_partial_env_fails_naming_the_variable(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ValueError, match=f"Partially set .*{missing}"):
        dist_info_from_env(env, device="cpu")


@pytest.mark.parametrize("env", [
    {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
    {"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
])
def test_bad_env_values_fail(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="RANK|rank"):
        dist_info_from_env(env, device="cpu")


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"), ("n[01-04,7]", "n01"), ("n[9,1-3]-ib,m2", "n9-ib"), ("a1,b[1-2]", "a1"),
    ("rack[2-3]-n[010-012]", "rack2-n010"),
])
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_init_distributed_without_launcher_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_distributed("cpu") == SINGLE and not torch.distributed.is_initialized()


def test_single_process_is_identity_without_process_group() -> None:
    x, holder = torch.randn(3, 2), GloFND(4, alpha=0.1)
    assert distributed.all_gather_with_grad([x], SINGLE)[0] is x
    assert distributed.all_gather_no_grad([x], SINGLE)[0] is x
    distributed.sync_rows([holder], torch.tensor([1]), SINGLE)
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.average_gradients([p], SINGLE)
    assert distributed.broadcast_object({"a": 1}, SINGLE) == {"a": 1} and distributed.is_main(SINGLE)
    distributed.barrier(SINGLE)
    distributed.cleanup(SINGLE)
    assert p.grad.tolist() == [3.0, 3.0] and not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------------------ 2-rank harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[[DistInfo], Any], port: int, out: Path, world: int) -> None:
    """Spawned rank: torchrun-like env, init_distributed, run fn, save its result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist = distributed.init_distributed("cpu")
    try:
        result = fn(dist)
    finally:
        distributed.cleanup(dist)
    torch.save(result, out / f"rank{rank}.pt")


def run_ranks(fn: Callable[[DistInfo], Any], out: Path, world: int = WORLD, timeout_s: float = 240.0) -> list[Any]:
    """fn(dist) on `world` gloo CPU processes; returns the per-rank results. A hang fails the test after
    `timeout_s`."""
    context = torch.multiprocessing.spawn(_entry, args=(fn, _free_port(), out, world), nprocs=world, join=False)
    join_or_kill(context, timeout_s, f"{world}-rank job")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------- collectives (2 ranks)


class _Rows:
    """A holder with a 2-D float64 and a bool field (exercises the byte packing beyond GloFND's dtypes)."""

    def __init__(self, n: int) -> None:
        self.a = torch.zeros(n, 3, dtype=torch.float64)
        self.flag = torch.zeros(n, dtype=torch.bool)

    def export_rows(self, ids: Tensor) -> dict[str, Tensor]:
        return {"a": self.a[ids], "flag": self.flag[ids]}

    def import_rows(self, ids: Tensor, rows: dict[str, Tensor]) -> None:
        self.a[ids], self.flag[ids] = rows["a"], rows["flag"]


WRITTEN = ([1, 2, 3], [3, 4, 5, 6])       # rows each rank writes; id 3 on both ranks
SYNCED = ([1, 3, 2, 3], [3, 4, 5, 6])        # ids passed to sync_rows (rank 0 lists id 3 twice)


def _tag(rank: int) -> Tensor:
    return torch.arange(4.0) + 100 * (rank + 1)


def _collectives(dist: DistInfo) -> dict[str, Any]:
    r = dist.rank
    x = (torch.arange(6.0).view(3, 2) + 10 * r).requires_grad_()              # [3, 2] local slice
    weight = torch.randn(3 * WORLD, 2, generator=torch.Generator().manual_seed(r))
    (gathered,) = distributed.all_gather_with_grad([x], dist)
    (gathered * weight).sum().backward()
    (ids_all,) = distributed.all_gather_no_grad([torch.tensor([r, r + 10])], dist)

    fnd, rows, ids = GloFND(8, alpha=0.1), _Rows(8), torch.tensor(WRITTEN[r])
    tag = _tag(r)[:len(ids)]                                                   # distinct value per (rank, row)
    fnd.lam[ids], fnd.m[ids], fnd.v[ids], fnd.steps[ids] = tag, tag + 1, tag + 2, tag.int()
    rows.a[ids], rows.flag[ids] = tag[:, None] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), True
    distributed.sync_rows([fnd, rows], torch.tensor(SYNCED[r]), dist)

    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([1.0, 2.0]) * (r + 1)
    distributed.average_gradients([p, q], dist)
    distributed.barrier(dist)
    send = SPLITS[r]
    recv = [SPLITS[source][r] for source in range(WORLD)]
    exchanged = distributed.exchange_rows(_exchange_fields(r), send, recv, dist)
    return {"gathered": gathered.detach(), "weight": weight, "x_grad": x.grad, "ids_all": ids_all,
            "fnd": fnd.state_dict(), "rows": {"a": rows.a, "flag": rows.flag}, "p_grad": p.grad, "q_grad": q.grad,
            "object": distributed.broadcast_object({"from": r}, dist), "main": distributed.is_main(dist),
            "exchanged": exchanged, "row_gather": distributed.gather_rows([f[:2] for f in _exchange_fields(r)], dist)}


SPLITS = ([1, 3], [0, 2])            # rows rank r sends to rank s (rank 1 sends rank 0 none)


def _exchange_fields(rank: int) -> list[Tensor]:
    """Rows rank `rank` sends, rank 0's first: int64 tags 100·rank + 10·dest + k, float64 [R, 2], bool."""
    tags = torch.tensor([100 * rank + 10 * dest + k for dest, count in enumerate(SPLITS[rank]) for k in range(count)])
    return [tags, torch.stack([tags.double() / 7, -tags.double()], 1), tags % 2 == 1]


@pytest.fixture(scope="module")
def collectives(two_ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["collectives"] for r in two_ranks]


def test_all_gather_with_grad_values_and_gradient(collectives: list[dict[str, Any]]) -> None:
    xs = [torch.arange(6.0).view(3, 2) + 10 * r for r in range(WORLD)]
    for res in collectives:
        torch.testing.assert_close(res["gathered"], torch.cat(xs))
        assert res["ids_all"].tolist() == [0, 10, 1, 11]
    # d/dx_r Σ_r' <gathered_r', weight_r'> = Σ_r' weight_r'[rows of r]: every rank's loss reaches x_r
    total_weight = sum(res["weight"] for res in collectives)
    for r, res in enumerate(collectives):
        torch.testing.assert_close(res["x_grad"], total_weight[3 * r:3 * r + 3])


def test_sync_rows_replicates_and_lower_rank_wins(collectives: list[dict[str, Any]]) -> None:
    lam = torch.ones(8)
    for r in reversed(range(WORLD)):                                           # rank 0 written last: it wins
        lam[torch.tensor(WRITTEN[r])] = _tag(r)[:len(WRITTEN[r])]
    for res in collectives:
        torch.testing.assert_close(res["fnd"]["lam"], lam)
        torch.testing.assert_close(res["fnd"]["v"], torch.where(lam == 1, 0.0, lam + 2))
        assert res["fnd"]["steps"].tolist() == torch.where(lam == 1, 0, lam).int().tolist()
        torch.testing.assert_close(res["rows"]["a"][:, 2], torch.where(lam == 1, 0.0, 3 * lam).double())
        assert res["rows"]["flag"].tolist() == (lam != 1).tolist()
    assert lam[3] == 102.0                                                     # id 3: rank 0's row


def test_exchange_rows_uneven_splits_and_gather_rows(collectives: list[dict[str, Any]]) -> None:
    """Rank s receives, in source-rank order, what each rank sent it (brute force from SPLITS); gather_rows is
    every rank's fields concatenated in rank order."""
    for dest, res in enumerate(collectives):
        tags, values, odd = res["exchanged"]
        expected = [100 * src + 10 * dest + k for src in range(WORLD) for k in range(SPLITS[src][dest])]
        assert tags.tolist() == expected
        torch.testing.assert_close(values, torch.stack([tags.double() / 7, -tags.double()], 1), rtol=0, atol=0)
        assert odd.tolist() == [t % 2 == 1 for t in expected]
        everyone = [[f[:2] for f in _exchange_fields(src)] for src in range(WORLD)]     # 2 rows per rank
        for got, want in zip(res["row_gather"], zip(*everyone)):
            assert torch.equal(got, torch.cat(want))


def test_average_gradients_broadcast_is_main(collectives: list[dict[str, Any]]) -> None:
    for r, res in enumerate(collectives):
        assert res["p_grad"].tolist() == [1.5, 3.0] and res["q_grad"] is None
        assert res["object"] == {"from": 0} and res["main"] == (r == 0)



# --------------------------------------------------- real train_step: 2 ranks × b == 1 process × 2b (clip_glofnd.train)

N, B_LOCAL, STEPS, SNAPSHOT_AT = 16, 4, 3, 2      # 2 steps per epoch: step 2 re-reads rows
LOSSES = ("clip", "sogclr", "fastclip")
MICRO = {"embed_dim": 16,                                  # 1-layer open_clip ViT + text transformer, ~1.7 M params
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
FLAGS = {"batch_size": B_LOCAL, "lr": 1e-3, "warmup": 1, "wd": 0.1, "lr_tau": 1e-2,     # τ moves visibly
         "eps": 1e-4,                   # AdamW turns rounding noise in a zero gradient (attention key bias) into
                                        # steps of ~lr with eps 1e-6; 1e-4 keeps that noise far below 1e-5
         "fnd": "glofnd", "fnd_alpha": 0.2, "fnd_lr": 0.3,                               # λ falls fast: masks bite
         "loss_gamma_min": 0.5, "loss_gamma_decay_epochs": 2}                            # γ changes every epoch


GLOBAL_BATCH = WORLD * B_LOCAL                              # 8 at every world size: 2 × 4, 1 × 8, 4 × 2
DEFAULT = ("train", "replicated")
PLACEMENTS = (DEFAULT, ("cpu", "replicated"), ("train", "by-id"), ("cpu", "by-id"))   # (--state-device, -sharding)
PLACED_LOSS = "fastclip"                                    # every kind of state: λ/m/v/steps × 2, u × 2, τ


def _config(loss: str, model: str, world: int = 1, placement: tuple[str, str] = DEFAULT, **run: Any) -> Any:
    """u ~ exp(sim/τ): τ = 0.1 (not SogCLR's 0.03, where u ~ 1e9) keeps float32 rounding of sims below 1e-5 in u."""
    tau = {} if loss == "clip" else {"loss_tau": 0.1}
    return from_flat({"train_data": "unused", "model": model, "loss": loss, **FLAGS, **tau, "name": "t",
                      "batch_size": GLOBAL_BATCH // world, "state_device": placement[0],
                      "state_sharding": placement[1], **run})


def _data() -> tuple[Tensor, Tensor]:
    """N image–caption pairs in 3 clusters (shared image pattern, shared caption tokens), so that false negatives
    exist; [N, 3, 32, 32] float and [N, 16] long."""
    g = torch.Generator().manual_seed(1)
    cluster = torch.arange(N) % 3
    images = torch.randn(3, 3, 32, 32, generator=g)[cluster] + 0.5 * torch.randn(N, 3, 32, 32, generator=g)
    texts = torch.randint(1, 49406, (3, 16), generator=g)[cluster]
    noisy = torch.rand(N, 16, generator=g) < 0.25                                        # [N, 16] replaced tokens
    texts = torch.where(noisy, torch.randint(1, 49406, (N, 16), generator=g), texts)
    texts[:, -1] = 49407                                                                 # end-of-text: the argmax
    return images, texts


def _global_ids(step: int) -> Tensor:
    """[GLOBAL_BATCH] ids of the global batch at `step`: a fresh permutation of the N samples each epoch."""
    epoch, start = divmod(step * GLOBAL_BATCH, N)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return order[start:start + GLOBAL_BATCH]


def _local_batch(data: tuple[Tensor, Tensor], step: int, dist: DistInfo) -> Batch:
    """This rank's rows of the global batch: rank r gets rows r·b:(r+1)·b."""
    global_ids = _global_ids(step)
    b = len(global_ids) // dist.world_size
    ids = global_ids[dist.rank * b:(dist.rank + 1) * b]                                 # [b] local anchors
    return Batch(data[0][ids], data[1][ids], ids, None)


def _snapshot(parts: Parts, step: int) -> dict[str, Any]:
    """What rank 0 writes as a checkpoint (checkpoint.make_state; no per-sample rows when sharded), plus the rows
    this rank holds and their ids; detached from the live tensors."""
    views = parts.store.views(rows_in_file=not parts.store.sharded)
    return copy.deepcopy({**checkpoint.make_state(
        model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler, fnd_img=views["fnd_img"],
        fnd_txt=views["fnd_txt"], loss_fn=views["loss"], epoch=step, step=step, name="t", config={}, data={}),
        "held_ids": parts.store.held_ids(), "held_rows": parts.store.held_rows()})


def run_steps(loss: str, model: str, dist: DistInfo, start: int = 0, ckpt: dict[str, Any] | None = None,
              placement: tuple[str, str] = DEFAULT, stop: int = STEPS, save_at: int | None = None,
              run_dir: Path | None = None, resume: Path | None = None) -> dict[str, Any]:
    """train_step for steps start..stop-1 on parts from build_parts; per-step metrics, the checkpoint
    state before step SNAPSHOT_AT and at the end. `ckpt`: checkpoint.restore a snapshot first; `resume`: a checkpoint
    file through train.resume; `save_at`: train.save_checkpoints into `run_dir` before that step (or at the end)."""
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = _config(loss, model, dist.world_size, placement, resume=None if resume is None else str(resume))
    parts = build_parts(cfg, dist, create_model(model)[0], num_samples=N)
    if ckpt is not None:
        checkpoint.restore(ckpt, "snapshot", model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler,
                           fnd_img=parts.fnd_img, fnd_txt=parts.fnd_txt, loss_fn=parts.loss_fn)
    if resume is not None:
        assert train.resume(cfg, parts, resume.parent, N)[0].step == start
    data, metrics, snapshot = _data(), [], None
    for step in range(start, stop + 1):
        if step == SNAPSHOT_AT:
            snapshot = _snapshot(parts, step)
        if step == save_at:
            train.save_checkpoints(parts, loop.Progress(epoch=step, step=step), run_dir)
        if step == stop:
            break
        set_lr(parts.optimizer, lr_factor(step, parts.cfg.optim.warmup, STEPS))
        metrics.append(train_step(_local_batch(data, step, dist), parts, epoch=step * GLOBAL_BATCH // N))
    return {"metrics": metrics, "snapshot": snapshot, "final": _snapshot(parts, stop)}


def _run_two(model: str, chain: Path, dist: DistInfo) -> dict[str, Any]:
    """The 2-rank job: collectives; every loss replicated; FastCLIP-v3 in the other placements, the last one
    writing a sharded checkpoint after step 1 (the start of the 2 → 1 → 4 chain)."""
    placed = {placement: run_steps(PLACED_LOSS, model, dist, placement=placement,
                                   **({"save_at": 1, "run_dir": chain / "two"} if placement == PLACEMENTS[-1] else {}))
              for placement in PLACEMENTS[1:]}
    return {"collectives": _collectives(dist), "train": {loss: run_steps(loss, model, dist) for loss in LOSSES},
            "placed": placed}


def _run_four(model: str, chain: Path, dist: DistInfo) -> dict[str, Any]:
    """The 4-rank job: FastCLIP-v3 in every placement; then step 2 resumed from the 1-process checkpoint."""
    placed = {placement: run_steps(PLACED_LOSS, model, dist, placement=placement) for placement in PLACEMENTS}
    resumed = run_steps(PLACED_LOSS, model, dist, start=2, placement=("cpu", "by-id"),
                        resume=checkpoint.checkpoint_dir(chain / "one") / checkpoint.LATEST)
    return {"placed": placed, "resumed": resumed}


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "clip-micro-dist.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folders of the 2 → 1 → 4 resume chain: two/, one/."""
    return tmp_path_factory.mktemp("chain")


@pytest.fixture(scope="module")
def two_ranks(micro_model: str, chain_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The one 2-rank job of this module."""
    return run_ranks(functools.partial(_run_two, micro_model, chain_dir), tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def one_rank(micro_model: str) -> dict[str, Any]:
    return {loss: run_steps(loss, micro_model, SINGLE) for loss in LOSSES}


@pytest.fixture(scope="module")
def chain_one(two_ranks: list[dict[str, Any]], micro_model: str, chain_dir: Path) -> dict[str, Any]:
    """The middle of the chain: 1 process (by-id: one shard) resumes the 2 ranks' sharded checkpoint of step 1, runs
    step 1 and writes its own sharded checkpoint."""
    two = checkpoint.checkpoint_dir(chain_dir / "two")
    return run_steps(PLACED_LOSS, micro_model, SINGLE, start=1, stop=2, placement=("train", "by-id"), save_at=2,
                     run_dir=chain_dir / "one", resume=two / checkpoint.LATEST)


@pytest.fixture(scope="module")
def four_ranks(chain_one: dict[str, Any], micro_model: str, chain_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The one 4-rank job of this module (after the chain's middle, whose checkpoint it resumes)."""
    return run_ranks(functools.partial(_run_four, micro_model, chain_dir), tmp_path_factory.mktemp("four_ranks"),
                     world=4)


STATE_KEYS = ("state_dict", "glofnd", "loss", "optimizer")          # weights; λ/m/v/steps; u (, τ); AdamW moments


def _assembled(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The first snapshot with its per-sample tables put together from the rows the given ranks hold (every id
    exactly once when they are the shards of a sharded run)."""
    tables: dict[str, dict[str, Tensor]] = {}
    covered = torch.zeros(N, dtype=torch.long)
    for snap in snapshots:
        covered[snap["held_ids"]] += 1
        for name, cols in snap["held_rows"].items():
            for key, value in cols.items():
                tables.setdefault(name, {}).setdefault(key, torch.zeros(N, dtype=value.dtype))[snap["held_ids"]] = value
    assert (covered == 1).all() or len(snapshots) == 1, covered.tolist()
    return {**snapshots[0], "glofnd": {"img": tables["fnd_img"], "txt": tables["fnd_txt"]},
            "loss": {**snapshots[0]["loss"], **tables.get("loss", {})}}


def _assert_state_close(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in STATE_KEYS:
        a, e = (actual[key]["state"], expected[key]["state"]) if key == "optimizer" else (actual[key], expected[key])
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5 if key == "loss" else 0,   # u can be ≫ 1
                                   msg=lambda text, key=key: f"{key}: {text}")


def _mean_over_ranks(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Per-step mean of a rank-local metric (every rank has b anchors, so the mean is the global value)."""
    return [sum(values) / len(values) for values in zip(*[[m[key] for m in run["metrics"]] for run in runs])]


def test_last_step_reads_rows_the_other_rank_wrote() -> None:
    """The data order makes the equivalence test a test of the sync: at the last step each rank's anchors include
    samples whose λ / u the other rank wrote in the first epoch."""
    last, first_epoch = _global_ids(STEPS - 1), [_global_ids(s) for s in range(N // (WORLD * B_LOCAL))]
    for rank in range(WORLD):
        mine = set(last[rank * B_LOCAL:(rank + 1) * B_LOCAL].tolist())
        other = {int(i) for ids in first_epoch for i in ids[(1 - rank) * B_LOCAL:(2 - rank) * B_LOCAL]}
        assert mine & other, (rank, mine, other)


@pytest.mark.parametrize("loss", LOSSES)
def test_two_ranks_equal_one_process_through_train_step(loss: str, two_ranks: list[dict[str, Any]],
                                                        one_rank: dict[str, Any]) -> None:
    """Loss, filtered fractions, weights, λ/m/v/steps (img and txt), u, τ and AdamW moments after 3 steps."""
    single, runs = one_rank[loss], [r["train"][loss] for r in two_ranks]
    filtered = [m["filtered_img"] + m["filtered_txt"] for m in single["metrics"]]
    assert filtered[-1] > 0, f"the filter removed no negative at the last step ({filtered}): vacuous test"
    for key in ("loss", "filtered_img", "filtered_txt"):
        torch.testing.assert_close(_mean_over_ranks(runs, key), [m[key] for m in single["metrics"]], atol=1e-5,
                                   rtol=0, msg=lambda text, key=key: f"{key}: {text}")
    for run in runs:
        _assert_state_close(run["final"], single["final"])
    assert int(single["final"]["glofnd"]["img"]["steps"].sum()) == WORLD * B_LOCAL * STEPS   # one update per visit
    if loss == "fastclip":                                                                  # τ was learned
        assert not torch.equal(single["final"]["loss"]["log_inv_tau"], single["snapshot"]["loss"]["log_inv_tau"])


@pytest.mark.parametrize("loss", LOSSES)
def test_checkpoint_of_two_ranks_resumes_at_one(loss: str, two_ranks: list[dict[str, Any]],
                                                one_rank: dict[str, Any], micro_model: str) -> None:
    """Rank 0's checkpoint after SNAPSHOT_AT steps holds what rank 1 holds; checkpoint.restore into a 1-process run
    and the remaining steps give the uninterrupted 1-process result."""
    rank0, rank1 = (r["train"][loss]["snapshot"] for r in two_ranks)
    _assert_state_close(rank1, rank0)                                           # replicated: rank 0 holds it all
    resumed = run_steps(loss, micro_model, SINGLE, start=SNAPSHOT_AT, ckpt=rank0)
    single = one_rank[loss]
    torch.testing.assert_close([m["loss"] for m in resumed["metrics"]],
                               [m["loss"] for m in single["metrics"][SNAPSHOT_AT:]], atol=1e-5, rtol=0)
    _assert_state_close(resumed["final"], single["final"])


def _assert_placed_equal(runs: list[dict[str, Any]], single: dict[str, Any], placement: tuple[str, str]) -> None:
    """W ranks in `placement` == 1 process replicated: per-step loss and filtered fractions, and the final weights,
    λ/m/v/steps, u, τ and AdamW moments (sharded: the ranks' rows put together; replicated: each rank's copy)."""
    for key in ("loss", "filtered_img", "filtered_txt"):
        torch.testing.assert_close(_mean_over_ranks(runs, key), [m[key] for m in single["metrics"]], atol=1e-5,
                                   rtol=0, msg=lambda text, key=key: f"{placement} {key}: {text}")
    finals = [run["final"] for run in runs]
    world = len(runs)
    if placement[1] == "by-id":
        for rank, final in enumerate(finals):                                   # rank r holds ids ≡ r (mod W)
            assert final["held_ids"].tolist() == list(range(rank, N, world))
            assert final["glofnd"] == {"img": {}, "txt": {}}                    # no rows in the main file
        _assert_state_close(_assembled(finals), single["final"])
    else:
        for final in finals:
            _assert_state_close(_assembled([final]), single["final"])


@pytest.mark.parametrize("placement", PLACEMENTS[1:])
def test_two_ranks_equal_one_process_in_every_placement(placement: tuple[str, str], two_ranks: list[dict[str, Any]],
                                                        one_rank: dict[str, Any]) -> None:
    _assert_placed_equal([r["placed"][placement] for r in two_ranks], one_rank[PLACED_LOSS], placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_four_ranks_equal_one_process_in_every_placement(placement: tuple[str, str],
                                                         four_ranks: list[dict[str, Any]],
                                                         one_rank: dict[str, Any]) -> None:
    _assert_placed_equal([r["placed"][placement] for r in four_ranks], one_rank[PLACED_LOSS], placement)


def test_sharded_checkpoint_resumes_two_to_one_to_four(four_ranks: list[dict[str, Any]], chain_one: dict[str, Any],
                                                       one_rank: dict[str, Any], chain_dir: Path,
                                                       micro_model: str) -> None:
    """2 ranks by-id write one shard each after step 1; 1 process resumes (re-partitioned into one shard), runs
    step 2 and writes its shard; 4 ranks resume (re-partitioned into four) and run step 3: same loss per step and
    same final weights, λ/m/v/steps, u, τ and AdamW moments as the uninterrupted 1-process run. open_clip loads
    the main file's weights."""
    two, one = (checkpoint.checkpoint_dir(chain_dir / name) for name in ("two", "one"))
    assert sorted(p.name for p in two.iterdir()) == ["epoch_1.pt", "epoch_latest.pt", "state-step1-rank0-of-2.pt",
                                                      "state-step1-rank1-of-2.pt"]
    assert sorted(p.name for p in one.iterdir()) == ["epoch_2.pt", "epoch_latest.pt", "state-step2-rank0-of-1.pt"]
    main = torch.load(two / checkpoint.LATEST, weights_only=True)
    assert main["state_shards"]["files"] == ["state-step1-rank0-of-2.pt", "state-step1-rank1-of-2.pt"]
    assert main["glofnd"] == {"img": {}, "txt": {}} and set(main["loss"]) == {"log_inv_tau"}
    single = one_rank[PLACED_LOSS]
    assert float(chain_one["metrics"][0]["loss"]) == pytest.approx(float(single["metrics"][1]["loss"]), abs=1e-5)
    resumed = [r["resumed"] for r in four_ranks]
    torch.testing.assert_close(_mean_over_ranks(resumed, "loss"), [single["metrics"][2]["loss"]], atol=1e-5, rtol=0)
    _assert_state_close(_assembled([run["final"] for run in resumed]), single["final"])
    import open_clip
    open_clip.add_model_config(micro_model)
    model = open_clip.create_model_and_transforms(Path(micro_model).stem, pretrained=str(two / "epoch_1.pt"))[0]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, main["state_dict"][key], rtol=0, atol=0)
