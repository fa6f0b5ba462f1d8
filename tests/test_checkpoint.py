"""Checkpoints: open_clip-loadable, weights_only-safe, atomic, and a full round trip of every piece of state."""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clip_glofnd import checkpoint
from clip_glofnd.config import from_flat, to_flat
from clip_glofnd.data import Batch
from clip_glofnd.distributed import DistInfo
from clip_glofnd.errors import UsageError
from clip_glofnd.model import create_model
from clip_glofnd.step import Parts, build_parts, train_step

N = 16


def make_parts(model_name: str = "clip-tiny", seed: int = 0) -> Parts:
    """Parts for FastCLIP-v3 + GloFND (the most state: λ/m/v/steps × 2, u × 2, τ, AdamW moments)."""
    torch.manual_seed(seed)
    cfg = from_flat({"train_data": "x", "model": model_name, "batch_size": 8, "loss": "fastclip", "fnd": "glofnd",
                     "fnd_alpha": 0.2, "fnd_lr": 0.3})
    return build_parts(cfg, DistInfo(), create_model(model_name)[0], num_samples=N)


def stepped_parts() -> Parts:
    parts = make_parts()
    batch = Batch(torch.randn(8, 3, 64, 64), torch.randint(1, 400, (8, 32)), torch.arange(8) * 2, None)
    for _ in range(2):
        train_step(batch, parts, epoch=0)
    return parts


def state_of(parts: Parts) -> dict:
    return checkpoint.make_state(model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler,
                                 fnd_img=parts.fnd_img, fnd_txt=parts.fnd_txt, loss_fn=parts.loss_fn, epoch=1, step=2,
                                 name="run", config=to_flat(parts.cfg), data={"epoch": 1, "batch": 0,
                                                                               "samples_seen": 16})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Parts]:
    parts = stepped_parts()
    path = checkpoint.save_atomic(state_of(parts), tmp_path_factory.mktemp("ckpt") / "epoch_1.pt")
    return path, parts


def test_weights_only_load_holds_everything(saved: tuple[Path, Parts]) -> None:
    path, parts = saved
    ckpt = torch.load(path, weights_only=True)
    assert {"state_dict", "epoch", "step", "name", "config", "optimizer", "scaler", "glofnd", "loss", "data",
            "rng"} <= ckpt.keys()
    assert set(ckpt["glofnd"]["img"]) == {"lam", "m", "v", "steps"} and {"u_img", "u_txt", "log_inv_tau"} <= \
        ckpt["loss"].keys()
    assert (ckpt["glofnd"]["img"]["steps"][::2][:8] == 2).all() and (ckpt["glofnd"]["img"]["lam"][1::2] == 1).all()
    torch.testing.assert_close(ckpt["loss"]["u_txt"], parts.loss_fn.u_txt)


def test_open_clip_loads_our_checkpoint(saved: tuple[Path, Parts]) -> None:
    """open_clip.create_model_and_transforms(arch, pretrained=our file) gives our weights."""
    path, parts = saved
    model, _, _ = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(path))
    ours = parts.unwrapped.state_dict()
    assert model.state_dict().keys() == ours.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ours[key], rtol=0, atol=0)


def test_restore_round_trip(saved: tuple[Path, Parts]) -> None:
    """A fresh run restored from the file equals the one that wrote it, RNG streams included."""
    path, parts = saved
    fresh = make_parts(seed=1)
    ckpt = checkpoint.load(path)
    checkpoint.set_rng_state(ckpt["rng"])
    expected_draw = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)                   # scramble
    checkpoint.restore(ckpt, path, model=fresh.model, optimizer=fresh.optimizer, scaler=fresh.scaler,
                       fnd_img=fresh.fnd_img, fnd_txt=fresh.fnd_txt, loss_fn=fresh.loss_fn)
    draw = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(draw[0], expected_draw[0]) and (draw[1] == expected_draw[1]).all()
    assert draw[2] == expected_draw[2]
    torch.testing.assert_close(state_of(fresh)["state_dict"], state_of(parts)["state_dict"], rtol=0, atol=0)
    for key in ("optimizer", "glofnd", "loss"):
        torch.testing.assert_close(state_of(fresh)[key], state_of(parts)[key], rtol=0, atol=0, msg=key)


