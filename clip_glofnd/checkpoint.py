"""Checkpoints in OpenCLIP's layout plus the state OpenCLIP does not have: λ, Adam moments, u, τ, data position, RNG.

A file is a dict of tensors and plain python values only, so `torch.load(path, weights_only=True)` reads it and
`open_clip.create_model_and_transforms(arch, pretrained=path)` loads its weights::

    {"state_dict": open_clip keys (DDP unwrapped), "epoch": epochs completed, "step": optimizer steps, "name": run,
     "config": flat config (config.to_flat), "optimizer": ..., "scaler": ..., "glofnd": {"img": {lam, m, v, steps},
     "txt": ...}, "loss": loss_fn.state_dict() (u_img, u_txt, log_inv_tau), "data": {"epoch", "batch",
     "samples_seen", "progress", "schedule", "steps"; inside an epoch also "loaders" (each rank's data position),
     "means", "seen_all", "epoch_seconds"}, "rng": {"torch", "cuda", "numpy", "python"}}

Writes are atomic (a temporary file in the same folder, then os.replace), so a crash never leaves a half-written
`epoch_latest.pt`; a failed write (disk full) is a one-line error naming the file and the free space, and the previous
file stays. A kill during a write can leave `.NAME.tmp-PID` files: `remove_stale_temps` deletes them at start.
`--resume latest` takes the newest file (by step) of `epoch_latest.pt` and `epoch_N.pt` that loads and validates (zip
CRCs, the keys, finite tensors, the state shards it names), and says why it skipped the others. End-of-epoch files
resume under any world size and placement; a mid-epoch `epoch_latest.pt` (--save-every-n-steps) carries each rank's
data position and needs the same one.

Per-sample state sharded by id (--state-sharding by-id; clip_glofnd/state.py) is not gathered: each rank r of W
writes the rows it holds (ids r, r + W, r + 2W, ...) to its own file beside the main one,
``state-step{S}-rank{r}-of-{W}.pt`` = {"format", "step", "rank", "world_size", "num_samples", "rows": {"fnd_img":
{lam, m, v, steps}, "fnd_txt": ..., "loss": {u_img, u_txt}}}, all ranks in parallel; then rank 0 writes the main
file(s), whose "glofnd" entries are empty, whose "loss" keeps only non-row state (τ), and whose "state_shards" =
{"world_size", "num_samples", "step", "files"} names the shards. The main file is the commit point: shard names
carry the step, so writing a new checkpoint never overwrites the shards an existing one names, and a crash before
the main file leaves the previous checkpoint whole; shards no main file names are deleted after each save. Resume
reads the shards one at a time (memory-mapped; their tensors checked finite as they are read) and each rank keeps
the rows it holds under the new world size and placement, so a checkpoint resumes under any world size, sharded or
not, and a replicated checkpoint resumes into a sharded run. `open_clip.create_model_and_transforms(arch,
pretrained=main file)` loads the weights either way.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clip_glofnd.errors import UsageError

logger = logging.getLogger(__name__)

LATEST = "epoch_latest.pt"
SHARD_FORMAT = "clip_glofnd per-sample state shard v1"
_SHARD_GLOB = "state-step*-rank*-of-*.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """<run_dir>/checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then os.replace onto `path`; UsageError naming the file
    and the free space when the write fails (the previous `path`, if any, is untouched)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:                   # ENOSPC surfaces as torch's "unexpected pos" too
        before = f"the previous {path.name} is intact" if path.is_file() else "no partial file is left"
        raise UsageError(f"cannot write checkpoint {path} ({_first_line(error)}); {_free_space(path.parent)} free "
                         f"there; {before}: free some space or pass another --logs, then --resume latest") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _free_space(folder: Path) -> str:
    """Free bytes on the file system of `folder` (or its nearest existing parent), human-readable."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown space"


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error's text, else its type name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files a killed save left in `folder`; returns them."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp-*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint read with weights_only=True onto the CPU; UsageError when missing, unreadable or not ours."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such checkpoint file")
    ckpt = _read(path)
    missing = [key for key in ("state_dict", "epoch", "step", "optimizer") if key not in ckpt]
    if missing:
        raise UsageError(f"--resume {path}: not a clip-glofnd training checkpoint (no {', '.join(missing)}); "
                         f"to start from model weights only, pass it as --pretrained")
    return ckpt


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    """torch.load(weights_only=True) with a one-line UsageError that never suggests weights_only=False."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:                                        # pickle / zip / EOF errors differ
        raise UsageError(f"--resume {path}: cannot read it ({_why_unreadable(path, error)})") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"--resume {path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why torch.load failed, in words (torch's own text advises weights_only=False, which runs code from the file)."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "empty file, 0 bytes"
    if not zipfile.is_zipfile(path):
        return f"not a complete zip archive, {size} bytes: truncated, or not a torch checkpoint"
    text = " ".join(str(error).split())
    blocked = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if blocked:
        return f"it holds a {blocked.group(1)} object, which weights-only loading refuses"
    reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    return reason.group(1).strip()[:200] if reason else _first_line(error)


