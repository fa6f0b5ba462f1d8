"""One training step: batch to the device, features, gathers, the false-negative filter, the loss, backward, the
non-finite guard, the optimizer step and the per-sample state commit — and the parts it needs (`Parts`, `build_parts`).

The step is written for a GPU: between two log steps it reads nothing from the device. Metrics come back as 0-d
tensors that the loop reads every --log-every-n-steps; ids were validated on the CPU where they entered (the loader),
so the filter runs GloFND's unchecked path; constant tensors are made once (`Parts.quantile_points`); with a filter
other than glofnd no per-sample λ exists, is synced or saved.

Non-finite guard, on the device (as AMP's GradScaler): one flag `ok` = features, loss and gradient norm finite,
all-reduced (MIN) over ranks. The optimizer is fused AdamW, which skips its update on the device when told
`found_inf`; the batch's λ / u rows and the model's floating buffers (BatchNorm statistics) are put back with
`torch.where(ok, new, old)`. With --precision amp the GradScaler judges the gradients itself (an inf there is a scale
to lower, not a fault) and `ok` covers features and loss. The loop reads the flag late, without waiting
(`LateFlags`), for the --max-nonfinite-steps counter. Reads that remain by design, per step: `--fnd-init quantile`
finds a sample's first visit with `nonzero` (one per modality); `--state-device cpu` waits for the rows' copy back to
host memory (clip_glofnd/state.py); an optimizer without a fused kernel on the device reads `ok` once.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from clip_glofnd import distributed, losses
from clip_glofnd.config import TrainConfig
from clip_glofnd.data import Batch, normalize_on_device
from clip_glofnd.distributed import DistInfo
from clip_glofnd.errors import UsageError
from clip_glofnd.glofnd import GloFND
from clip_glofnd.state import StateStore, working_rows

LOGIT_SCALE_MAX = math.log(100)                # OpenCLIP clamps logit_scale to [0, ln 100] after each step
LAMBDA_QUANTILES = (0.1, 0.5, 0.9)             # λ quantiles of the batch's anchors in the step metrics


@dataclass
class Parts:
    """Everything a step touches. `model` is DDP-wrapped when world_size > 1; the rest is not. `fnd_img` / `fnd_txt`
    hold per-sample rows only with --fnd glofnd (the other filters need none: one unused row)."""

    cfg: TrainConfig
    dist: DistInfo
    model: nn.Module
    loss_fn: nn.Module
    fnd_img: GloFND                            # thresholds of image anchors (vs all texts)
    fnd_txt: GloFND                            # thresholds of text anchors (vs all images)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    store: StateStore                          # where the per-sample rows of fnd_img, fnd_txt (glofnd), loss_fn live
    quantile_points: Tensor = field(default_factory=lambda: torch.tensor(LAMBDA_QUANTILES))   # on the device
    filter_loss: Callable[..., Any] | None = None    # filter + loss, compiled with --torch-compile (else eager)
    image_norm: tuple[Tensor, ...] | None = None     # (mean, std) on the device when the loader sends uint8 images

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

    Fused where the parameters' device has the kernel (CUDA, CPU): one launch per step, and it skips its update on
    the device when `found_inf` says so (the non-finite guard). Each group carries "base_lr", which the schedule
    scales.
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
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:                                     # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **kwargs)


def build_parts(cfg: TrainConfig, dist: DistInfo, model: nn.Module, num_samples: int) -> Parts:
    """Loss, both GloFND states and where their rows live, DDP wrapper, optimizer and scaler around a created model.

    In the default placement fnd_img, fnd_txt (with --fnd glofnd) and loss_fn hold all num_samples rows; otherwise
    --batch-size working rows that the store fills each step (clip_glofnd/state.py). --torch-compile compiles the
    model's forward in place (state_dict keys unchanged) and the filter + loss as one function."""
    model = model.to(dist.device)
    rows = working_rows(num_samples, cfg.optim.batch_size, cfg.state.device, cfg.state.sharding)
    loss_fn = losses.create_loss(cfg.loss.name, rows, **loss_options(cfg)).to(dist.device)
    if cfg.loss.name != "clip":
        model.logit_scale.requires_grad_(False)              # SogCLR / FastCLIP own τ
        mirror_temperature(model, loss_fn)
    fnd = cfg.fnd
    fnd_kwargs = dict(alpha=fnd.alpha, lr=fnd.lr, start_epoch=fnd.start_epoch, mask_start_epoch=fnd.mask_start_epoch,
                      mode=fnd.variant, bias_correction=fnd.bias_correction, init=fnd.init, device=dist.device)
    fnd_rows = rows if fnd.variant == "glofnd" else 1       # the other filters keep no per-sample state
    fnd_img, fnd_txt = GloFND(fnd_rows, **fnd_kwargs), GloFND(fnd_rows, **fnd_kwargs)
    holders: dict[str, Any] = {"fnd_img": fnd_img, "fnd_txt": fnd_txt} if fnd.variant == "glofnd" else {}
    store = StateStore({**holders, "loss": loss_fn}, num_samples, dist, device=cfg.state.device,
                       sharding=cfg.state.sharding, batch_size=cfg.optim.batch_size)
    if cfg.model.torch_compile:
        model.compile()
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    optimizer = make_optimizer(model, loss_fn, cfg)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.model.precision == "amp")
    parts = Parts(cfg, dist, model, loss_fn, fnd_img, fnd_txt, optimizer, scaler, store,
                  torch.tensor(LAMBDA_QUANTILES, device=dist.device))
    parts.filter_loss = torch.compile(filter_and_loss) if cfg.model.torch_compile else filter_and_loss
    return parts


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


