"""The training loop of `clip-glofnd train`: OpenCLIP's trainer plus per-sample state that survives restarts.

Per step (`train_step`, the one place where model, filter, loss and collectives meet): features -> gather over
ranks -> the local anchors' per-sample rows (`StateStore.fetch`) -> detached similarities [b, B] -> GloFND for image
anchors and for text anchors (update λ, then mask with the updated λ, as the authors' code does) -> loss -> backward
-> optimizer step -> the rows back to their place (`StateStore.commit`). The per-sample state (λ, Adam moments for
both modalities, the loss's u) lives outside the DDP model, replicated on every rank (on the training device or in
CPU memory) or sharded by id (clip_glofnd/state.py); rank 0 logs, writes checkpoints and evaluates while the others
wait at a barrier. Sharded state is written by every rank into its own file beside rank 0's (checkpoint.py).

Resume is exact: checkpoints carry the RNG states, each epoch's data order is a function of (seed, epoch), and a
checkpoint written inside an epoch (--save-every-n-steps) carries every rank's data position (data.TrainLoader
.state_dict), so a run killed anywhere and resumed gives the weights, λ and u of an uninterrupted one on a
deterministic (CPU) run. An end-of-epoch checkpoint resumes under another world size and another placement too
(sharded state is re-partitioned on load); the lr schedule then continues from the position it had reached
(resume.continue_schedule).

Faults: a step with non-finite features, loss or gradients is skipped on every rank and undone (`_skip_step`), and
the run stops after --max-nonfinite-steps in a row; nothing non-finite is written; a failed save, an unwritable run
folder and a duplicate id across ranks stop every rank with the same one-line error (`on_main`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clip_glofnd import checkpoint, distributed, losses
from clip_glofnd.config import TrainConfig, dump, to_flat
from clip_glofnd.data import Batch, TrainLoader, id_places, make_train_loader, resolve_num_samples
from clip_glofnd.distributed import DistInfo, is_main
from clip_glofnd.errors import TrainingStopped, UsageError
from clip_glofnd.glofnd import GloFND
from clip_glofnd.logger import RunLogger, lambda_quantiles, plot_lambda, progress
from clip_glofnd.model import parse_aug_cfg, train_mode
from clip_glofnd.warmup import warm_up_state
from clip_glofnd.resume import Schedule, changed_settings, continue_schedule, keep_old_config, truncate_metrics
from clip_glofnd.resume import lr_factor  # noqa: F401  (train.lr_factor: the schedule, importable from here too)
from clip_glofnd.seen import SeenIds
from clip_glofnd.shards import resolve_shards
from clip_glofnd.state import StateStore, working_rows

logger = logging.getLogger(__name__)

_LOGIT_SCALE_MAX = math.log(100)               # OpenCLIP clamps logit_scale to [0, ln 100] after each step


@dataclass
class Parts:
    """Everything a step touches. `model` is DDP-wrapped when world_size > 1; the rest is not."""

    cfg: TrainConfig
    dist: DistInfo
    model: nn.Module
    loss_fn: nn.Module
    fnd_img: GloFND                            # thresholds of image anchors (vs all texts)
    fnd_txt: GloFND                            # thresholds of text anchors (vs all images)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    store: StateStore                          # where the per-sample rows of fnd_img, fnd_txt, loss_fn live

    @property
    def unwrapped(self) -> nn.Module:
        """The open_clip model without its DDP wrapper."""
        return getattr(self.model, "module", self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for --precision amp / amp_bf16, nothing for fp32."""
        dtypes = {"amp": torch.float16, "amp_bf16": torch.bfloat16}
        if self.cfg.model.precision not in dtypes:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=dtypes[self.cfg.model.precision])


@dataclass
class Progress:
    """Where the run stands: epochs completed, optimizer steps taken, samples seen (all ranks), batches done in the
    current epoch, and steps skipped for a non-finite loss or gradient (in a row, in all)."""

    epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    batch: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    warmup_epochs: int = 0                     # state warm-up passes done (--state-warmup-epochs)

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))


# --------------------------------------------------------------------------------------------------------- build
def loss_options(cfg: TrainConfig) -> dict[str, Any]:
    """create_loss keyword arguments from --loss-*; unset --loss-tau keeps each loss's own default."""
    options: dict[str, Any] = {"gamma_min": cfg.loss.gamma_min, "gamma_decay_epochs": cfg.loss.gamma_decay_epochs,
                               "rho": cfg.loss.rho}
    if cfg.loss.tau is not None:
        options.update(tau=cfg.loss.tau, tau_init=cfg.loss.tau)
    return options


