"""`clip-glofnd train` on 2 gloo processes end to end, then resumed on 1; and benchmarks/sync_share.py --quick.

Two spawned processes get torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and run
`cli.main(["train", ...])` for one epoch on the digits shards with zero-shot evaluation after the epoch (rank 0
evaluates, rank 1 waits at the barrier). Oracles: the ids each rank trained on (recorded around `loop.train_step`),
the state each rank held when the checkpoint was written, and which rank called `checkpoint.save_atomic`. The same
first epoch with `--state-sharding by-id --state-device cpu` must end with the replicated run's weights and state
(slow: two more processes). Every multi-process job has a deadline, so a hang fails instead of blocking CI.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import join_or_kill
import torch

from clip_glofnd import checkpoint, cli, loop, train
from clip_glofnd.logger import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                          # `benchmarks` lives at the repository root, not in the package
    sys.path.insert(0, str(ROOT))

from benchmarks import sync_share  # noqa: E402

WORLD, DEADLINE_S = 2, 300.0
MICRO = {"embed_dim": 16,                              # 1-layer open_clip ViT + text transformer, ~1.7 M params
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
SAMPLES = 64                                           # per epoch: 2 ranks × 2 steps × 16, then 1 rank × 2 steps × 32


def _argv(digits: Path, model: str, logs: Path, batch_size: int, epochs: int, *extra: str) -> list[str]:
    return ["train", "--train-data", str(digits / "train" / "{00000..00011}.tar"), "--train-num-samples",
            str(SAMPLES), "--model", model, "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", "1e-3",
            "--warmup", "1", "--workers", "0", "--log-every-n-steps", "1", "--logs", str(logs), "--name", "run",
            "--loss", "sogclr",
            "--fnd", "glofnd", "--fnd-alpha", "0.05", "--fnd-lr", "0.2", "--fnd-init", "one", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, argv: list[str], port: int, out: Path) -> None:
    """A spawned rank: torchrun's variables, recorders around train_step / save_checkpoints / save_atomic, cli.main."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen: dict[str, Any] = {"ids": [], "saves": [], "state": None}
    step, save_checkpoints, save_atomic = loop.train_step, train.save_checkpoints, checkpoint.save_atomic

    def record_step(batch, parts, *, epoch):
        seen["ids"].append(batch.ids.clone())
        return step(batch, parts, epoch=epoch)

    def record_state(parts, state, run_dir, run=None):                          # what THIS rank holds at save time
        seen["state"] = {"glofnd": {"img": parts.fnd_img.state_dict(), "txt": parts.fnd_txt.state_dict()},
                         "loss": parts.loss_fn.state_dict(), "state_dict": checkpoint.plain_state_dict(parts.model)}
        save_checkpoints(parts, state, run_dir, run)

    def record_save(ckpt, path):
        seen["saves"].append(Path(path).name)
        return save_atomic(ckpt, path)

    loop.train_step, train.save_checkpoints, checkpoint.save_atomic = record_step, record_state, record_save
    rc = cli.main(argv)
    torch.save({"rc": rc, **seen, "ids": torch.cat(seen["ids"])}, out / f"rank{rank}.pt")


