"""State warm-up before training (`--state-warmup-epochs N`): fill the per-sample state from the frozen starting model.

Fine-tuning starts from a model whose similarities already mean something, but GloFND's λ starts at 1 (or at one
mini-batch quantile) and SogCLR / FastCLIP's u at "unset", so the first epochs filter with thresholds, and weight
with estimates, that do not describe the model yet. TuneCLIP (Mehta, Wei, Chen, Yang, arXiv 2601.09859, "optimizer
statistics recovery") shows that fine-tuning with such global losses degrades when this state starts cold, and
recovers it with the model frozen before the first update. Here, N passes over the training data run before epoch 1:

- forward only, no gradient, no optimizer step: weights, buffers and the optimizer are bit-identical afterwards;
- the model in **eval mode**: dropout off (an HF text tower has dropout 0.1 in train mode) and BatchNorm using, not
  updating, its running statistics (RN50), so the features are the starting model's own, deterministic ones and
  nothing about the model changes; the images still go through the training transform, so λ and u describe the
  similarities training will compute;
- per batch, exactly the state updates of a training step (`step.filter_negatives`, then the loss, which updates
  u): λ of image and text anchors learns whatever --fnd-start-epoch says (the warm-up is there to fill it), masks
  and u's rate γ are those of the first training epoch; the rows are fetched from and committed to the state store
  (whatever --state-device / --state-sharding say), as in `train_step`. (TuneCLIP
  also recovers Adam's moments of the weights; that needs backward passes and is not done here.)
- each pass is logged (metrics.jsonl records with "phase": "state_warmup", lambda_warmup.png) and checkpointed
  (epoch_latest.pt with epoch 0, step 0 and data.warmup_epochs = passes done); a resume continues an unfinished
  warm-up at the next pass
  and never reruns one once training has started. The passes are not counted in --epochs, the lr schedule or
  samples_seen; each pass reads the data in its own order, seeded by (--seed, pass).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clip_glofnd import distributed
from clip_glofnd.data import Batch
from clip_glofnd.distributed import is_main
from clip_glofnd.logger import RunLogger, progress
from clip_glofnd.loop import Progress, lambda_report
from clip_glofnd.step import Parts, encode, filter_negatives, prepare_batch


logger = logging.getLogger(__name__)

PHASE = "state_warmup"


def loader_epoch(warmup_epoch: int) -> int:
    """The data-order seed of warm-up pass w (0-based): -(w + 1), distinct from every training epoch's."""
    return -(warmup_epoch + 1)


@torch.no_grad()
def warmup_step(batch: Batch, parts: Parts, *, epoch: int) -> dict[str, Tensor | float]:
    """One forward-only step of the frozen model: update λ (both modalities) and the loss's u on `batch` as a training
    step at `epoch` would, sync the rows over ranks; returns 0-d tensors for logging (loss, filtered fractions, λ, u),
    read only on log steps."""
    cfg, dist = parts.cfg, parts.dist
    batch, ids_all, state_ids, labels_all = prepare_batch(batch, parts)
    b = len(batch)
    with parts.autocast():
        img, txt, logit_scale = encode(parts.unwrapped, batch)                            # [b, d], [b, d], []
    img_all, txt_all = distributed.all_gather_no_grad([img, txt], dist)                   # [B, d]
    learn_epoch = max(epoch, cfg.fnd.start_epoch)                                          # λ learns during warm-up
    keep_i2t, keep_t2i, fnd_stats = filter_negatives(parts, img, txt, img_all, txt_all, batch, labels_all,
                                                           epoch, ids=state_ids, learn_epoch=learn_epoch)
    loss, loss_metrics = parts.loss_fn(img, txt, img_all, txt_all, ids=state_ids, ids_all=ids_all, epoch=epoch,
                                       keep_i2t=keep_i2t, keep_t2i=keep_t2i, offset=dist.rank * b,
                                       logit_scale=logit_scale)                            # updates u (SogCLR/FastCLIP)
    parts.store.commit()                                                 # rows back where they live; ranks agree
    return {"loss": loss.detach().float(), **loss_metrics, **fnd_stats}


def _pass(parts: Parts, loader: Any, state: Progress, log: RunLogger, warmup_epoch: int) -> int:
    """One warm-up pass over `loader`; logs each step; returns the number of steps."""
    bar = progress(loader, total=loader.num_batches, enabled=is_main(parts.dist),
                   desc=f"state warm-up {warmup_epoch + 1}/{parts.cfg.optim.state_warmup_epochs}")
    steps = 0
    for steps, batch in enumerate(bar, start=1):
        metrics = warmup_step(batch, parts, epoch=state.epoch)
        if steps % parts.cfg.run.log_every_n_steps == 0 or steps == loader.num_batches:     # reads the device
            values = dict(zip(metrics, torch.stack([torch.as_tensor(v, dtype=torch.float32).to(parts.dist.device)
                                                    for v in metrics.values()]).tolist()))
            log.log({"step": state.step, "phase": PHASE, "warmup_epoch": warmup_epoch, "warmup_step": steps,
                     **values})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
    return steps


def _pass_record(parts: Parts, state: Progress, run_dir: Path, warmup_epoch: int, steps: int, seconds: float
                 ) -> dict[str, Any]:
    """The end-of-pass record: time, steps, λ quantiles over the samples seen so far (and lambda_warmup.png), mean
    u of the samples set (of the rows this rank holds: all of them unless --state-sharding by-id)."""
    store = parts.store
    record: dict[str, Any] = {"step": state.step, "phase": PHASE, "warmup_epoch": warmup_epoch,
                              "warmup_epochs_done": warmup_epoch + 1, "warmup_steps": steps, "warmup_time": seconds}
    record.update(lambda_report(parts, run_dir / "lambda_warmup.png",
                                      f"{run_dir.name}: λ after {warmup_epoch + 1} state warm-up pass(es)"))
    for name in ("u_img", "u_txt"):
        u = store.table("loss", name) if name in store.keys["loss"] else None
        if u is not None and bool((u > 0).any()):
            record[f"{name}_set_mean"] = float(u[u > 0].mean())
    return record


def warm_up_state(parts: Parts, state: Progress, run_dir: Path, log: RunLogger, make_loader: Callable[[int], Any],
                  save: Callable[[Parts, Progress, Path], None]) -> None:
    """Run the warm-up passes still to do (none once training has started), checkpointing after each with `save`.

    `make_loader(epoch)` builds the training loader for a data-order seed; `state` (loop.Progress) counts the passes
    done in `state.warmup_epochs`.
    """
    total = parts.cfg.optim.state_warmup_epochs
    if state.warmup_epochs >= total:
        return
    if state.epoch > 0 or state.step > 0:
        logger.info("resumed after training started: the state warm-up (%d of %d passes done) is not run",
                    state.warmup_epochs, total)
        return
    model = parts.unwrapped
    was_training = model.training
    model.eval()
    try:
        for warmup_epoch in range(state.warmup_epochs, total):
            tick = time.perf_counter()
            steps = _pass(parts, make_loader(loader_epoch(warmup_epoch)), state, log, warmup_epoch)
            state.warmup_epochs = warmup_epoch + 1
            if is_main(parts.dist):
                log.log(_pass_record(parts, state, run_dir, warmup_epoch, steps, time.perf_counter() - tick))
            save(parts, state, run_dir)
    finally:
        model.train(was_training)
    logger.info("state warm-up done: %d passes over the training data with the model frozen", total)
