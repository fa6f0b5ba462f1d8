"""Checkpoints in OpenCLIP's layout plus the state OpenCLIP does not have: λ, Adam moments, u, τ, data position, RNG.

A file is a dict of tensors and plain python values only, so `torch.load(path, weights_only=True)` reads it and
`open_clip.create_model_and_transforms(arch, pretrained=path)` loads its weights::

    {"state_dict": open_clip keys (DDP unwrapped), "epoch": epochs completed, "step": optimizer steps, "name": run,
     "config": flat config (config.to_flat), "optimizer": ..., "scaler": ..., "glofnd": {"img": {lam, m, v, steps},
     "txt": ...}, "loss": loss_fn.state_dict() (u_img, u_txt, log_inv_tau), "data": {"epoch", "batch",
     "samples_seen"}, "rng": {"torch", "cuda", "numpy", "python"}}

Writes are atomic (a temporary file in the same folder, then os.replace), so a crash never leaves a half-written
`epoch_latest.pt`. The per-sample state is full on every rank, so a checkpoint resumes under any world size.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clip_glofnd.errors import UsageError

logger = logging.getLogger(__name__)

LATEST = "epoch_latest.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """<run_dir>/checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint read with weights_only=True onto the CPU; UsageError when missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:                                        # pickle / zip / EOF errors differ
        raise UsageError(f"--resume {path}: cannot read it ({str(error).splitlines()[0]})") from None
    missing = [key for key in ("state_dict", "epoch", "step", "optimizer") if key not in ckpt]
    if missing:
        raise UsageError(f"--resume {path}: not a clip-glofnd training checkpoint (no {', '.join(missing)}); "
                         f"to start from model weights only, pass it as --pretrained")
    return ckpt


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The file to resume from: None, `run_dir`'s epoch_latest.pt for "latest" (None if the run has none yet), or
    the given path."""
    if resume is None:
        return None
    if resume == "latest":
        latest = checkpoint_dir(run_dir) / LATEST
        return latest if latest.is_file() else None
    return Path(resume)


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and ints (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def plain_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """module.state_dict() of the DDP-unwrapped module as a plain dict (open_clip key names, no "module.")."""
    module = getattr(module, "module", module)
    return {key: value.detach() for key, value in module.state_dict().items()}


def check_compatible(ckpt: dict[str, Any], path: str | Path, num_samples: int) -> None:
    """UsageError when a checkpoint's per-sample state was written for another --num-samples (another data set)."""
    lam = ckpt.get("glofnd", {}).get("img", {}).get("lam")
    if lam is not None and lam.numel() != num_samples:
        raise UsageError(f"--resume {path}: per-sample state for {lam.numel()} samples, this run has "
                         f"{num_samples} (--num-samples / sizes.json); resume on the same data")


def make_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, fnd_img: Any, fnd_txt: Any,
               loss_fn: torch.nn.Module, epoch: int, step: int, name: str, config: dict[str, Any],
               data: dict[str, int]) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring); `epoch` = epochs completed."""
    return {
        "state_dict": plain_state_dict(model), "epoch": epoch, "step": step, "name": name, "config": config,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "glofnd": {"img": dict(fnd_img.state_dict()), "txt": dict(fnd_txt.state_dict())},
        "loss": dict(loss_fn.state_dict()), "data": dict(data), "rng": rng_state(),
    }


def restore(ckpt: dict[str, Any], path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any, fnd_img: Any, fnd_txt: Any, loss_fn: torch.nn.Module) -> None:
    """Load every part of a checkpoint in place (model weights strictly: another architecture is a UsageError)."""
    from clip_glofnd.model import describe_mismatch
    target = getattr(model, "module", model)
    try:
        target.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError:
        raise UsageError(f"--resume {path} does not fit this --model: {describe_mismatch(ckpt['state_dict'], target)}"
                         ) from None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        loss_fn.load_state_dict(ckpt["loss"])
        fnd_img.load_state_dict(ckpt["glofnd"]["img"])
        fnd_txt.load_state_dict(ckpt["glofnd"]["txt"])
    except (ValueError, RuntimeError, KeyError) as error:
        raise UsageError(f"--resume {path}: its optimizer / loss / GloFND state does not fit this run ({error}); "
                         f"resume with the same --loss and data") from None
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