def test_restore_refuses_another_architecture(saved: tuple[Path, Parts], tmp_path: Path) -> None:
    path, _ = saved
    other = make_parts("RN50")
    with pytest.raises(UsageError, match="does not fit"):
        checkpoint.restore(checkpoint.load(path), path, model=other.model, optimizer=other.optimizer,
                           scaler=other.scaler, fnd_img=other.fnd_img, fnd_txt=other.fnd_txt, loss_fn=other.loss_fn)
    with pytest.raises(UsageError, match="per-sample state for 16"):
        checkpoint.check_compatible(checkpoint.load(path), path, N + 1)


def test_load_refuses_non_training_files(tmp_path: Path) -> None:
    weights_only = tmp_path / "weights.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, weights_only)
    with pytest.raises(UsageError, match="--pretrained"):
        checkpoint.load(weights_only)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="cannot read"):
        checkpoint.load(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="no such"):
        checkpoint.load(tmp_path / "missing.pt")


TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"     # torch.save on a full disk


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), RuntimeError(TORCH_ENOSPC)])
def test_failed_write_is_one_line_and_keeps_the_previous_file(failure: Exception, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full inside torch.save (as OSError or as torch's RuntimeError): a one-line UsageError naming the file and
    the free space; the previous file intact, no temporary left behind."""
    path = checkpoint.save_atomic({"step": 1, "w": torch.arange(4)}, tmp_path / "epoch_latest.pt")

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half")                                          # a partial zip header
        raise failure

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(UsageError) as error:
        checkpoint.save_atomic({"step": 2, "w": torch.arange(8)}, path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "previous epoch_latest.pt is intact" in message
    assert re.search(r"\d+\.\d (KB|MB|GB|TB) free", message) and str(failure).splitlines()[0][:40] in message
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_latest.pt"]


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".epoch_latest.pt.tmp-123").write_bytes(b"half")
    (tmp_path / ".epoch_3.pt.tmp-9").write_bytes(b"half")
    keep = checkpoint.save_atomic({"step": 1}, tmp_path / "epoch_3.pt")
    removed = checkpoint.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".epoch_3.pt.tmp-9", ".epoch_latest.pt.tmp-123"]
    assert list(tmp_path.iterdir()) == [keep]


def fake_checkpoint(step: int, value: float = 1.0) -> dict:
    """The keys checkpoint.load requires, with one small weight tensor."""
    return {"state_dict": {"w": torch.full((64,), value)}, "epoch": step // 2, "step": step, "optimizer": {},
            "glofnd": {"img": {"lam": torch.ones(4)}}}


def break_file(path: Path, how: str) -> None:
    """Damage a checkpoint file the way a kill, a full disk or a bad copy would."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "corrupt":                                                          # one flipped byte in tensor data
        i = data.find(b"\x00\x00\x80\x3f")                                     # a float32 1.0 of "w"
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif how == "nan":
        torch.save(fake_checkpoint(5, float("nan")), path)
    elif how == "unsafe":
        torch.save({**fake_checkpoint(5), "x": Exploit()}, path)


class Exploit:
    def __reduce__(self):
        return (print, ("this ran code from the checkpoint",))


@pytest.mark.parametrize("latest, chosen, reason", [
    ("missing", "epoch_2.pt", None),                           # killed during the first write of epoch_latest.pt
    ("empty", "epoch_2.pt", "empty file, 0 bytes"),
    ("truncated", "epoch_2.pt", "not a complete zip archive"),
    ("corrupt", "epoch_2.pt", "CRC mismatch"),
    ("nan", "epoch_2.pt", "non-finite values in state_dict.w"),
    ("unsafe", "epoch_2.pt", "weights-only loading refuses"),
    ("older", "epoch_2.pt", None),                              # epoch_latest.pt failed to update: order by step
    ("newer", "epoch_latest.pt", None),                         # a mid-epoch save after epoch_2.pt
])
def test_resume_latest_takes_the_newest_valid_checkpoint(latest: str, chosen: str, reason: str | None,
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = checkpoint.checkpoint_dir(tmp_path)
    for epoch in (1, 2):
        checkpoint.save_atomic(fake_checkpoint(2 * epoch), folder / f"epoch_{epoch}.pt")
    if latest != "missing":
        step = {"older": 2, "newer": 5}.get(latest, 4)
        checkpoint.save_atomic(fake_checkpoint(step), folder / checkpoint.LATEST)
        break_file(folder / checkpoint.LATEST, latest)
    with caplog.at_level(logging.WARNING):
        path, ckpt = checkpoint.find_latest(tmp_path)
    assert path.name == chosen and ckpt["step"] == {"epoch_2.pt": 4, "epoch_latest.pt": 5}[chosen]
    assert checkpoint.resolve_resume("latest", tmp_path) == path
    if reason is not None:
        assert f"using {path}" in caplog.text and "skipped epoch_latest.pt: " in caplog.text and reason in caplog.text
    assert "weights_only=False" not in caplog.text and "ran code" not in caplog.text


def test_resume_latest_without_a_usable_file_refuses_to_start_over(tmp_path: Path) -> None:
    """Files exist but none loads: an error naming each (a fresh start would overwrite them); none at all: None."""
    assert checkpoint.find_latest(tmp_path) is None and checkpoint.resolve_resume(None, tmp_path) is None
    folder = checkpoint.checkpoint_dir(tmp_path)
    for name, how in (("epoch_1.pt", "truncated"), (checkpoint.LATEST, "empty")):
        checkpoint.save_atomic(fake_checkpoint(2), folder / name)
        break_file(folder / name, how)
    with pytest.raises(UsageError, match=r"no usable checkpoint .*epoch_latest\.pt: .*empty file.*epoch_1\.pt: .*not "
                                         r"a complete zip") as error:
        checkpoint.find_latest(tmp_path)
    assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)
    assert checkpoint.resolve_resume("/some/file.pt", tmp_path) == Path("/some/file.pt")


def test_load_errors_never_advise_unsafe_loading(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({**fake_checkpoint(1), "x": Exploit()}, path)
    with pytest.raises(UsageError, match="holds a print object, which weights-only loading refuses") as error:
        checkpoint.load(path)
    assert "weights_only" not in str(error.value)


def _rows(rank: int, world: int, n: int) -> dict:
    """A shard's rows, tagged with their global ids (so a mix-up between files shows)."""
    ids = torch.arange(rank, n, world, dtype=torch.float32)
    return {"fnd_img": {"lam": ids / 100}, "loss": {"u_img": ids}}


def test_sharded_state_files_manifest_read_back_and_cleanup(tmp_path: Path) -> None:
    """Each rank's file + a main file naming them: read_shards yields (ids, rows) per file; shards no main file names
    are deleted after a save, the named ones kept; check_compatible reads num_samples from the manifest."""
    n, world = 7, 2
    for rank in range(world):
        checkpoint.save_shard(tmp_path, step=3, rank=rank, world_size=world, num_samples=n, rows=_rows(rank, world, n))
    checkpoint.save_shard(tmp_path, step=1, rank=0, world_size=1, num_samples=n, rows=_rows(0, 1, n))   # stale
    main = {"state_dict": {}, "state_shards": checkpoint.shard_manifest(3, world, n)}
    checkpoint.save_atomic(main, tmp_path / checkpoint.LATEST)
    checkpoint.remove_unreferenced_shards(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_latest.pt", "state-step3-rank0-of-2.pt",
                                                          "state-step3-rank1-of-2.pt"]
    shards = list(checkpoint.read_shards(torch.load(tmp_path / checkpoint.LATEST, weights_only=True),
                                         tmp_path / checkpoint.LATEST))
    assert [ids.tolist() for ids, _ in shards] == [[0, 2, 4, 6], [1, 3, 5]]
    for ids, rows in shards:
        assert rows["loss"]["u_img"].tolist() == ids.float().tolist()
        torch.testing.assert_close(rows["fnd_img"]["lam"], ids.float() / 100)
    checkpoint.check_compatible(main, "ckpt", n)
    with pytest.raises(UsageError, match="per-sample state for 7 samples, this run has 8"):
        checkpoint.check_compatible(main, "ckpt", n + 1)
    assert list(checkpoint.read_shards({"state_dict": {}}, "full.pt")) == []         # state inside the main file


def test_read_shards_refuses_missing_or_foreign_files(tmp_path: Path) -> None:
    main = {"state_shards": checkpoint.shard_manifest(5, 2, 6)}
    checkpoint.save_shard(tmp_path, step=5, rank=0, world_size=2, num_samples=6, rows=_rows(0, 2, 6))
    with pytest.raises(UsageError, match="state-step5-rank1-of-2.pt is missing"):
        list(checkpoint.read_shards(main, tmp_path / "epoch_2.pt"))
    checkpoint.save_shard(tmp_path, step=5, rank=1, world_size=2, num_samples=7, rows=_rows(1, 2, 6))   # other data
    with pytest.raises(UsageError, match="'num_samples': 7.*expects.*'num_samples': 6"):
        list(checkpoint.read_shards(main, tmp_path / "epoch_2.pt"))


def test_cleanup_keeps_every_shard_when_a_checkpoint_is_unreadable(tmp_path: Path) -> None:
    checkpoint.save_shard(tmp_path, step=1, rank=0, world_size=1, num_samples=3, rows=_rows(0, 1, 3))
    (tmp_path / "epoch_1.pt").write_bytes(b"not a zip")
    checkpoint.remove_unreferenced_shards(tmp_path)
    assert (tmp_path / "state-step1-rank0-of-1.pt").is_file()


def test_resume_latest_skips_a_sharded_checkpoint_with_a_missing_or_bad_shard(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """find_latest validates the shards a checkpoint names: a missing shard makes it fall back to the older file;
    non-finite rows are refused when read."""
    folder = checkpoint.checkpoint_dir(tmp_path)
    checkpoint.save_atomic(fake_checkpoint(2), folder / "epoch_1.pt")
    for rank in range(2):
        checkpoint.save_shard(folder, step=4, rank=rank, world_size=2, num_samples=5, rows=_rows(rank, 2, 5))
    checkpoint.save_atomic({**fake_checkpoint(4), "state_shards": checkpoint.shard_manifest(4, 2, 5)},
                           folder / checkpoint.LATEST)
    assert checkpoint.find_latest(tmp_path)[0].name == checkpoint.LATEST
    (folder / "state-step4-rank1-of-2.pt").unlink()
    with caplog.at_level("WARNING"):
        assert checkpoint.find_latest(tmp_path)[0].name == "epoch_1.pt"
    assert "state-step4-rank1-of-2.pt is missing" in caplog.text
    rows = _rows(1, 2, 5)
    rows["loss"]["u_img"][0] = float("nan")
    checkpoint.save_shard(folder, step=4, rank=1, world_size=2, num_samples=5, rows=rows)
    main = torch.load(folder / checkpoint.LATEST, weights_only=True)
    with pytest.raises(UsageError, match=r"non-finite values in its shard state-step4-rank1-of-2.pt \(loss.u_img\)"):
        list(checkpoint.read_shards(main, folder / checkpoint.LATEST))
