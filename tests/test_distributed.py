"""distributed.py: launcher env parsing, and 2 gloo processes on CPU against 1 process on the concatenated batch.

The 2-process jobs run once per module (spawn costs a few seconds) and save their results; the tests compare.
"""
from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_glofnd import distributed
from clip_glofnd.distributed import DistInfo, dist_info_from_env, first_host
from clip_glofnd.glofnd import GloFND

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


def _entry(rank: int, fn: Callable[[DistInfo], Any], port: int, out: Path) -> None:
    """Spawned rank: torchrun-like env, init_distributed, run fn, save its result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist = distributed.init_distributed("cpu")
    try:
        result = fn(dist)
    finally:
        distributed.cleanup(dist)
    torch.save(result, out / f"rank{rank}.pt")


def run_two_ranks(fn: Callable[[DistInfo], Any], out: Path) -> list[Any]:
    """fn(dist) on 2 gloo CPU processes; returns the per-rank results."""
    torch.multiprocessing.spawn(_entry, args=(fn, _free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


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
    return {"gathered": gathered.detach(), "weight": weight, "x_grad": x.grad, "ids_all": ids_all,
            "fnd": fnd.state_dict(), "rows": {"a": rows.a, "flag": rows.flag}, "p_grad": p.grad, "q_grad": q.grad,
            "object": distributed.broadcast_object({"from": r}, dist), "main": distributed.is_main(dist)}


@pytest.fixture(scope="module")
def collectives(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_two_ranks(_collectives, tmp_path_factory.mktemp("collectives"))


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


def test_average_gradients_broadcast_is_main(collectives: list[dict[str, Any]]) -> None:
    for r, res in enumerate(collectives):
        assert res["p_grad"].tolist() == [1.5, 3.0] and res["q_grad"] is None
        assert res["object"] == {"from": 0} and res["main"] == (r == 0)


# ------------------------------------------------------------------- 2 ranks × b == 1 process × 2b (real GloFND)

N, D_IN, D, B_LOCAL, STEPS, SNAPSHOT_AT = 16, 12, 8, 4, 6, 3
LOSSES = ("clip", "sogclr", "fastclip")
LOSS_KWARGS: dict[str, dict[str, Any]] = {   # γ decays within the run, so every epoch's rate is exercised
    "clip": {}, "sogclr": {"tau": 0.1, "gamma_min": 0.5, "gamma_decay_epochs": 2},
    "fastclip": {"tau_init": 0.1, "rho": 6.5, "gamma_min": 0.5, "gamma_decay_epochs": 2},
}


class TwoTower(nn.Module):
    """Tiny linear image / text "encoders" (+ CLIP's learnable logit scale when the loss uses it)."""

    def __init__(self, with_scale: bool) -> None:
        super().__init__()
        self.img, self.txt = nn.Linear(D_IN, D), nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if with_scale else None

    def forward(self, x_img: Tensor, x_txt: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        scale = None if self.logit_scale is None else self.logit_scale.exp()
        return F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1), scale


def _data() -> tuple[Tensor, Tensor]:
    """N paired samples in 4 tight clusters (so false negatives exist and the filter removes some)."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, D_IN, generator=g)
    x = centers[torch.arange(N) % 4]                                           # [N, D_IN] cluster of each sample
    return x + 0.3 * torch.randn(N, D_IN, generator=g), x + 0.3 * torch.randn(N, D_IN, generator=g)


def _global_batch(step: int, world: int) -> tuple[Tensor, int]:
    """Ids of the global batch (world·b) at `step` on a per-epoch permutation, and the epoch."""
    per_epoch = N // (WORLD * B_LOCAL)
    epoch = step // per_epoch
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    start = (step % per_epoch) * WORLD * B_LOCAL
    return order[start:start + WORLD * B_LOCAL], epoch


def _parts(name: str, dist: DistInfo) -> dict[str, Any]:
    from clip_glofnd import losses

    torch.manual_seed(0)
    model = TwoTower(with_scale=name == "clip")
    fnd = {m: GloFND(N, alpha=0.2, lr=0.3, betas=(0.5, 0.9)) for m in ("img", "txt")}   # λ moves fast: masks bite
    loss_fn = losses.create_loss(name, N, **LOSS_KWARGS[name])
    groups = [{"params": list(model.parameters())}, {"params": list(loss_fn.parameters()), "lr": 1e-3}]   # τ: slow
    opt = torch.optim.SGD(groups, lr=0.5, momentum=0.9)
    ddp = nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
    return {"model": model, "ddp": ddp, "fnd": fnd, "loss_fn": loss_fn, "opt": opt}


def _step(parts: dict[str, Any], step: int, data: tuple[Tensor, Tensor], dist: DistInfo) -> dict[str, float]:
    """The train_step recipe of the contract, on this rank's slice of the global batch."""
    global_ids, epoch = _global_batch(step, dist.world_size)
    b = WORLD * B_LOCAL // dist.world_size
    ids = global_ids[dist.rank * b:(dist.rank + 1) * b]                        # [b] local ids
    # forward + gather
    img, txt, scale = parts["ddp"](data[0][ids], data[1][ids])                 # [b, d] each
    img_all, txt_all = distributed.all_gather_with_grad([img, txt], dist)      # [B, d] each
    (ids_all,) = distributed.all_gather_no_grad([ids], dist)                   # [B]
    offset = dist.rank * b
    neg = torch.ones(b, len(ids_all), dtype=torch.bool)
    neg[torch.arange(b), offset + torch.arange(b)] = False                    # [b, B] off the shifted diagonal
    # false-negative filter
    sim_i2t, sim_t2i = (img @ txt_all.T).detach(), (txt @ img_all.T).detach()  # [b, B] each, detached
    parts["fnd"]["img"].update(sim_i2t, ids, epoch, neg)
    parts["fnd"]["txt"].update(sim_t2i, ids, epoch, neg)
    keep_i2t = parts["fnd"]["img"].keep_mask(sim_i2t, ids, epoch, neg)
    keep_t2i = parts["fnd"]["txt"].keep_mask(sim_t2i, ids, epoch, neg)
    # loss
    loss, _ = parts["loss_fn"](img, txt, img_all, txt_all, ids=ids, ids_all=ids_all, epoch=epoch, keep_i2t=keep_i2t,
                               keep_t2i=keep_t2i, offset=offset, logit_scale=scale)
    # backward + step + state sync
    parts["opt"].zero_grad()
    loss.backward()
    distributed.average_gradients(parts["loss_fn"].parameters(), dist)
    parts["opt"].step()
    if hasattr(parts["loss_fn"], "clamp_tau_"):
        parts["loss_fn"].clamp_tau_()
    distributed.sync_rows([parts["fnd"]["img"], parts["fnd"]["txt"], parts["loss_fn"]], ids, dist)
    (losses_all,) = distributed.all_gather_no_grad([loss.detach()[None]], dist)
    (removed,) = distributed.all_gather_no_grad([(~keep_i2t).sum()[None] + (~keep_t2i).sum()], dist)
    return {"loss": losses_all.mean().item(), "removed": int(removed.sum())}


def _state(parts: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({"model": parts["model"].state_dict(), "opt": parts["opt"].state_dict(),
                          "fnd": {m: f.state_dict() for m, f in parts["fnd"].items()},
                          "loss": parts["loss_fn"].state_dict()})


def _load(parts: dict[str, Any], state: dict[str, Any]) -> None:
    parts["model"].load_state_dict(state["model"])
    parts["opt"].load_state_dict(state["opt"])
    for m, f in parts["fnd"].items():
        f.load_state_dict(state["fnd"][m])
    parts["loss_fn"].load_state_dict(state["loss"])


def train(name: str, dist: DistInfo, start: int = 0, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run steps start..STEPS-1 (after loading `state`); per-step metrics, the state at SNAPSHOT_AT and at the end."""
    parts, data = _parts(name, dist), _data()
    if state is not None:
        _load(parts, state)
    metrics, snapshot = [], None
    for step in range(start, STEPS):
        if step == SNAPSHOT_AT:
            snapshot = _state(parts)                                           # what rank 0 would checkpoint
        metrics.append(_step(parts, step, data, dist))
    return {"metrics": metrics, "snapshot": snapshot, "final": _state(parts)}


def _train_all(dist: DistInfo) -> dict[str, Any]:
    return {name: train(name, dist) for name in LOSSES}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_two_ranks(_train_all, tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def one_rank_runs() -> dict[str, Any]:
    return {name: train(name, SINGLE) for name in LOSSES}


def _assert_state_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    torch.testing.assert_close(a["model"], b["model"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["fnd"], b["fnd"], atol=1e-5, rtol=0)          # λ, m, v, steps of both modalities
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-5, rtol=1e-5)     # u_img, u_txt (, τ); u can be ≫ 1


@pytest.mark.parametrize("name", LOSSES)
def test_two_ranks_equal_one_process_on_the_global_batch(
        name: str, two_rank_runs: list[dict[str, Any]], one_rank_runs: dict[str, Any],
) -> None:
    single = one_rank_runs[name]
    assert sum(m["removed"] for m in single["metrics"]) > 0, "the filter never removed a negative: vacuous test"
    for run in (r[name] for r in two_rank_runs):
        losses = [m["loss"] for m in run["metrics"]]
        torch.testing.assert_close(losses, [m["loss"] for m in single["metrics"]], atol=1e-5, rtol=0)
        assert [m["removed"] for m in run["metrics"]] == [m["removed"] for m in single["metrics"]]
        _assert_state_close(run["final"], single["final"])


@pytest.mark.parametrize("name", LOSSES)
def test_state_saved_at_two_ranks_resumes_at_one(
        name: str, two_rank_runs: list[dict[str, Any]], one_rank_runs: dict[str, Any],
) -> None:
    rank0, rank1 = (r[name]["snapshot"] for r in two_rank_runs)
    _assert_state_close(rank1, rank0)                                          # replicated: rank 0 holds it all
    resumed = train(name, SINGLE, start=SNAPSHOT_AT, state=rank0)
    single = one_rank_runs[name]
    torch.testing.assert_close([m["loss"] for m in resumed["metrics"]],
                               [m["loss"] for m in single["metrics"][SNAPSHOT_AT:]], atol=1e-5, rtol=0)
    _assert_state_close(resumed["final"], single["final"])