def _spawn_ranks(argv: list[str], out: Path) -> list[dict[str, Any]]:
    """`argv` on 2 gloo processes; their records. Fails (after killing them) if they run past DEADLINE_S."""
    context = torch.multiprocessing.spawn(_rank_main, args=(argv, _free_port(), out), nprocs=WORLD, join=False)
    join_or_kill(context, DEADLINE_S, "2-rank `clip-glofnd train`")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """1 epoch on 2 ranks (batch 16 each, zero-shot eval after the epoch), then --resume latest for a 2nd epoch on
    1 process (batch 32: the same global batch)."""
    tmp = tmp_path_factory.mktemp("train_dist")
    model = tmp / "clip-micro-ddp.json"
    model.write_text(json.dumps(MICRO))
    logs = tmp / "logs"
    ranks = _spawn_ranks(_argv(digits_dir, str(model), logs, 16, 1, "--zeroshot-data",
                               str(digits_dir / "wds" / "digits_cls"), "--eval-every", "1"), tmp)
    first = torch.load(logs / "run" / "checkpoints" / "epoch_1.pt", weights_only=True)
    resumed_ids: list[torch.Tensor] = []
    step = loop.train_step

    def record_step(batch, parts, *, epoch):
        resumed_ids.append(batch.ids.clone())
        return step(batch, parts, epoch=epoch)

    loop.train_step = record_step
    try:
        rc = cli.main(_argv(digits_dir, str(model), logs, 32, 2, "--resume", "latest"))
    finally:
        loop.train_step = step
    last = torch.load(logs / "run" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    return {"ranks": ranks, "run_dir": logs / "run", "first": first, "rc": rc, "last": last,
            "resumed_ids": torch.cat(resumed_ids)}


@pytest.fixture(scope="module")
def by_id_run(runs: dict[str, Any], digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The first epoch of `runs` again on 2 ranks, with the per-sample state in CPU memory and sharded by id."""
    tmp = tmp_path_factory.mktemp("train_dist_by_id")
    model = tmp / "clip-micro-ddp.json"
    model.write_text(json.dumps(MICRO))
    ranks = _spawn_ranks(_argv(digits_dir, str(model), tmp / "logs", 16, 1, "--state-sharding", "by-id",
                               "--state-device", "cpu"), tmp)
    return {"ranks": ranks, "folder": checkpoint.checkpoint_dir(tmp / "logs" / "run")}


@pytest.mark.slow              # 2 more processes (~15-30 s); test_distributed.py checks by-id == replicated in CI
def test_two_ranks_by_id_end_with_the_replicated_weights_and_state(runs: dict[str, Any],
                                                                   by_id_run: dict[str, Any]) -> None:
    """`clip-glofnd train --state-sharding by-id --state-device cpu` on 2 processes: each rank writes its shard, rank 0
    the main file naming them; weights, optimizer, λ/m/v/steps and u equal the replicated run's epoch_1.pt."""
    folder, first = by_id_run["folder"], runs["first"]
    assert [r["rc"] for r in by_id_run["ranks"]] == [0, 0]
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt", "epoch_latest.pt", "state-step2-rank0-of-2.pt",
                                                        "state-step2-rank1-of-2.pt"]
    main = torch.load(folder / "epoch_1.pt", weights_only=True)
    torch.testing.assert_close(main["state_dict"], first["state_dict"], atol=1e-5, rtol=0)
    torch.testing.assert_close(main["optimizer"]["state"], first["optimizer"]["state"], atol=1e-5, rtol=0)
    n = first["loss"]["u_img"].numel()
    tables: dict[str, dict[str, torch.Tensor]] = {"img": {}, "txt": {}, "loss": {}}
    covered = torch.zeros(n, dtype=torch.long)
    for ids, rows in checkpoint.read_shards(main, folder / "epoch_1.pt"):      # rank r's file: ids r, r + 2, ...
        covered[ids] += 1
        for name, target in (("fnd_img", "img"), ("fnd_txt", "txt"), ("loss", "loss")):
            for key, value in rows[name].items():
                tables[target].setdefault(key, torch.zeros(n, dtype=value.dtype))[ids] = value
    assert (covered == 1).all()
    for modality in ("img", "txt"):
        torch.testing.assert_close(tables[modality], first["glofnd"][modality], atol=1e-5, rtol=0)
    torch.testing.assert_close(tables["loss"], {k: first["loss"][k] for k in ("u_img", "u_txt")}, atol=1e-5,
                               rtol=1e-5)


def test_two_ranks_train_evaluate_and_rank0_writes_one_full_checkpoint(runs: dict[str, Any]) -> None:
    """Both ranks finish (no hang at the eval barrier); only rank 0 writes; disjoint data; evaluation logged."""
    ranks, first = runs["ranks"], runs["first"]
    assert [r["rc"] for r in ranks] == [0, 0]
    assert ranks[0]["saves"] == ["epoch_1.pt", checkpoint.LATEST] and ranks[1]["saves"] == []
    names = sorted(p.name for p in (runs["run_dir"] / "checkpoints").iterdir())     # no temporary file left over
    assert names == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"]                   # (epoch_2: the resumed run)
    ids0, ids1 = (set(r["ids"].tolist()) for r in ranks)
    assert len(ids0) == len(ids1) == SAMPLES // WORLD and not ids0 & ids1     # each rank its own 32 samples
    assert (first["epoch"], first["step"], first["data"]["samples_seen"]) == (1, 2, SAMPLES)
    records = read_jsonl(runs["run_dir"] / "metrics.jsonl")
    evals = [r for r in records if "zeroshot/digits_cls/acc1" in r]
    assert len(evals) == 1 and evals[0]["epoch"] == 1 and 0.0 <= evals[0]["zeroshot/digits_cls/acc1"] <= 1.0


def test_checkpoint_holds_rows_written_on_both_ranks(runs: dict[str, Any]) -> None:
    """Rank 0's file has learned λ / steps / u exactly for the samples of BOTH ranks (rank 1's arrived by sync_rows),
    and every rank held that same state when the file was written."""
    ranks, first = runs["ranks"], runs["first"]
    trained = torch.zeros_like(first["glofnd"]["img"]["steps"], dtype=torch.bool)
    trained[torch.cat([r["ids"] for r in ranks])] = True                          # [n] samples of either rank
    for modality in ("img", "txt"):
        state = first["glofnd"][modality]
        assert torch.equal(state["steps"], trained.int()), modality               # once each, nothing else
        assert (state["lam"][trained] < 1).all() and (state["lam"][~trained] == 1).all()
    assert torch.equal(first["loss"]["u_img"] > 0, trained) and torch.equal(first["loss"]["u_txt"] > 0, trained)
    for rank in ranks:
        for key in ("glofnd", "loss", "state_dict"):
            torch.testing.assert_close(rank["state"][key], first[key], rtol=0, atol=0, msg=key)


def test_resume_on_one_process_continues_the_state(runs: dict[str, Any]) -> None:
    """The 2-rank checkpoint resumes at world size 1: steps_new = steps_old + 1 on the rows trained in epoch 2,
    every other row (λ, m, v, steps, u) bit-identical to the 2-rank checkpoint."""
    first, last, ids = runs["first"], runs["last"], runs["resumed_ids"]
    assert runs["rc"] == 0
    assert (last["epoch"], last["step"], last["data"]["samples_seen"]) == (2, 4, 2 * SAMPLES)
    assert len(ids) == SAMPLES and len(set(ids.tolist())) == SAMPLES
    touched = torch.zeros_like(first["glofnd"]["img"]["steps"], dtype=torch.bool)
    touched[ids] = True
    for modality in ("img", "txt"):
        old, new = first["glofnd"][modality], last["glofnd"][modality]
        assert torch.equal(new["steps"], old["steps"] + touched.int()), modality
        for key in ("lam", "m", "v"):
            assert torch.equal(new[key][~touched], old[key][~touched]), (modality, key)
            assert not torch.equal(new[key][touched], old[key][touched]), (modality, key)
    for key in ("u_img", "u_txt"):
        assert torch.equal(last["loss"][key][~touched], first["loss"][key][~touched]), key
        assert (last["loss"][key][touched] > 0).all(), key


def test_sync_share_quick(tmp_path: Path) -> None:
    """benchmarks/sync_share.py --quick: 2 ranks, replicated and by-id; JSON with the command, machine, times and byte
    counts (replicated: b rows out, W·b rows in; by-id: the same, plus the fixed-size fetch, W·b rows each way)."""
    out = tmp_path / "sync_share.json"
    assert sync_share.main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sync_share" and "--quick" in result["command"]
    assert result["world_sizes"] == [WORLD] and "under_load" in result["machine"]
    assert sorted(row["sharding"] for row in result["rows"]) == ["by-id", "replicated"]
    for row in result["rows"]:
        b, d = row["batch"], row["embed_dim"]
        assert 0 < row["sync_s"] < row["step_s"] and 0 < row["sync_isolated_s"] < row["step_s"]
        assert row["sync_share_pct"] == pytest.approx(100 * row["sync_s"] / row["step_s"])
        bytes_ = row["bytes"]
        assert bytes_["features_send"] == 2 * b * d * 4 and bytes_["features_recv"] == WORLD * bytes_["features_send"]
        assert bytes_["ids_send"] == bytes_["labels_send"] == 8 * b
        if row["sharding"] == "replicated":                                     # id + GloFND img/txt + u (sogclr)
            assert bytes_["state_rows_send"] == b * (8 + 2 * 16 + 8)
            assert bytes_["state_rows_recv"] == WORLD * bytes_["state_rows_send"]
        else:                                                   # the same all-gather + a fixed all-to-all of W·b
            assert bytes_["state_row_bytes_per_anchor"] == 8 + 2 * 16 + 8                  # rows of 40 B, no ids
            assert bytes_["state_rows_send"] == b * 48 + WORLD * b * 40
            assert bytes_["state_rows_recv"] == WORLD * b * 48 + WORLD * b * 40
            assert row["extrapolated"]["state_rows_recv"] == 64 * b * 48 + 64 * b * 40


# --------------------------------------------------------------- mid-epoch checkpoint, 2 processes (issue 12)
class Crash(Exception):
    """Stands for a job killed right after its step-`CRASH_AT` checkpoint (raised on both ranks at the same step)."""


CRASH_AT = 6                                           # 4 steps per epoch: epoch 2, after batch 2


def _resume_rank_main(rank: int, argvs: dict[str, list[str]], ports: list[int], out: Path) -> None:
    """A spawned rank runs three jobs in turn: straight, crashed after step CRASH_AT, resumed with --resume latest."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    step, calls = loop.train_step, [0]

    def crashing(batch, parts, *, epoch):
        calls[0] += 1
        if calls[0] > CRASH_AT:
            raise Crash
        return step(batch, parts, epoch=epoch)

    os.environ["MASTER_PORT"] = str(ports[0])
    rcs = [cli.main(argvs["straight"])]
    os.environ["MASTER_PORT"], loop.train_step = str(ports[1]), crashing
    try:
        cli.main(argvs["crashed"])
    except Crash:
        rcs.append("crashed")
    finally:
        loop.train_step = step
    if rank == 0:
        shutil.copy(Path(argvs["crashed"][argvs["crashed"].index("--logs") + 1]) / "crashed" / "checkpoints" /
                    checkpoint.LATEST, out / "mid_epoch.pt")
    os.environ["MASTER_PORT"] = str(ports[2])
    rcs.append(cli.main(argvs["resumed"]))
    torch.save({"rc": rcs}, out / f"resume_rank{rank}.pt")


def test_two_ranks_killed_mid_epoch_resume_equals_uninterrupted(digits_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """2 gloo processes, --save-every-n-steps 1: crashed inside epoch 2 and resumed == uninterrupted, bit for bit
    (weights, optimizer, λ/m/v/steps, u), each step once in metrics.jsonl; the mid-epoch checkpoint refuses to
    resume on 1 process, naming the end-of-epoch file to use instead."""
    model = tmp_path / "clip-micro-mid.json"
    model.write_text(json.dumps(MICRO))
    logs = tmp_path / "logs"
    base = _argv(digits_dir, str(model), logs, 16, 2, "--save-every-n-steps", "1", "--train-num-samples", "128")
    argvs = {"straight": base[:base.index("--name") + 1] + ["straight"] + base[base.index("--name") + 2:]}
    argvs["crashed"] = [a if a != "straight" else "crashed" for a in argvs["straight"]]
    argvs["resumed"] = argvs["crashed"] + ["--resume", "latest"]
    context = torch.multiprocessing.spawn(_resume_rank_main, args=(argvs, [_free_port() for _ in range(3)], tmp_path),
                                          nprocs=WORLD, join=False)
    join_or_kill(context, DEADLINE_S, "2-rank crash + resume")
    assert all(torch.load(tmp_path / f"resume_rank{r}.pt")["rc"] == [0, "crashed", 0] for r in range(WORLD))
    a, b = (torch.load(logs / name / "checkpoints" / checkpoint.LATEST, weights_only=True)
            for name in ("straight", "crashed"))
    assert (a["epoch"], a["step"], a["data"]["batch"]) == (b["epoch"], b["step"], b["data"]["batch"]) == (2, 8, 0)
    for key in ("state_dict", "optimizer", "glofnd", "loss"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    records = [r for r in read_jsonl(logs / "crashed" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    mid = torch.load(tmp_path / "mid_epoch.pt", weights_only=True)
    assert (mid["step"], mid["data"]["batch"], len(mid["data"]["loaders"])) == (CRASH_AT, 2, WORLD)
    one = _argv(digits_dir, str(model), logs, 32, 2, "--train-num-samples", "128", "--resume",
                str(tmp_path / "mid_epoch.pt"))
    assert cli.main([x if x != "run" else "one" for x in one]) == 2
    assert "by 2 processes; resume it with 2 processes, or from an end-of-epoch checkpoint" in capsys.readouterr().err
