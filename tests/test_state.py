"""state.py in one process: every placement gives the default's numbers through the real train_step, rows re-partition
between world sizes, checkpoint views carry full tables, and misuse fails clearly.

Oracles: the default placement (the full tables inside GloFND and the loss, as before state.py existed) for the
training equality; slicing the full table (rows r, r + W, ...) for the shards. Multi-process runs (2 and 4 gloo
ranks, the 2 → 1 → 4 resume chain) are in test_distributed.py.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from clip_glofnd.config import from_flat
from clip_glofnd.data import Batch
from clip_glofnd.distributed import DistInfo
from clip_glofnd.glofnd import GloFND
from clip_glofnd.losses import create_loss
from clip_glofnd.state import StateStore, held_ids, working_rows
from clip_glofnd.step import build_parts, train_step

N, B = 16, 8
MICRO = {"embed_dim": 16,                                  # 1-layer open_clip ViT + text transformer
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PLACEMENTS = [("cpu", "replicated"), ("train", "by-id"), ("cpu", "by-id")]


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "clip-micro-state.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def _train(model: str, device: str, sharding: str) -> dict[str, Any]:
    """3 steps of FastCLIP-v3 + GloFND (quantile warm start) on batches with repeated ids; state, weights, metrics."""
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = from_flat({"train_data": "x", "model": model, "batch_size": B, "loss": "fastclip", "fnd": "glofnd",
                     "fnd_alpha": 0.2, "fnd_lr": 0.3, "fnd_init": "quantile", "lr": 1e-3, "warmup": 1,
                     "state_device": device, "state_sharding": sharding})
    parts = build_parts(cfg, DistInfo(), create_model(model)[0], num_samples=N)
    g = torch.Generator().manual_seed(3)
    metrics = []
    for _ in range(3):
        ids = torch.randint(N, (B,), generator=g)                                   # repeats within a batch
        batch = Batch(torch.randn(B, 3, 32, 32, generator=g), torch.randint(1, 49406, (B, 16), generator=g), ids,
                      None)
        metrics.append(train_step(batch, parts, epoch=0))
    views = parts.store.views()
    return copy.deepcopy({"state": {name: view.state_dict() for name, view in views.items()}, "metrics": metrics,
                          "weights": parts.unwrapped.state_dict(), "rows": working_rows(N, B, device, sharding),
                          "fnd_rows": parts.fnd_img.num_samples})


@pytest.fixture(scope="module")
def default_run(micro_model: str) -> dict[str, Any]:
    return _train(micro_model, "train", "replicated")


@pytest.mark.parametrize("device, sharding", PLACEMENTS)
def test_every_placement_equals_the_default_bit_for_bit(device: str, sharding: str, micro_model: str,
                                                         default_run: dict[str, Any]) -> None:
    """One process: λ/m/v/steps, u, τ, weights and every logged metric identical (rtol = atol = 0)."""
    run = _train(micro_model, device, sharding)
    assert run["fnd_rows"] == B and default_run["fnd_rows"] == N                # working rows vs full tables
    assert run["metrics"] == default_run["metrics"]
    torch.testing.assert_close(run["state"], default_run["state"], rtol=0, atol=0)
    torch.testing.assert_close(run["weights"], default_run["weights"], rtol=0, atol=0)
    assert (default_run["state"]["fnd_img"]["steps"] > 0).any()


def _holders(rows: int) -> dict[str, Any]:
    return {"fnd_img": GloFND(rows, 0.1), "fnd_txt": GloFND(rows, 0.1), "loss": create_loss("sogclr", rows)}


def _full(n: int) -> dict[str, dict[str, torch.Tensor]]:
    """Random full tables of every column ({holder: {key: [n]}})."""
    g = torch.Generator().manual_seed(5)
    glofnd = lambda: {"lam": torch.rand(n, generator=g), "m": torch.rand(n, generator=g),   # noqa: E731
                      "v": torch.rand(n, generator=g), "steps": torch.randint(9, (n,), generator=g, dtype=torch.int32)}
    return {"fnd_img": glofnd(), "fnd_txt": glofnd(), "loss": {"u_img": torch.rand(n, generator=g),
                                                                "u_txt": torch.rand(n, generator=g)}}


def _store(world: int, rank: int, sharding: str = "by-id", device: str = "cpu", n: int = 11) -> StateStore:
    """A store for rank `rank` of `world` (no process group needed: loading and reading rows are local)."""
    return StateStore(_holders(working_rows(n, 4, device, sharding)), n, DistInfo(rank=rank, world_size=world),
                      device=device, sharding=sharding, batch_size=4)


def test_shards_hold_every_wth_row_and_repartition_between_world_sizes() -> None:
    """Full table -> 3 shards (rows r, r + 3, ...) -> 2 shards -> replicated: every step equals slicing the table."""
    n, full = 11, _full(11)
    three = [_store(3, r) for r in range(3)]
    for store in three:
        store.load_rows(torch.arange(n), full)
        assert store.held_ids().tolist() == list(range(store.rank, n, 3)) == held_ids(n, store.rank, 3).tolist()
        torch.testing.assert_close(store.held_rows(), {h: {k: v[store.rank::3] for k, v in cols.items()}
                                                       for h, cols in full.items()}, rtol=0, atol=0)
    two, whole = [_store(2, r) for r in range(2)], _store(2, 1, sharding="replicated")
    for target in two + [whole]:
        for source in three:                                                       # one shard file at a time
            target.load_rows(source.held_ids(), source.held_rows())
    for store in two:
        torch.testing.assert_close(store.held_rows(), {h: {k: v[store.rank::2] for k, v in cols.items()}
                                                       for h, cols in full.items()}, rtol=0, atol=0)
    torch.testing.assert_close(whole.held_rows(), full, rtol=0, atol=0)
    assert whole.held_ids().tolist() == list(range(n))


def test_views_carry_full_tables_across_placements() -> None:
    """A default store's checkpoint view loads into a lending one (and a shard), and back; without rows in the file
    only the holders' other state travels; wrong sizes or keys fail naming them."""
    n, full = 11, _full(11)
    default = _store(1, 0, sharding="replicated", device="train")
    default.load_rows(torch.arange(n), full)
    saved = {name: copy.deepcopy(view.state_dict()) for name, view in default.views().items()}
    assert saved["loss"].keys() == {"u_img", "u_txt"} and saved["fnd_img"]["lam"].shape == (n,)
    for target in (_store(1, 0, sharding="replicated"), _store(2, 1)):
        for name, view in target.views().items():
            view.load_state_dict(saved[name])
        expected = {h: {k: v[target.rank::target.world] for k, v in cols.items()} for h, cols in full.items()}
        torch.testing.assert_close(target.held_rows(), expected, rtol=0, atol=0)
    assert _store(2, 0).views(rows_in_file=False)["fnd_img"].state_dict() == {}
    view = _store(1, 0, sharding="replicated").views()["fnd_img"]
    with pytest.raises(ValueError, match=r"per-sample state for \[12\] samples, this run has 11"):
        view.load_state_dict({k: torch.zeros(12) for k in ("lam", "m", "v", "steps")})
    with pytest.raises(ValueError, match=r"missing per-sample keys \['steps'\]"):
        view.load_state_dict({k: torch.zeros(11) for k in ("lam", "m", "v")})
    with pytest.raises(ValueError, match="keys"):
        _store(2, 0).load_rows(torch.arange(n), {"fnd_img": {"lam": torch.zeros(n)}})