def validate(path: str | Path) -> dict[str, Any]:
    """load() plus the file's zip CRCs and finite tensors: a checkpoint safe to resume from; UsageError otherwise."""
    path = Path(path)
    ckpt = load(path)
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        corrupt = _first_line(error)
    if corrupt is not None:
        raise UsageError(f"--resume {path}: corrupt data in {corrupt} (CRC mismatch)")
    bad = nonfinite_entries(ckpt)
    if bad:
        raise UsageError(f"--resume {path}: non-finite values in {', '.join(bad[:3])}")
    for _ in _open_shards(ckpt, path):                                   # every shard it names is there and fits
        pass
    return ckpt


def nonfinite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict / list that hold NaN or inf."""
    return [name for name, tensor in _tensors(tree, prefix) if tensor.is_floating_point() and not _finite(tensor)]


def _finite(tensor: Tensor) -> bool:
    """No NaN / inf in `tensor`: min and max propagate both, in one pass without a [n] bool temporary (12x faster
    than isfinite().all() on a 12 M-row state on the CPU)."""
    if tensor.numel() == 0:
        return True
    low, high = tensor.detach().aminmax()
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _tensors(tree: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}.{i}")


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The file to resume from: None, or the given path. For "latest", the newest valid checkpoint of `run_dir`
    (find_latest); None when the run has no checkpoint file at all (a first start)."""
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume)
    found = find_latest(run_dir)
    return None if found is None else found[0]


def open_resume(resume: str | None, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, validated checkpoint) to resume from, or None: no --resume, or "latest" in a run without checkpoints."""
    if resume is None:
        return None
    if resume == "latest":
        return find_latest(run_dir)
    return Path(resume), validate(resume)


def find_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) of the newest valid file of epoch_latest.pt and epoch_N.pt, by step (epoch_latest.pt first
    on a tie); None when there is no such file. Skipped files are logged with the reason; UsageError when files
    exist but none is valid (a fresh start would overwrite them)."""
    folder = checkpoint_dir(run_dir)
    candidates = [folder / LATEST] + sorted(folder.glob("epoch_*.pt"), key=_epoch_number, reverse=True)
    candidates = list(dict.fromkeys(p for p in candidates if p.is_file()))
    skipped, ranked = [], []
    for path in candidates:
        try:
            ranked.append((int(_read(path, mmap=True)["step"]), path))          # cheap: the tensors stay on disk
        except (UsageError, KeyError, TypeError, ValueError) as error:
            skipped.append(f"{path.name}: {_reason(error)}")
    ranked.sort(key=lambda item: item[0], reverse=True)                          # stable: the order above on ties
    for _, path in ranked:
        try:
            ckpt = validate(path)
        except UsageError as error:
            skipped.append(f"{path.name}: {_reason(error)}")
            continue
        if skipped:
            logger.warning("--resume latest: using %s (step %d); skipped %s", path, ckpt["step"], "; ".join(skipped))
        return path, ckpt
    if skipped:
        raise UsageError(f"--resume latest: no usable checkpoint in {folder} ({'; '.join(skipped)}); move the broken "
                         f"files away to start over, or pass --resume PATH")
    return None


def _epoch_number(path: Path) -> int:
    match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
    return int(match.group(1)) if match else -1


def _reason(error: Exception) -> str:
    """The part of a checkpoint error after the file name."""
    text = str(error) or type(error).__name__
    return text.split(": ", 1)[1] if text.startswith("--resume ") and ": " in text else text


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
    saved = ckpt["state_shards"]["num_samples"] if "state_shards" in ckpt else None if lam is None else lam.numel()
    if saved is not None and saved != num_samples:
        raise UsageError(f"--resume {path}: per-sample state for {saved} samples, this run has "
                         f"{num_samples} (--num-samples / sizes.json); resume on the same data")


def shard_name(step: int, rank: int, world_size: int) -> str:
    """File name of rank `rank`'s per-sample state at optimizer step `step`."""
    return f"state-step{step}-rank{rank}-of-{world_size}.pt"


def shard_manifest(step: int, world_size: int, num_samples: int) -> dict[str, Any]:
    """The main file's "state_shards" entry: which files hold the per-sample rows."""
    return {"world_size": world_size, "num_samples": num_samples, "step": step,
            "files": [shard_name(step, rank, world_size) for rank in range(world_size)]}


