"""Checkpoints: open_clip-loadable, weights_only-safe, atomic, and a full round trip of every piece of state."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clip_glofnd import checkpoint, train
from clip_glofnd.config import from_flat, to_flat
from clip_glofnd.data import Batch
from clip_glofnd.distributed import DistInfo
from clip_glofnd.errors import UsageError
from clip_glofnd.model import create_model

N = 16


def make_parts(model_name: str = "clip-tiny", seed: int = 0) -> train.Parts:
    """Parts for FastCLIP-v3 + GloFND (the most state: λ/m/v/steps × 2, u × 2, τ, AdamW moments)."""
    torch.manual_seed(seed)
    cfg = from_flat({"train_data": "x", "model": model_name, "batch_size": 8, "loss": "fastclip", "fnd": "glofnd",
                     "fnd_alpha": 0.2, "fnd_lr": 0.3})
    return train.build_parts(cfg, DistInfo(), create_model(model_name)[0], num_samples=N)


def stepped_parts() -> train.Parts:
    parts = make_parts()
    batch = Batch(torch.randn(8, 3, 64, 64), torch.randint(1, 400, (8, 32)), torch.arange(8) * 2, None)
    for _ in range(2):
        train.train_step(batch, parts, epoch=0)
    return parts


def state_of(parts: train.Parts) -> dict:
    return checkpoint.make_state(model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler,
                                 fnd_img=parts.fnd_img, fnd_txt=parts.fnd_txt, loss_fn=parts.loss_fn, epoch=1, step=2,
                                 name="run", config=to_flat(parts.cfg), data={"epoch": 1, "batch": 0,
                                                                               "samples_seen": 16})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, train.Parts]:
    parts = stepped_parts()
    path = checkpoint.save_atomic(state_of(parts), tmp_path_factory.mktemp("ckpt") / "epoch_1.pt")
    return path, parts


def test_weights_only_load_holds_everything(saved: tuple[Path, train.Parts]) -> None:
    path, parts = saved
    ckpt = torch.load(path, weights_only=True)
    assert {"state_dict", "epoch", "step", "name", "config", "optimizer", "scaler", "glofnd", "loss", "data",
            "rng"} <= ckpt.keys()
    assert set(ckpt["glofnd"]["img"]) == {"lam", "m", "v", "steps"} and {"u_img", "u_txt", "log_inv_tau"} <= \
        ckpt["loss"].keys()
    assert (ckpt["glofnd"]["img"]["steps"][::2][:8] == 2).all() and (ckpt["glofnd"]["img"]["lam"][1::2] == 1).all()
    torch.testing.assert_close(ckpt["loss"]["u_txt"], parts.loss_fn.u_txt)


def test_open_clip_loads_our_checkpoint(saved: tuple[Path, train.Parts]) -> None:
    """open_clip.create_model_and_transforms(arch, pretrained=our file) gives our weights."""
    path, parts = saved
    model, _, _ = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(path))
    ours = parts.unwrapped.state_dict()
    assert model.state_dict().keys() == ours.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ours[key], rtol=0, atol=0)


def test_restore_round_trip(saved: tuple[Path, train.Parts]) -> None:
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


def test_restore_refuses_another_architecture(saved: tuple[Path, train.Parts], tmp_path: Path) -> None:
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


def test_atomic_write_never_leaves_a_half_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash inside torch.save keeps the previous file intact and leaves no temporary behind."""
    path = checkpoint.save_atomic({"step": 1, "w": torch.arange(4)}, tmp_path / "epoch_latest.pt")
    real_save = torch.save

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half")                                           # a partial zip header
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2, "w": torch.arange(8)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_latest.pt"]


def test_resolve_resume(tmp_path: Path) -> None:
    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("latest", tmp_path) is None                    # a new run: start fresh
    latest = checkpoint.save_atomic({"x": 1}, checkpoint.checkpoint_dir(tmp_path) / checkpoint.LATEST)
    assert checkpoint.resolve_resume("latest", tmp_path) == latest
    assert checkpoint.resolve_resume("/some/file.pt", tmp_path) == Path("/some/file.pt")