def test_fetch_and_commit_misuse_fail_clearly() -> None:
    store = _store(1, 0, sharding="replicated")
    with pytest.raises(RuntimeError, match="without a fetch"):
        store.commit()
    with pytest.raises(ValueError, match=r"batch of 5 rows.*--batch-size 4"):
        store.fetch(torch.arange(5), torch.arange(5))
    with pytest.raises(ValueError, match=r"1 of 3 ids in the batch outside \[0, 11\).*--num-samples"):
        store.fetch(torch.tensor([0, 11, 3]), torch.tensor([0, 11, 3]))
    with pytest.raises(ValueError, match="device must be one of"):
        StateStore(_holders(4), 11, DistInfo(), device="gpu")


def test_lent_rows_write_back_with_repeated_ids() -> None:
    """fetch hands the math one working row per distinct id; what the math writes there lands on that id."""
    store = _store(1, 0, sharding="replicated")
    ids = torch.tensor([7, 2, 7, 9])
    rows = store.fetch(ids, ids)
    assert rows.tolist() == [0, 1, 0, 3]                                           # first position of each id
    fnd = store.holders["fnd_img"]
    fnd.lam[rows] = torch.tensor([0.5, 0.25, 0.5, -0.5])
    store.commit()
    lam = store.table("fnd_img", "lam")
    assert lam[[7, 2, 9]].tolist() == [0.5, 0.25, -0.5] and (lam[[0, 1, 3, 10]] == 1).all()
    rows = store.fetch(torch.tensor([2, 4]), torch.tensor([2, 4]))                # a skipped step: discard()
    fnd.lam[rows] = 0.0
    store.discard()
    assert lam[[2, 4]].tolist() == [0.25, 1.0]
    with pytest.raises(RuntimeError, match="without a fetch"):
        store.commit()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_tables_with_cuda_training_equal_the_default(micro_model: str, tmp_path: Path) -> None:
    """--state-device cpu on a GPU: pinned, non-blocking row copies give the default's numbers."""
    from clip_glofnd.model import create_model
    results = []
    for device in ("train", "cpu"):
        torch.manual_seed(0)
        cfg = from_flat({"train_data": "x", "model": micro_model, "batch_size": B, "loss": "sogclr", "fnd": "glofnd",
                         "fnd_alpha": 0.2, "state_device": device, "device": "cuda"})
        parts = build_parts(cfg, DistInfo(device=torch.device("cuda", 0)), create_model(micro_model)[0], N)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            batch = Batch(torch.randn(B, 3, 32, 32, generator=g), torch.randint(1, 49406, (B, 16), generator=g),
                          torch.randint(N, (B,), generator=g), None)
            train_step(batch, parts, epoch=0)
        results.append({k: v.cpu() for k, v in parts.store.views()["fnd_img"].state_dict().items()})
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