def make_optimizer(model: nn.Module, loss_fn: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as OpenCLIP: no weight decay on gains, biases and logit_scale; FastCLIP's τ in its own group (--lr-tau).

    Each group carries "base_lr", which the schedule scales.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exclude = [p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    excluded = {id(p) for p in exclude}
    groups = [{"params": exclude, "weight_decay": 0.0, "base_lr": cfg.optim.lr},
              {"params": [p for _, p in named if id(p) not in excluded], "weight_decay": cfg.optim.wd,
               "base_lr": cfg.optim.lr},
              {"params": [p for p in loss_fn.parameters() if p.requires_grad], "weight_decay": 0.0,
               "base_lr": cfg.loss.lr_tau}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UsageError("nothing to train: every parameter is frozen (--lock-image and --lock-text)")
    optim = cfg.optim
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)


def build_parts(cfg: TrainConfig, dist: DistInfo, model: nn.Module, num_samples: int) -> Parts:
    """Loss, both GloFND states and where their rows live, DDP wrapper, optimizer and scaler around a created model.

    In the default placement fnd_img, fnd_txt and loss_fn hold all num_samples rows; otherwise --batch-size working
    rows that the store fills each step (clip_glofnd/state.py)."""
    model = model.to(dist.device)
    rows = working_rows(num_samples, cfg.optim.batch_size, cfg.state.device, cfg.state.sharding)
    loss_fn = losses.create_loss(cfg.loss.name, rows, **loss_options(cfg)).to(dist.device)
    if cfg.loss.name != "clip":
        model.logit_scale.requires_grad_(False)              # SogCLR / FastCLIP own τ
        mirror_temperature(model, loss_fn)
    fnd = cfg.fnd
    fnd_kwargs = dict(alpha=fnd.alpha, lr=fnd.lr, start_epoch=fnd.start_epoch, mask_start_epoch=fnd.mask_start_epoch,
                      mode=fnd.variant, bias_correction=fnd.bias_correction, init=fnd.init, device=dist.device)
    fnd_img, fnd_txt = GloFND(rows, **fnd_kwargs), GloFND(rows, **fnd_kwargs)
    store = StateStore({"fnd_img": fnd_img, "fnd_txt": fnd_txt, "loss": loss_fn}, num_samples, dist,
                       device=cfg.state.device, sharding=cfg.state.sharding, batch_size=cfg.optim.batch_size)
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = make_optimizer(model, loss_fn, cfg)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.model.precision == "amp")
    return Parts(cfg, dist, model, loss_fn, fnd_img, fnd_txt, optimizer, scaler, store)


@torch.no_grad()
def mirror_temperature(model: nn.Module, loss_fn: nn.Module) -> None:
    """SogCLR / FastCLIP own τ: copy log(1/τ) into the model's frozen logit_scale, so the open_clip checkpoint
    carries the temperature the model was trained with."""
    if isinstance(loss_fn, losses.FastCLIPLoss):
        model.logit_scale.copy_(loss_fn.log_inv_tau)
    elif isinstance(loss_fn, losses.SogCLRLoss):
        model.logit_scale.fill_(-math.log(loss_fn.tau))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Every group's lr = its base_lr × factor; returns the first group's lr (the model's)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------------------- step
@torch.no_grad()
def filter_negatives(parts: Parts, img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, batch: Batch,
                     labels_all: Tensor | None, epoch: int, ids: Tensor | None = None,
                     learn_epoch: int | None = None
                     ) -> tuple[Tensor | None, Tensor | None, dict[str, Tensor]]:
    """keep_i2t, keep_t2i [b, B] (None without a filter) and metric tensors: fraction of negatives filtered; when the
    shards carry labels, its share of same-class pairs (fn_precision_*) and the counts fn_true_* (filtered, same
    class), fn_false_* (filtered, other class), fn_present_* (same-class negatives); λ quantiles of the batch.

    `ids` [b]: the anchors' rows in fnd_img / fnd_txt (what `parts.store.fetch` returned; default batch.ids). λ is
    updated first and the masks use the updated λ, the order of the authors' code (vibalcam/GloFND,
    bimodal/src/fast_clip/loss.py: `lda_im.update(...)`, then `lda_im.get_mask(...)`), in one
    `GloFND.update_and_mask` call per modality. λ learns as at `learn_epoch` (default `epoch`; the state
    warm-up passes a later one so that λ learns before --fnd-start-epoch).
    """
    if parts.cfg.fnd.variant == "none":
        return None, None, {}
    if parts.cfg.fnd.variant == "oracle" and batch.labels is None:
        raise UsageError("--fnd oracle needs class labels: the shards have no `cls` member")
    b, B = img.shape[0], img_all.shape[0]
    positive = torch.arange(b, device=img.device) + parts.dist.rank * b               # [b] column of each positive
    sims = {"img": img.detach().float() @ txt_all.detach().float().T,               # [b, B] image anchors vs texts
            "txt": txt.detach().float() @ img_all.detach().float().T}               # [b, B] text anchors vs images
    same = None
    if batch.labels is not None:                                                       # same-class negatives [b, B]
        same = (batch.labels[:, None] == labels_all[None, :]) & (batch.labels[:, None] >= 0)
        same.scatter_(1, positive[:, None], False)
    keeps, stats = {}, {}
    for name, fnd in (("img", parts.fnd_img), ("txt", parts.fnd_txt)):
        keeps[name], lam = fnd.update_and_mask(sims[name], batch.ids if ids is None else ids, epoch,
                                               positive=positive, labels=batch.labels, learn_epoch=learn_epoch,
                                               candidate_labels=labels_all)            # [b, B] True = stays, [b] λ
        is_fn = ~keeps[name]                                                           # [b, B] filtered out (the
        stats[f"filtered_{name}"] = is_fn.sum() / max(b * (B - 1), 1)                  # positive always stays)
        if same is not None:                                                           # against the labels
            stats[f"fn_precision_{name}"] = (is_fn & same).sum() / is_fn.sum().clamp_min(1)
            stats[f"fn_true_{name}"] = (is_fn & same).sum()                            # filtered, same class
            stats[f"fn_false_{name}"] = (is_fn & ~same).sum()                          # filtered, other class
            stats[f"fn_present_{name}"] = same.sum()                                   # same-class negatives
        if parts.cfg.fnd.variant == "glofnd":
            quantiles = torch.quantile(lam, torch.tensor([0.1, 0.5, 0.9], device=lam.device))   # this batch's anchors
            stats.update({f"lam_{name}_p{p}": q for p, q in zip((10, 50, 90), quantiles)})
    return keeps["img"], keeps["txt"], stats


def _encode(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """(image features [b, d], text features [b, d], exp(logit_scale)) from the open_clip model's forward."""
    out = model(batch.images, batch.texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def _micro_batches(batch: Batch, accum: int) -> list[Batch]:
    """The batch split into `accum` consecutive micro-batches (fewer when the batch is smaller)."""
    if accum == 1:
        return [batch]
    parts = [t.tensor_split(accum) if t is not None else [None] * accum
             for t in (batch.images, batch.texts, batch.ids, batch.labels)]
    return [Batch(*chunk) for chunk in zip(*parts) if len(chunk[2])]


@torch.no_grad()
def _cached_features(parts: Parts, micro: list[Batch]) -> tuple[list[Tensor], list[Tensor]] | None:
    """Features of every micro-batch without gradient (only with accumulation)."""
    if len(micro) == 1:
        return None
    with parts.autocast():
        features = [_encode(parts.model, chunk)[:2] for chunk in micro]
    return [f[0] for f in features], [f[1] for f in features]


def _splice(cached: tuple[list[Tensor], list[Tensor]] | None, j: int, img_j: Tensor, txt_j: Tensor
            ) -> tuple[Tensor, Tensor]:
    """The local batch's features [b, d] with micro-batch j's fresh (differentiable) rows in place."""
    if cached is None:
        return img_j, txt_j
    imgs, txts = list(cached[0]), list(cached[1])
    imgs[j], txts[j] = img_j, txt_j
    return torch.cat(imgs), torch.cat(txts)


def prepare_batch(batch: Batch, parts: Parts) -> tuple[Batch, Tensor, Tensor, Tensor | None]:
    """The batch on the training device, every rank's ids [B], this rank's anchors' rows in fnd_* and loss_fn [b]
    (`parts.store.fetch`: a step must end with `parts.store.commit()` or `discard()`), every rank's labels [B] or
    None."""
    batch = batch.to(parts.dist.device, non_blocking=True)
    ids_all, = distributed.all_gather_no_grad([batch.ids], parts.dist)                  # [B]
    state_ids = parts.store.fetch(batch.ids, ids_all)                                   # [b]
    labels_all = None if batch.labels is None else distributed.all_gather_no_grad([batch.labels], parts.dist)[0]
    return batch, ids_all, state_ids, labels_all


def train_step(batch: Batch, parts: Parts, *, epoch: int) -> dict[str, float]:
    """One optimizer step on one batch; returns floats for logging (loss, temperature, filtered fractions, λ, and
    "nonfinite": 1.0 when the step was skipped).

    With --accum-freq A > 1 (CLIP loss only; config refuses the others, whose u would be updated A times) features of
    all micro-batches are computed without gradient first; then each micro-batch is recomputed with gradient and the
    loss of the whole batch is backpropagated through its slice only (OpenCLIP's scheme, gradient equal to the
    unsplit batch's). λ is updated and masks built once per step, on the whole batch; logit_scale gets its gradient
    from the last pass only.

    Non-finite guard (as AMP's GradScaler): non-finite gathered features, loss or gradients on any rank skip the
    step on every rank: no weight update, and the batch's λ / u rows and the model's buffers are put back.
    """
    cfg, dist = parts.cfg, parts.dist
    batch, ids_all, state_ids, labels_all = prepare_batch(batch, parts)
    b = len(batch)
    micro = _micro_batches(batch, cfg.optim.accum_freq)
    undo = _before_step(parts, state_ids)
    parts.optimizer.zero_grad(set_to_none=True)
    cached = _cached_features(parts, micro)
    for j, chunk in enumerate(micro):
        last = j == len(micro) - 1
        no_sync = parts.model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext()
        with no_sync:
            # forward
            with parts.autocast():
                img_j, txt_j, logit_scale = _encode(parts.model, chunk)                  # [b_j, d], [b_j, d], []
            img, txt = _splice(cached, j, img_j, txt_j)                                 # [b, d] grad via slice j
            img_all, txt_all = distributed.all_gather_with_grad([img, txt], dist)       # [B, d]
            # false-negative filter (detached; once per step), on finite features only
            if j == 0:
                if not bool(torch.isfinite(img_all).all() & torch.isfinite(txt_all).all()):   # same on all ranks
                    return _skip_step(parts, undo)
                keep_i2t, keep_t2i, fnd_stats = filter_negatives(parts, img, txt, img_all, txt_all, batch,
                                                                 labels_all, epoch, ids=state_ids)
            # loss
            loss, loss_metrics = parts.loss_fn(
                img, txt, img_all, txt_all, ids=state_ids, ids_all=ids_all, epoch=epoch, keep_i2t=keep_i2t,
                keep_t2i=keep_t2i, offset=dist.rank * b, logit_scale=logit_scale if last else logit_scale.detach())
            # backward
            parts.scaler.scale(loss).backward()
    if not _finite_step(parts, loss):
        return _skip_step(parts, undo)
    _optimizer_step(parts)
    # per-sample state: each rank wrote the rows of its own anchors; back to where they live (all ranks agree)
    parts.store.commit()
    values = torch.stack([loss.detach().float(), *[v.float() for v in fnd_stats.values()]]).tolist()
    return {"loss": values[0], **loss_metrics, **dict(zip(fnd_stats, values[1:])), "nonfinite": 0.0}


@dataclass
class _Undo:
    """What a step writes besides weights and optimizer: the per-sample rows of its anchors and the model's floating
    buffers (BatchNorm statistics), as they were before it."""

    ids: Tensor
    rows: list[dict[str, Tensor]]
    buffers: list[tuple[Tensor, Tensor]]


@torch.no_grad()
def _before_step(parts: Parts, ids: Tensor) -> _Undo:
    rows = [{key: value[ids.to(value.device)].clone() for key, value in holder.state_dict().items()}
            for holder in (parts.fnd_img, parts.fnd_txt)] + [parts.loss_fn.export_rows(ids)]
    buffers = [(buf, buf.clone()) for buf in parts.unwrapped.buffers() if buf.is_floating_point()]
    return _Undo(ids, rows, buffers)


@torch.no_grad()
def _skip_step(parts: Parts, undo: _Undo) -> dict[str, float]:
    """Drop the step's gradients and put back its per-sample rows and buffers; the metrics of a skipped step. Rows
    lent by the store (placements other than the default) are dropped, never written back."""
    parts.optimizer.zero_grad(set_to_none=True)
    for holder, rows in zip((parts.fnd_img, parts.fnd_txt, parts.loss_fn), undo.rows):
        holder.import_rows(undo.ids, rows)
    parts.store.discard()
    for buf, old in undo.buffers:
        buf.copy_(old)
    return {"loss": math.nan, "nonfinite": 1.0}


def _finite_step(parts: Parts, loss: Tensor) -> bool:
    """Loss and gradients finite on every rank (one all-reduce). With --precision amp the GradScaler judges the
    gradients itself (an inf there is a scale to lower, not a fault) and only the loss is checked."""
    flag = torch.isfinite(loss.detach()).all()
    if not parts.scaler.is_enabled():
        grads = [p.grad for group in parts.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            flag = flag & torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
    return distributed.all_true(flag, parts.dist)


def _optimizer_step(parts: Parts) -> None:
    """Average the loss's own gradients (FastCLIP's τ, outside DDP), clip, step, then project τ / logit_scale."""
    loss_params = [p for p in parts.loss_fn.parameters() if p.requires_grad]
    distributed.average_gradients(loss_params, parts.dist)
    if parts.cfg.optim.grad_clip_norm is not None:
        parts.scaler.unscale_(parts.optimizer)
        params = [p for group in parts.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, parts.cfg.optim.grad_clip_norm)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    with torch.no_grad():
        if hasattr(parts.loss_fn, "clamp_tau_"):
            parts.loss_fn.clamp_tau_()
            mirror_temperature(parts.unwrapped, parts.loss_fn)
        if parts.cfg.loss.name == "clip":
            parts.unwrapped.logit_scale.clamp_(0, _LOGIT_SCALE_MAX)


# --------------------------------------------------------------------------------------------------------- epoch
class _RunningMeans:
    """Epoch means of the summary metrics; the filter's precision only over steps that filtered something; skipped
    (non-finite) steps do not count."""

    KEYS = ("loss", "filtered_img", "filtered_txt", "fn_precision_img", "fn_precision_txt")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        if metrics.get("nonfinite"):
            return
        for key in self.KEYS:
            if key not in metrics or (key.startswith("fn_precision") and not metrics[f"filtered{key[12:]}"]):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + metrics[key]
            self.counts[key] = self.counts.get(key, 0) + 1

    def result(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def state_dict(self) -> dict[str, dict]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])


@dataclass
class EpochRun:
    """One epoch in progress: its loader and lr schedule, running means, the first-pass ids any rank trained (only
    with several processes: the loader checks its own), and the seconds spent in it before a resume."""

    loader: TrainLoader
    schedule: Schedule
    means: _RunningMeans
    seen_all: SeenIds | None
    elapsed: float = 0.0
    began: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.began


def start_epoch(parts: Parts, loader: TrainLoader, schedule: Schedule, state: Progress, saved: dict[str, Any],
                num_samples: int) -> EpochRun:
    """The EpochRun of this epoch; inside an epoch (resumed from a mid-epoch checkpoint) with every rank's data
    position, the running means and the seen ids of the checkpoint."""
    several = parts.dist.world_size > 1 and loader.seen is not None
    run = EpochRun(loader, schedule, _RunningMeans(), SeenIds(num_samples) if several else None)
    if not state.batch:
        return run
    positions, path = saved["loaders"], saved["path"]
    if len(positions) != parts.dist.world_size:
        raise UsageError(f"--resume {path}: written inside epoch {state.epoch + 1} by {len(positions)} processes; "
                         f"resume it with {len(positions)} processes, or from an end-of-epoch checkpoint (--resume "
                         f"{Path(path).with_name(f'epoch_{state.epoch}.pt')}) on any number")
    try:
        loader.load_state_dict(positions[parts.dist.rank])
    except UsageError as error:
        raise UsageError(f"--resume {path}: {error}") from None
    run.means.load_state_dict(saved["means"])
    if run.seen_all is not None and saved.get("seen_all") is not None:
        run.seen_all.load_state_dict(saved["seen_all"])
    run.elapsed = float(saved.get("epoch_seconds", 0.0))
    return run


def run_epoch(parts: Parts, run: EpochRun, state: Progress, log: RunLogger, run_dir: Path) -> dict[str, float]:
    """Train one epoch (or its rest, after a mid-epoch resume); per-step JSONL records; checkpoints every
    --save-every-n-steps; returns epoch means of loss, filtered fractions, filter precision."""
    cfg, dist, loader = parts.cfg, parts.dist, run.loader
    train_mode(parts.model)                                                  # locked towers stay in eval mode
    bar = progress(loader, total=loader.num_batches - state.batch, enabled=is_main(dist),
                   desc=f"epoch {state.epoch + 1}")
    tick = time.perf_counter()
    for batch in bar:
        # schedule position from (epoch, batch), not the step counter: right after a resume on another world size
        lr = set_lr(parts.optimizer, run.schedule.factor(state.epoch * loader.num_batches + state.batch,
                                                         cfg.optim.warmup))
        check_across_ranks(batch, run, parts)
        start = time.perf_counter()
        metrics = train_step(batch, parts, epoch=state.epoch)
        now = time.perf_counter()
        state.step, state.batch = state.step + 1, state.batch + 1
        state.samples_seen += len(batch) * dist.world_size
        run.means.add(metrics)
        speed = len(batch) * dist.world_size / max(now - tick, 1e-9)
        if state.step % cfg.run.log_every_n_steps == 0 or metrics["nonfinite"]:
            log.log({"step": state.step, "epoch": state.epoch, "lr": lr, **metrics, "samples_seen": state.samples_seen,
                     "step_time": now - start, "data_time": start - tick, "samples_per_s": speed})
        count_nonfinite(metrics, state, cfg, lr)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", samples_per_s=f"{speed:.0f}", refresh=False)
        every = cfg.run.save_every_n_steps
        if every and state.step % every == 0 and state.batch < loader.num_batches:    # the epoch's end saves anyway
            save_checkpoints(parts, state, run_dir, run)
        tick = time.perf_counter()
    return run.means.result()


def count_nonfinite(metrics: dict[str, float], state: Progress, cfg: TrainConfig, lr: float) -> None:
    """Count a skipped non-finite step; TrainingStopped after --max-nonfinite-steps of them in a row."""
    if not metrics.get("nonfinite"):
        state.nonfinite_in_row = 0
        return
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    limit = cfg.optim.max_nonfinite_steps
    logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all; stop at %d in a row)",
                   state.step, state.nonfinite_in_row, state.nonfinite_total, limit)
    if state.nonfinite_in_row >= limit:
        raise TrainingStopped(
            f"stopped at step {state.step}: {limit} steps in a row had a non-finite loss or gradient (each skipped); "
            f"weights, λ and u are those from before them and no checkpoint holds NaN: lower --lr (the lr was "
            f"{lr:.3g}), set --grad-clip-norm, or check the data, then --resume latest")


def check_across_ranks(batch: Batch, run: EpochRun, parts: Parts) -> None:
    """Several processes: an id that another rank already trained this epoch (or that comes twice in this step) is an
    error on every rank at once, naming its places; with --skip-bad-samples a warning (the batch is formed already,
    so it trains). Each rank's loader drops its own repeats before batching; repeat passes are exempt."""
    if run.seen_all is None or batch.first_seen is None:
        return
    mine = torch.where(batch.first_seen, batch.ids, torch.full_like(batch.ids, -1))                # [b]
    gathered = distributed.all_gather_no_grad([mine.to(parts.dist.device)], parts.dist)[0].cpu()  # [B]
    ids = gathered[gathered >= 0]
    repeated = run.seen_all.add(ids)                                                              # same on all ranks
    if not bool(repeated.any()):
        return
    gid = int(ids[repeated][0])
    if parts.cfg.data.skip_bad_samples:
        logger.warning("id %d is trained a second time this epoch, by another process (the same id in two shards; "
                       "clip-glofnd check-shards lists them)", gid)
        return
    places = None
    if is_main(parts.dist):
        places = id_places(resolve_shards(parts.cfg.data.train_data, parts.cfg.data.num_samples)[0], gid)
    places = distributed.broadcast_object(places, parts.dist)
    raise UsageError(f"id {gid} comes twice in this epoch, on two processes: {' and '.join(places) or 'two shards'}; "
                     f"fix the ids (clip-glofnd check-shards PATTERN lists duplicates) or pass --skip-bad-samples")


def end_of_epoch(parts: Parts, state: Progress, run_dir: Path, log: RunLogger, means: dict[str, float],
                 seconds: float) -> None:
    """Rank 0: epoch record (means, time, λ quantiles over samples seen at least once) and the λ histogram PNG.

    With --state-sharding by-id rank 0 holds the ids ≡ 0 (mod W) only: the λ statistics are of that 1/W sample
    (seen_* counts it), and the record says so under "lam_stats_of"."""
    if not is_main(parts.dist):
        return
    record: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "epoch_time": seconds,
                              **{f"epoch_{k}": v for k, v in means.items()}}
    record.update(lambda_report(parts, run_dir / f"lambda_epoch_{state.epoch}.png",
                                f"{run_dir.name}: λ after epoch {state.epoch}"))
    log.log(record)


def lambda_report(parts: Parts, png: Path, title: str) -> dict[str, Any]:
    """GloFND only (else {}): λ quantiles and counts over the samples updated at least once, of the rows this rank
    holds, for a log record — with --state-sharding by-id a 1/W sample, named under "lam_stats_of" — and the λ
    histogram of both modalities written to `png`."""
    if parts.cfg.fnd.variant != "glofnd":
        return {}
    store, record = parts.store, {}
    lam = {name: store.table(f"fnd_{name}", "lam") for name in ("img", "txt")}              # [rows held]
    seen = {name: store.table(f"fnd_{name}", "steps") > 0 for name in ("img", "txt")}       # updated at least once
    for name in ("img", "txt"):
        record.update(lambda_quantiles(lam[name], seen[name], f"lam_{name}_seen"))
        record[f"seen_{name}"] = int(seen[name].sum())
    if store.world > 1:
        record["lam_stats_of"] = f"ids = {store.rank} mod {store.world} (rank 0's shard)"
    record["lambda_png"] = plot_lambda(png, lam["img"], seen["img"], lam["txt"], seen["txt"], title=title)
    return record


def save_checkpoints(parts: Parts, state: Progress, run_dir: Path, run: EpochRun | None = None) -> None:
    """Rank 0 writes epoch_latest.pt (always) and, at an epoch's end, epoch_N.pt (every --save-frequency epochs and
    the last). Inside an epoch (state.batch > 0, --save-every-n-steps) only epoch_latest.pt, with every rank's data
    position. With sharded state every rank first writes its rows to its own file, which the main files name
    (checkpoint.save_shard). Non-finite weights or state are never written; a failed write stops every rank with one
    line."""
    cfg, store = parts.cfg, parts.store
    data: dict[str, Any] = {"epoch": state.epoch, "batch": state.batch, "samples_seen": state.samples_seen,
                            "warmup_epochs": state.warmup_epochs, "progress": state.state_dict()}
    if run is not None:
        data.update(schedule=run.schedule.state_dict(), steps=[run.loader.num_batches, cfg.optim.epochs])
    if state.batch:
        data.update(_epoch_position(run, parts.dist))                          # a collective: every rank's loader
    folder = checkpoint.checkpoint_dir(run_dir)
    if store.sharded:
        _save_shard(parts, state, folder)                                      # every rank, before the main files

    def write() -> None:
        views = store.views(rows_in_file=not store.sharded)
        ckpt = checkpoint.make_state(
            model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler, fnd_img=views["fnd_img"],
            fnd_txt=views["fnd_txt"], loss_fn=views["loss"], epoch=state.epoch, step=state.step, name=cfg.run.name,
            config=to_flat(cfg), data=data)
        bad = checkpoint.nonfinite_entries({key: ckpt[key] for key in ("state_dict", "optimizer", "glofnd", "loss")})
        if bad:
            raise TrainingStopped(f"not writing a checkpoint at step {state.step}: non-finite values in "
                                  f"{', '.join(bad[:3])}; the last checkpoint in {run_dir} is the latest good state")
        if store.sharded:
            ckpt["state_shards"] = checkpoint.shard_manifest(state.step, parts.dist.world_size, store.num_samples)
        every = cfg.run.save_frequency
        if not state.batch and every and (state.epoch % every == 0 or state.epoch == cfg.optim.epochs):
            checkpoint.save_atomic(ckpt, folder / f"epoch_{state.epoch}.pt")
        checkpoint.save_atomic(ckpt, folder / checkpoint.LATEST)
        checkpoint.remove_unreferenced_shards(folder)

    on_main(parts.dist, write)


def _save_shard(parts: Parts, state: Progress, folder: Path) -> None:
    """Every rank writes the per-sample rows it holds (sharded state); non-finite rows or a failed write on any rank
    stop every rank, before any main file names the shards."""
    dist, store = parts.dist, parts.store
    rows = store.held_rows()
    bad = checkpoint.nonfinite_entries(rows)
    error: UsageError | None = None
    if bad:
        error = TrainingStopped(f"not writing a checkpoint at step {state.step}: non-finite values in rank "
                                f"{dist.rank}'s rows ({', '.join(bad[:3])}); the last checkpoint in {folder} is the "
                                f"latest good state")
    else:
        try:
            checkpoint.save_shard(folder, step=state.step, rank=dist.rank, world_size=dist.world_size,
                                  num_samples=store.num_samples, rows=rows)
        except UsageError as caught:
            error = caught
    if not distributed.all_true(torch.tensor(error is None), dist):           # same verdict on every rank
        raise error or TrainingStopped(f"not writing a checkpoint at step {state.step}: another rank could not "
                                       f"write its per-sample state shard (its log says why); the last checkpoint "
                                       f"in {folder} is the latest good state")


def _epoch_position(run: EpochRun, dist: DistInfo) -> dict[str, Any]:
    """What a mid-epoch checkpoint adds: each rank's loader position, the epoch's running means, seen ids, time."""
    return {"loaders": distributed.all_gather_objects(run.loader.state_dict(), dist),
            "means": run.means.state_dict(), "seen_all": None if run.seen_all is None else run.seen_all.state_dict(),
            "epoch_seconds": run.seconds()}


def on_main(dist: DistInfo, work: Any) -> None:
    """Run `work()` on rank 0 while the others wait; a UsageError there is raised on every rank (none is left
    waiting at a collective for a rank that stopped)."""
    error = None
    if is_main(dist):
        try:
            work()
        except UsageError as caught:
            error = caught
    message = distributed.broadcast_object(None if error is None else str(error), dist)
    if error is not None:
        raise error
    if message is not None:
        raise UsageError(message)


def maybe_evaluate(parts: Parts, state: Progress, log: RunLogger, preprocess: Any, tokenizer: Any) -> dict[str, float]:
    """Zero-shot / retrieval on rank 0 every --eval-every epochs and after the last (RNG untouched); others wait."""
    cfg, dist = parts.cfg, parts.dist
    due = state.epoch % cfg.run.eval_every == 0 or state.epoch == cfg.optim.epochs
    if not (cfg.run.zeroshot_data or cfg.run.retrieval_data or cfg.run.eval_suite) or not due:
        return {}
    metrics: dict[str, float] = {}
    if is_main(dist):
        from clip_glofnd.evaluate import evaluate
        cuda = [dist.device.index or 0] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):                                # training RNG stream unchanged
            metrics = evaluate(parts.unwrapped, preprocess, tokenizer, zeroshot_data=cfg.run.zeroshot_data,
                               retrieval_data=cfg.run.retrieval_data, device=str(dist.device),
                               precision=cfg.model.precision, workers=cfg.data.workers)
            if cfg.run.eval_suite:                                               # suite/mean, suite/group/<group>
                from clip_glofnd.suite import suite_metrics
                metrics.update(suite_metrics(parts.unwrapped, preprocess, tokenizer, cfg.run.eval_suite,
                                             cfg.run.eval_dataset_root, device=str(dist.device),
                                             precision=cfg.model.precision, workers=cfg.data.workers))
        log.log({"step": state.step, "epoch": state.epoch, **metrics})
    distributed.barrier(dist)
    return metrics


# ----------------------------------------------------------------------------------------------------------- run
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
                       fnd_img=views["fnd_img"], fnd_txt=views["fnd_txt"], loss_fn=views["loss"])
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
                             resampled=data.dataset_resampled, train_num_samples=data.train_num_samples)


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


def main(cfg: TrainConfig) -> int:
    """`clip-glofnd train` after parsing: join the process group, train, print the summary on rank 0."""
    dist = distributed.init_distributed(cfg.model.device)
    _setup_logging(dist)
    if cfg.model.precision == "amp" and dist.device.type == "cpu":
        logger.warning("--precision amp on CPU: fp16 autocast there is ~13x slower than fp32")
    try:
        summary = train(cfg, dist)
    finally:
        distributed.cleanup(dist)
    if is_main(dist):
        print("\n".join(summary_lines(summary)))
    return 0