def save_shard(folder: str | Path, *, step: int, rank: int, world_size: int, num_samples: int,
               rows: dict[str, dict[str, Tensor]]) -> Path:
    """Write this rank's rows (ids rank, rank + W, ...; {holder: {key: tensor}}) atomically beside the checkpoints."""
    payload = {"format": SHARD_FORMAT, "step": step, "rank": rank, "world_size": world_size,
               "num_samples": num_samples, "rows": rows}
    return save_atomic(payload, Path(folder) / shard_name(step, rank, world_size))


def read_shards(ckpt: dict[str, Any], path: str | Path) -> Iterator[tuple[Tensor, dict[str, dict[str, Tensor]]]]:
    """(global ids [R], rows) of each shard a checkpoint names, one file at a time (memory-mapped); nothing for a
    checkpoint that keeps its per-sample state inside. UsageError naming the file when one is missing, foreign or
    holds non-finite values."""
    for file, ids, shard in _open_shards(ckpt, path):
        bad = nonfinite_entries(shard["rows"])
        if bad:
            raise UsageError(f"--resume {path}: non-finite values in its shard {file.name} ({', '.join(bad[:3])})")
        yield ids, shard["rows"]


def _open_shards(ckpt: dict[str, Any], path: str | Path) -> Iterator[tuple[Path, Tensor, dict[str, Any]]]:
    """(file, ids, memory-mapped shard) of each shard a checkpoint names, checked against its manifest."""
    manifest = ckpt.get("state_shards")
    if manifest is None:
        return
    world, n = manifest["world_size"], manifest["num_samples"]
    for rank, name in enumerate(manifest["files"]):
        file = Path(path).parent / name
        if not file.is_file():
            raise UsageError(f"--resume {path}: its per-sample state shard {file} is missing; every rank's "
                             f"state-step*-rank*-of-{world}.pt file must stay beside the checkpoint")
        shard = _read(file, mmap=True)
        found = {k: shard.get(k) for k in ("format", "step", "rank", "world_size", "num_samples")}
        wanted = {"format": SHARD_FORMAT, "step": manifest["step"], "rank": rank, "world_size": world,
                  "num_samples": n}
        if found != wanted:
            raise UsageError(f"--resume {path}: shard {file} is {found}, the checkpoint expects {wanted}")
        yield file, torch.arange(rank, n, world), shard


def remove_unreferenced_shards(folder: str | Path) -> None:
    """Delete the shard files that no checkpoint in `folder` names (rank 0, after writing). Keeps everything when a
    checkpoint there cannot be read (its shards are unknown)."""
    folder = Path(folder)
    if not any(folder.glob(_SHARD_GLOB)):
        return
    referenced: set[str] = set()
    for main in folder.glob("*.pt"):
        if main.match(_SHARD_GLOB):
            continue
        try:
            ckpt = _read(main, mmap=True)
        except UsageError:                                              # unreadable: keep every shard
            logger.warning("%s cannot be read; its state shards (if any) are unknown, none deleted", main)
            return
        referenced.update(ckpt.get("state_shards", {}).get("files", []))
    for shard in folder.glob(_SHARD_GLOB):
        if shard.name not in referenced:
            shard.unlink(missing_ok=True)


def make_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, fnd_img: Any | None,
               fnd_txt: Any | None, loss_fn: torch.nn.Module, epoch: int, step: int, name: str,
               config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring); `epoch` = epochs completed."""
    return {
        "state_dict": plain_state_dict(model), "epoch": epoch, "step": step, "name": name, "config": config,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "glofnd": {"img": {} if fnd_img is None else dict(fnd_img.state_dict()),       # None: no per-sample λ
                   "txt": {} if fnd_txt is None else dict(fnd_txt.state_dict())},      # (a filter other than glofnd)
        "loss": dict(loss_fn.state_dict()), "data": dict(data), "rng": rng_state(),
    }


def restore(ckpt: dict[str, Any], path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any, fnd_img: Any | None, fnd_txt: Any | None, loss_fn: torch.nn.Module) -> None:
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
        for holder, saved in ((fnd_img, ckpt["glofnd"]["img"]), (fnd_txt, ckpt["glofnd"]["txt"])):
            if holder is not None and saved:          # a run without GloFND saved no λ; one with it starts fresh
                holder.load_state_dict(saved)
    except (ValueError, RuntimeError, KeyError) as error:
        raise UsageError(f"--resume {path}: its optimizer / loss / GloFND state does not fit this run ({error}); "
                         f"resume with the same --loss and data") from None
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
