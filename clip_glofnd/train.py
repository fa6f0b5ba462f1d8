"""`clip-glofnd train` after parsing: one run, from its folder and resume to its summary.

`train` wires the parts together: the run folder (`prepare_run`), the model and the step's parts (`step.build_parts`),
the resume point (`resume`: the newest valid checkpoint, exact to the step), the state warm-up (warmup.py), then per
epoch a loader and `loop.run_epoch`, the epoch's record, checkpoints and evaluation (loop.py). `main` joins the
process group, applies the GPU defaults (TF32, cuDNN autotuning, --precision auto) and prints the summary.

Resume is exact: checkpoints carry the RNG states, each epoch's data order is a function of (seed, epoch), and a
checkpoint written inside an epoch (--save-every-n-steps) carries every rank's data position (data.TrainLoader
.state_dict), so a run killed anywhere and resumed gives the weights, λ and u of an uninterrupted one on a
deterministic (CPU) run. An end-of-epoch checkpoint resumes under another world size and another placement too
(sharded state is re-partitioned on load); the lr schedule then continues from the position it had reached
(resume.continue_schedule).
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_glofnd import checkpoint, distributed
from clip_glofnd.config import TrainConfig, dump, to_flat
from clip_glofnd.data import make_train_loader, resolve_num_samples, split_normalize
from clip_glofnd.distributed import DistInfo, is_main
from clip_glofnd.errors import UsageError
from clip_glofnd.logger import RunLogger
from clip_glofnd.loop import (Progress, end_of_epoch, maybe_evaluate, on_main, run_epoch, save_checkpoints,
                              start_epoch)
from clip_glofnd.model import parse_aug_cfg
from clip_glofnd.resume import changed_settings, continue_schedule, keep_old_config, truncate_metrics
from clip_glofnd.step import Parts, build_parts
from clip_glofnd.warmup import warm_up_state

logger = logging.getLogger(__name__)


def prepare_run(cfg: TrainConfig, dist: DistInfo) -> tuple[TrainConfig, Path]:
    """Resolve --name (same on all ranks), refuse to overwrite a finished run; rank 0 checks the run folder is
    writable, removes temporaries of an interrupted save and writes config.yaml (keeping a different earlier one)."""
    name = cfg.run.name or distributed.broadcast_object(
        f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-{Path(cfg.model.model).stem}-{cfg.loss.name}-{cfg.fnd.variant}", dist)
    cfg = replace(cfg, run=replace(cfg.run, name=name))
    run_dir = Path(cfg.run.logs) / name
    if cfg.run.resume is None and any(checkpoint.checkpoint_dir(run_dir).glob("*.pt")):
        raise UsageError(f"run folder {run_dir} already has checkpoints; pass --resume latest to continue it or "
                         f"another --name")
    on_main(dist, lambda: _prepare_folder(cfg, run_dir))
    return cfg, run_dir


def _prepare_folder(cfg: TrainConfig, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--logs {cfg.run.logs}: cannot write in {run_dir} ({error.strerror or error}); pass a "
                         f"writable --logs") from None
    stale = checkpoint.remove_stale_temps(checkpoint.checkpoint_dir(run_dir))
    if stale:
        logger.info("removed %d temporary file(s) of an interrupted checkpoint write: %s", len(stale),
                    ", ".join(p.name for p in stale))
    text = dump(cfg)
    kept = keep_old_config(run_dir / "config.yaml", text)
    if kept is not None:
        logger.warning("the settings differ from the earlier start's; its config.yaml is kept as %s", kept)
    (run_dir / "config.yaml").write_text(text)


def resume(cfg: TrainConfig, parts: Parts, run_dir: Path, num_samples: int) -> tuple[Progress, dict[str, Any]]:
    """(Progress(), {}) for a fresh start, or everything restored from --resume (latest: this run's newest valid
    checkpoint) with the checkpoint's "data" (+ "path"); metrics.jsonl is cut back to the step the run starts from."""
    found = checkpoint.open_resume(cfg.run.resume, run_dir)
    if found is None:
        on_main(parts.dist, lambda: _cut_metrics(run_dir, 0))
        return Progress(), {}
    path, ckpt = found
    checkpoint.check_compatible(ckpt, path, num_samples)
    views = parts.store.views(rows_in_file="state_shards" not in ckpt)
    checkpoint.restore(ckpt, path, model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler,
                       fnd_img=views.get("fnd_img"), fnd_txt=views.get("fnd_txt"), loss_fn=views["loss"])
    for ids, rows in checkpoint.read_shards(ckpt, path):                     # sharded state: re-partitioned here
        parts.store.load_rows(ids, rows)
    changes = changed_settings(ckpt.get("config", {}), to_flat(cfg))
    if changes and is_main(parts.dist):
        logger.warning("resuming %s with changed settings: %s", path, "; ".join(changes))
    data = dict(ckpt.get("data", {}))
    state = Progress(ckpt["epoch"], ckpt["step"], int(data.get("samples_seen", 0)), int(data.get("batch", 0)))
    state.nonfinite_total = int(data.get("progress", {}).get("nonfinite_total", 0))
    state.nonfinite_in_row = int(data.get("progress", {}).get("nonfinite_in_row", 0))
    state.warmup_epochs = int(data.get("warmup_epochs", 0))
    on_main(parts.dist, lambda: _cut_metrics(run_dir, state.step))
    where = f"epoch {state.epoch + 1}, batch {state.batch}" if state.batch else f"{state.epoch} epochs"
    logger.info("resumed %s: %s done, step %d", path, where, state.step)
    return state, {**data, "path": str(path)}