# ------------------------------------------------------------------------------------------------------- filter
@torch.no_grad()
def filter_negatives(parts: Parts, img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, batch: Batch,
                     labels_all: Tensor | None, epoch: int, ids: Tensor | None = None,
                     learn_epoch: int | None = None
                     ) -> tuple[Tensor | None, Tensor | None, dict[str, Tensor]]:
    """keep_i2t, keep_t2i [b, B] (None without a filter) and metric tensors (0-d, on the device): fraction of
    negatives filtered; when the shards carry labels, its share of same-class pairs (fn_precision_*) and the counts
    fn_true_* (filtered, same class), fn_false_* (filtered, other class), fn_present_* (same-class negatives); λ
    quantiles of the batch's anchors (glofnd).

    `ids` [b]: the anchors' rows in fnd_img / fnd_txt (what `parts.store.fetch` returned; default batch.ids). λ is
    updated first and the masks use the updated λ, the order of the authors' code (vibalcam/GloFND,
    bimodal/src/fast_clip/loss.py: `lda_im.update(...)`, then `lda_im.get_mask(...)`), in one
    `GloFND.update_and_mask_unchecked` call per modality (the ids were validated by the loader). λ learns as at
    `learn_epoch` (default `epoch`; the state warm-up passes a later one so that λ learns before --fnd-start-epoch).
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
        keeps[name], lam = fnd.update_and_mask_unchecked(sims[name], batch.ids if ids is None else ids, epoch,
                                                         positive=positive, labels=batch.labels,
                                                         candidate_labels=labels_all, learn_epoch=learn_epoch)
        is_fn = ~keeps[name]                                                           # [b, B] filtered out (the
        stats[f"filtered_{name}"] = is_fn.sum() / max(b * (B - 1), 1)                  # positive always stays)
        if same is not None:                                                           # against the labels
            stats[f"fn_precision_{name}"] = (is_fn & same).sum() / is_fn.sum().clamp_min(1)
            stats[f"fn_true_{name}"] = (is_fn & same).sum()                            # filtered, same class
            stats[f"fn_false_{name}"] = (is_fn & ~same).sum()                          # filtered, other class
            stats[f"fn_present_{name}"] = same.sum()                                   # same-class negatives
        if lam is not None:                                                            # this batch's anchors
            quantiles = torch.quantile(lam, parts.quantile_points.to(lam.device))
            stats.update({f"lam_{name}_p{round(100 * p)}": q for p, q in zip(LAMBDA_QUANTILES, quantiles)})
    return keeps["img"], keeps["txt"], stats


def filter_and_loss(parts: Parts, img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, batch: Batch,
                    labels_all: Tensor | None, ids_all: Tensor, state_ids: Tensor, logit_scale: Tensor, *,
                    epoch: int, with_filter: bool, masks: tuple[Tensor | None, Tensor | None] = (None, None)
                    ) -> tuple[Tensor, dict[str, Any], tuple[Tensor | None, Tensor | None]]:
    """(loss, metrics, (keep_i2t, keep_t2i)): the filter (when `with_filter`, else the given `masks`) and the loss
    of one pass. One function so that --torch-compile captures both in one graph."""
    stats: dict[str, Tensor] = {}
    keep_i2t, keep_t2i = masks
    if with_filter:
        keep_i2t, keep_t2i, stats = filter_negatives(parts, img, txt, img_all, txt_all, batch, labels_all, epoch,
                                                     ids=state_ids)
    loss, loss_metrics = parts.loss_fn(img, txt, img_all, txt_all, ids=state_ids, ids_all=ids_all, epoch=epoch,
                                       keep_i2t=keep_i2t, keep_t2i=keep_t2i, offset=parts.dist.rank * img.shape[0],
                                       logit_scale=logit_scale)
    return loss, {**loss_metrics, **stats}, (keep_i2t, keep_t2i)


# --------------------------------------------------------------------------------------------------------- batch
def encode(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """(image features [b, d], text features [b, d], exp(logit_scale)) from the open_clip model's forward."""
    out = model(batch.images, batch.texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def micro_batches(batch: Batch, accum: int) -> list[Batch]:
    """The batch split into `accum` consecutive micro-batches (fewer when the batch is smaller)."""
    if accum == 1:
        return [batch]
    parts = [t.tensor_split(accum) if t is not None else [None] * accum
             for t in (batch.images, batch.texts, batch.ids, batch.labels)]
    return [Batch(*chunk) for chunk in zip(*parts) if len(chunk[2])]


@torch.no_grad()
def cached_features(parts: Parts, micro: list[Batch]) -> tuple[list[Tensor], list[Tensor]] | None:
    """Features of every micro-batch without gradient (only with accumulation)."""
    if len(micro) == 1:
        return None
    with parts.autocast():
        features = [encode(parts.model, chunk)[:2] for chunk in micro]
    return [f[0] for f in features], [f[1] for f in features]


def splice(cached: tuple[list[Tensor], list[Tensor]] | None, j: int, img_j: Tensor, txt_j: Tensor
           ) -> tuple[Tensor, Tensor]:
    """The local batch's features [b, d] with micro-batch j's fresh (differentiable) rows in place."""
    if cached is None:
        return img_j, txt_j
    imgs, txts = list(cached[0]), list(cached[1])
    imgs[j], txts[j] = img_j, txt_j
    return torch.cat(imgs), torch.cat(txts)


def prepare_batch(batch: Batch, parts: Parts) -> tuple[Batch, Tensor, Tensor, Tensor | None]:
    """The batch on the training device, every rank's ids [B], this rank's anchors' rows in fnd_* and loss_fn [b]
    (`parts.store.fetch`, given the ids as they came from the loader, on the CPU: a step must end with
    `parts.store.commit()`), every rank's labels [B] or None. Copies are non-blocking (pinned batches overlap);
    uint8 images (--image-dtype) are normalised here, on the device."""
    cpu_ids = batch.ids
    batch = batch.to(parts.dist.device, non_blocking=True)
    if batch.images.dtype == torch.uint8:                                                # --image-dtype uint8
        if parts.image_norm is None:
            raise UsageError("uint8 images from the loader, but no mean / std to normalise them (Parts.image_norm)")
        batch = replace(batch, images=normalize_on_device(batch.images, *parts.image_norm))
    ids_all, = distributed.all_gather_no_grad([batch.ids], parts.dist)                  # [B]
    state_ids = parts.store.fetch(batch.ids, ids_all, cpu_ids=cpu_ids)                  # [b]
    labels_all = None if batch.labels is None else distributed.all_gather_no_grad([batch.labels], parts.dist)[0]
    return batch, ids_all, state_ids, labels_all


# ---------------------------------------------------------------------------------------------------------- step
def train_step(batch: Batch, parts: Parts, *, epoch: int) -> dict[str, Tensor | float]:
    """One optimizer step on one batch; returns metrics as 0-d tensors on the device (loss, temperature, filtered
    fractions, λ quantiles, ...; "nonfinite" 1.0 when the step was skipped, and then "loss" NaN). Reads nothing from
    the device (module docstring: the reads that some flags need by design).

    With --accum-freq A > 1 (CLIP loss only; config refuses the others, whose u would be updated A times) features of
    all micro-batches are computed without gradient first; then each micro-batch is recomputed with gradient and the
    loss of the whole batch is backpropagated through its slice only (OpenCLIP's scheme, gradient equal to the
    unsplit batch's). λ is updated and masks built once per step, on the whole batch; logit_scale gets its gradient
    from the last pass only.

    Non-finite guard (as AMP's GradScaler): non-finite gathered features, loss or gradients on any rank skip the
    step on every rank, on the device: no weight update, and the batch's λ / u rows and the model's buffers are put
    back.
    """
    cfg, dist = parts.cfg, parts.dist
    batch, ids_all, state_ids, labels_all = prepare_batch(batch, parts)
    micro = micro_batches(batch, cfg.optim.accum_freq)
    undo = snapshot(parts, state_ids)
    parts.optimizer.zero_grad(set_to_none=True)
    cached = cached_features(parts, micro)
    masks: tuple[Tensor | None, Tensor | None] = (None, None)
    metrics: dict[str, Any] = {}
    for j, chunk in enumerate(micro):
        last = j == len(micro) - 1
        no_sync = parts.model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext()
        with no_sync:
            # forward
            with parts.autocast():
                img_j, txt_j, logit_scale = encode(parts.model, chunk)                   # [b_j, d], [b_j, d], []
            img, txt = splice(cached, j, img_j, txt_j)                                  # [b, d] grad via slice j
            img_all, txt_all = distributed.all_gather_with_grad([img, txt], dist)       # [B, d]
            if j == 0:                                                                  # same on all ranks
                finite = torch.isfinite(img_all).all() & torch.isfinite(txt_all).all()
            # false-negative filter (detached; once per step) and loss
            loss, pass_metrics, masks = parts.filter_loss(
                parts, img, txt, img_all, txt_all, batch, labels_all, ids_all, state_ids,
                logit_scale if last else logit_scale.detach(), epoch=epoch, with_filter=j == 0, masks=masks)
            metrics.update(pass_metrics)                                                # the filter's from pass 0
            # backward
            parts.scaler.scale(loss).backward()
    ok = _optimizer_step(parts, finite & torch.isfinite(loss.detach()).all())
    undo_unless(parts, undo, ok)
    # per-sample state: each rank wrote the rows of its own anchors; back to where they live (all ranks agree)
    parts.store.commit()
    loss = torch.where(ok, loss.detach().float(), torch.full_like(loss.detach().float(), math.nan))
    return {"loss": loss, **metrics, "nonfinite": (~ok).float()}


@dataclass
class Undo:
    """What a step writes besides weights and optimizer: the per-sample rows of its anchors and the model's floating
    buffers (BatchNorm statistics), as they were before it."""

    ids: Tensor
    rows: dict[str, dict[str, Tensor]]
    buffers: list[tuple[Tensor, Tensor]]


@torch.no_grad()
def snapshot(parts: Parts, ids: Tensor) -> Undo:
    """Copies of the per-sample rows of `ids` in every holder of the store, and of the model's floating buffers."""
    rows = {name: holder.export_rows(ids) for name, holder in parts.store.holders.items()}
    buffers = [(buf, buf.clone()) for buf in parts.unwrapped.buffers() if buf.is_floating_point()]
    return Undo(ids, {name: r for name, r in rows.items() if r}, buffers)


@torch.no_grad()
def undo_unless(parts: Parts, undo: Undo, ok: Tensor) -> None:
    """Where `ok` is False (a skipped step) put back the step's per-sample rows and buffers, on the device."""
    for name, old in undo.rows.items():
        holder = parts.store.holders[name]
        new = holder.export_rows(undo.ids)
        holder.import_rows(undo.ids, {key: torch.where(ok, new[key], old[key]) for key in old})
    for buf, old in undo.buffers:
        buf.copy_(torch.where(ok, buf, old))


def _optimizer_step(parts: Parts, finite: Tensor) -> Tensor:
    """Average the loss's own gradients (FastCLIP's τ, outside DDP), clip, step, then project τ / logit_scale.

    Returns `ok` (bool 0-d on the device, the same on every rank): features, loss and (without a GradScaler) the
    gradient norm finite on every rank. The update happens only where it is True, decided on the device: the fused
    AdamW's `found_inf`, or the GradScaler's own check with --precision amp. One gradient norm serves the guard and
    --grad-clip-norm."""
    optimizer, scaler = parts.optimizer, parts.scaler
    loss_params = [p for p in parts.loss_fn.parameters() if p.requires_grad]
    distributed.average_gradients(loss_params, parts.dist)
    clip = parts.cfg.optim.grad_clip_norm
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    norm = None
    if clip is not None or not scaler.is_enabled():
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False) if grads else None
    if norm is not None and not scaler.is_enabled():
        finite = finite & torch.isfinite(norm)
    ok = distributed.all_true_on_device(finite, parts.dist)
    if clip is not None and norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    if scaler.is_enabled():
        scaler.step(optimizer)                              # skips on non-finite gradients, on the device if fused
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()                 # fused AdamW: no update where found_inf (steps kept)
        optimizer.step()
        optimizer.found_inf = None
    elif bool(ok):                                          # no fused kernel: one read of the flag
        optimizer.step()
    with torch.no_grad():
        if hasattr(parts.loss_fn, "clamp_tau_"):
            parts.loss_fn.clamp_tau_()
            mirror_temperature(parts.unwrapped, parts.loss_fn)
        if parts.cfg.loss.name == "clip":
            parts.unwrapped.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return ok


class LateFlags:
    """Per-step device flags (a step's "nonfinite") read late and without waiting: `push` starts a non-blocking
    copy to pinned host memory; `ready()` returns, in step order, the (step, info, value) whose copy has landed —
    all of them with `wait=True` (log steps, checkpoints, epoch ends). On the CPU the values are there at once."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[int, Any, Tensor, Any]] = []

    def push(self, step: int, info: Any, flag: Tensor) -> None:
        event = None
        if self.cuda:
            host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            host.copy_(flag.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self.pending.append((step, info, flag, event))

    def ready(self, wait: bool = False) -> list[tuple[int, Any, float]]:
        out = []
        while self.pending:
            step, info, flag, event = self.pending[0]
            if event is not None and not wait and not event.query():
                break
            if event is not None:
                event.synchronize()
            self.pending.pop(0)
            out.append((step, info, float(flag.numpy())))
        return out