def _cut_metrics(run_dir: Path, step: int) -> None:
    """metrics.jsonl without the records after `step` (a killed run wrote them; this run writes them again)."""
    dropped = truncate_metrics(run_dir / "metrics.jsonl", step)
    if dropped:
        logger.info("metrics.jsonl: dropped %d records after step %d (the run writes them again)", dropped, step)


def make_loader(cfg: TrainConfig, dist: DistInfo, preprocess: Any, tokenizer: Any, num_samples: int, epoch: int
                ) -> Any:
    """This rank's loader for one epoch (shuffle seeded by (seed, epoch))."""
    data = cfg.data
    return make_train_loader(data.train_data, preprocess=preprocess, tokenizer=tokenizer,
                             batch_size=cfg.optim.batch_size, num_samples=num_samples, epoch=epoch,
                             seed=cfg.run.seed, rank=dist.rank, world_size=dist.world_size, workers=data.workers,
                             caption_key=data.caption_key, skip_bad_samples=data.skip_bad_samples,
                             resampled=data.dataset_resampled, train_num_samples=data.train_num_samples,
                             pin_memory=dist.device.type == "cuda", uint8=uint8_images(cfg, dist))


def uint8_images(cfg: TrainConfig, dist: DistInfo) -> bool:
    """--image-dtype: uint8 images from the workers (auto: on CUDA)."""
    return cfg.data.image_dtype == "uint8" or (cfg.data.image_dtype == "auto" and dist.device.type == "cuda")


def train(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    """Train (or continue) a run; returns a summary: run_dir, epochs, steps, seconds, last epoch means, eval."""
    from clip_glofnd.model import create_model
    began = time.perf_counter()
    if cfg.run.eval_suite:                              # every data set of the suite found before any training
        from clip_glofnd.suite import check_suite
        check_suite(cfg.run.eval_suite, cfg.run.eval_dataset_root)
    seed_everything(cfg.run.seed)
    cfg, run_dir = prepare_run(cfg, dist)
    model, preprocess, preprocess_val, tokenizer = create_model(
        cfg.model.model, cfg.model.pretrained, device=str(dist.device), precision=cfg.model.precision,
        lock_image=cfg.model.lock_image, lock_text=cfg.model.lock_text, aug_cfg=parse_aug_cfg(cfg.model.aug_cfg))
    num_samples = resolve_num_samples(cfg.data.train_data, cfg.data.num_samples)
    parts = build_parts(cfg, dist, model, num_samples)
    if uint8_images(cfg, dist):                                   # the workers stop before ToTensor + Normalize
        parts.image_norm = tuple(torch.tensor(v, device=dist.device) for v in split_normalize(preprocess)[1:])
    state, saved = resume(cfg, parts, run_dir, num_samples)
    log = RunLogger.for_run(run_dir, cfg, enabled=is_main(dist), step=state.step, resumed=bool(saved))
    warm_up_state(parts, state, run_dir, log, save=save_checkpoints,
                  make_loader=lambda epoch: make_loader(cfg, dist, preprocess, tokenizer, num_samples, epoch))
    means: dict[str, float] = {}
    metrics: dict[str, float] = {}
    schedule = None
    for epoch in range(state.epoch, cfg.optim.epochs):
        loader = make_loader(cfg, dist, preprocess, tokenizer, num_samples, epoch)
        schedule = schedule or continue_schedule(saved.get("schedule"), saved.get("steps"), (state.epoch, state.batch),
                                                 (loader.num_batches, cfg.optim.epochs))
        run = start_epoch(parts, loader, schedule, state, saved, num_samples)
        means = run_epoch(parts, run, state, log, run_dir)
        state.epoch, state.batch = state.epoch + 1, 0
        end_of_epoch(parts, state, run_dir, log, means, run.seconds())
        save_checkpoints(parts, state, run_dir, run)
        metrics = maybe_evaluate(parts, state, log, preprocess_val, tokenizer) or metrics
    log.close()
    return {"run_dir": str(run_dir), "epochs": state.epoch, "steps": state.step, "samples_seen": state.samples_seen,
            "seconds": time.perf_counter() - began, **means, **metrics}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the same on every rank: DDP starts from rank 0's weights anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_logging(dist: DistInfo) -> None:
    """Our INFO messages on rank 0, warnings only elsewhere and from libraries (open_clip logs at INFO on the root
    logger); a no-op for handlers when the application has configured logging already."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clip_glofnd").setLevel(logging.INFO if is_main(dist) else logging.WARNING)


def summary_lines(summary: dict[str, Any]) -> Iterator[str]:
    """The end-of-run table `clip-glofnd train` prints: wall time, loss, filtered fractions, eval metrics."""
    yield f"run folder       {summary['run_dir']}"
    yield f"epochs / steps   {summary['epochs']} / {summary['steps']} ({summary['samples_seen']:,} samples)"
    yield f"wall time        {summary['seconds']:.1f} s"
    for key in ("loss", "filtered_img", "filtered_txt", "fn_precision_img", "fn_precision_txt"):
        if key in summary:
            yield f"{key:<16} {summary[key]:.4f}   (mean over the last epoch)"
    for key, value in summary.items():
        if (key.startswith(("zeroshot/", "retrieval/")) and key.endswith(("acc1", "recall@1"))
                or key.startswith(("suite/mean", "suite/group/"))):
            yield f"{key:<16} {value:.4f}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto: amp_bf16 on a CUDA device with bfloat16 (no GradScaler, no fp16 overflow), amp there
    otherwise (OpenCLIP's default), fp32 on any other device (AMP fp16 on a CPU is ~13x slower)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp"


def set_gpu_defaults(device: torch.device) -> None:
    """As OpenCLIP's trainer on CUDA: TF32 matmuls and convolutions, cuDNN autotuning (fixed input shapes)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def main(cfg: TrainConfig) -> int:
    """`clip-glofnd train` after parsing: join the process group, train, print the summary on rank 0."""
    dist = distributed.init_distributed(cfg.model.device)
    _setup_logging(dist)
    set_gpu_defaults(dist.device)
    cfg = replace(cfg, model=replace(cfg.model, precision=resolve_precision(cfg.model.precision, dist.device)))
    if cfg.model.precision == "amp" and dist.device.type == "cpu":
        logger.warning("--precision amp on CPU: fp16 autocast there is ~13x slower than fp32")
    try:
        summary = train(cfg, dist)
    finally:
        distributed.cleanup(dist)
    if is_main(dist):
        print("\n".join(summary_lines(summary)))
    return 0
