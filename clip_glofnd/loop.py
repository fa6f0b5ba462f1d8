"""The epoch loop of `clip-glofnd train`: steps, log records, the non-finite counter, the cross-rank id check,
mid-epoch and end-of-epoch checkpoints, the λ report and evaluation during training.

One epoch (`run_epoch`) calls `step.train_step` per batch and reads nothing from the device between log records:
step metrics are summed on the device (`Window`, `RunningMeans`) and read every --log-every-n-steps and at the epoch's
last step; the non-finite flags are read late without waiting (`step.LateFlags`). Checkpoints (`save_checkpoints`)
carry the run's progress, every rank's data position inside an epoch and, with sharded state, one file per rank; rank
0 writes, logs and evaluates while the others wait at a barrier, and a failure there is raised on every rank
(`on_main`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clip_glofnd import checkpoint, distributed
from clip_glofnd.config import TrainConfig, to_flat
from clip_glofnd.data import Batch, TrainLoader, id_places
from clip_glofnd.distributed import DistInfo, is_main
from clip_glofnd.errors import TrainingStopped, UsageError
from clip_glofnd.logger import RunLogger, lambda_quantiles, plot_lambda, progress
from clip_glofnd.model import train_mode
from clip_glofnd.resume import Schedule
from clip_glofnd.seen import SeenIds
from clip_glofnd.shards import resolve_shards
from clip_glofnd.step import LateFlags, Parts, set_lr, train_step

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------------- epoch
class RunningMeans:
    """Epoch means of the summary metrics, accumulated on the device (read at the epoch's end or a checkpoint); the
    filter's precision only over steps that filtered something; skipped (non-finite) steps do not count. Sums in
    float64, as the python floats they replace."""

    KEYS = ("loss", "filtered_img", "filtered_txt", "fn_precision_img", "fn_precision_txt")

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, Tensor | float] = {}

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        ok = 1.0 - torch.as_tensor(metrics["nonfinite"], dtype=torch.float64)
        for key in self.KEYS:
            if key not in metrics:
                continue
            value = torch.as_tensor(metrics[key]).to(ok.device, torch.float64)
            weight = ok if not key.startswith("fn_precision") else ok * (torch.as_tensor(
                metrics[f"filtered{key[12:]}"]).to(ok.device) > 0)
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(weight > 0, value, 0.0)
            self.counts[key] = self.counts.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        state = self.state_dict()
        return {key: state["sums"][key] / state["counts"][key] for key in state["sums"]}

    def state_dict(self) -> dict[str, dict]:
        """Plain floats (one host read for all) of the keys counted at least once."""
        keys = list(self.sums)
        if not keys:
            return {"sums": {}, "counts": {}}
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64) for k in keys]
                             + [torch.as_tensor(self.counts[k], dtype=torch.float64) for k in keys]).tolist()
        sums, counts = values[:len(keys)], values[len(keys):]
        kept = [i for i, count in enumerate(counts) if count > 0]
        return {"sums": {keys[i]: sums[i] for i in kept}, "counts": {keys[i]: int(counts[i]) for i in kept}}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.sums, self.counts = dict(state["sums"]), {k: float(v) for k, v in state["counts"].items()}


class Window:
    """Step metrics between two log records, accumulated on the device and read once per log record: means over the
    finite steps (loss, fractions, τ, γ, u), sums of the filter's counts (fn_true/false/present_*) with the precision
    as their ratio, λ quantiles of the last finite step, the number of skipped steps."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.numbers: dict[str, float] = {}
        self.finite: Tensor | float = 0.0
        self.steps = 0

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        ok = 1.0 - torch.as_tensor(metrics["nonfinite"], dtype=torch.float32)
        self.steps += 1
        self.finite = self.finite + ok
        for key, value in metrics.items():
            if key in ("nonfinite", "fn_precision_img", "fn_precision_txt"):
                continue
            if not isinstance(value, Tensor):                              # a python number (γ): no device copy
                self.numbers[key] = float(value)
                continue
            if key.startswith("lam_"):                                     # the last finite step's
                self.sums[key] = torch.where(ok > 0, value, self.sums.get(key, torch.full_like(value, float("nan"))))
            else:
                self.sums[key] = self.sums.get(key, 0.0) + torch.where(ok > 0, value.double(), 0.0)

    def read(self) -> tuple[int, dict[str, float]]:
        """(finite steps, metrics) with one host read; then the window starts again."""
        keys = list(self.sums)
        values = torch.stack([torch.as_tensor(self.finite, dtype=torch.float64)]
                             + [torch.as_tensor(self.sums[k], dtype=torch.float64) for k in keys]).tolist()
        finite, out = int(values[0]), {}
        for key, value in zip(keys, values[1:]):
            out[key] = value if key.startswith(("lam_", "fn_")) else value / max(finite, 1)
        for name in ("img", "txt"):
            if f"fn_true_{name}" in out:
                filtered = out[f"fn_true_{name}"] + out[f"fn_false_{name}"]
                out[f"fn_precision_{name}"] = out[f"fn_true_{name}"] / max(filtered, 1.0)
        out.update(self.numbers)
        self.__init__()
        return finite, out


@dataclass
class EpochRun:
    """One epoch in progress: its loader and lr schedule, running means, the first-pass ids any rank trained (only
    with several processes: the loader checks its own), and the seconds spent in it before a resume."""

    loader: TrainLoader
    schedule: Schedule
    means: RunningMeans
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
    run = EpochRun(loader, schedule, RunningMeans(), SeenIds(num_samples) if several else None)
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
    """Train one epoch (or its rest, after a mid-epoch resume); a metrics.jsonl record every --log-every-n-steps and
    at the epoch's last step (OpenCLIP's cadence), the only steps that read metrics from the device; checkpoints every
    --save-every-n-steps; returns epoch means of loss, filtered fractions, filter precision."""
    cfg, dist, loader = parts.cfg, parts.dist, run.loader
    train_mode(parts.model)                                                  # locked towers stay in eval mode
    bar = progress(loader, total=loader.num_batches - state.batch, enabled=is_main(dist),
                   desc=f"epoch {state.epoch + 1}")
    window, flags = Window(), LateFlags(dist.device)
    tick = time.perf_counter()
    data_seconds = step_seconds = 0.0
    samples = 0
    for batch in bar:
        # schedule position from (epoch, batch), not the step counter: right after a resume on another world size
        lr = set_lr(parts.optimizer, run.schedule.factor(state.epoch * loader.num_batches + state.batch,
                                                         cfg.optim.warmup))
        check_across_ranks(batch, run, parts)
        start = time.perf_counter()
        metrics = train_step(batch, parts, epoch=state.epoch)
        state.step, state.batch = state.step + 1, state.batch + 1
        state.samples_seen += len(batch) * dist.world_size
        samples += len(batch) * dist.world_size
        run.means.add(metrics)
        window.add(metrics)
        flags.push(state.step, lr, metrics["nonfinite"])
        log_step = state.step % cfg.run.log_every_n_steps == 0 or state.batch == loader.num_batches
        count_nonfinite(flags.ready(wait=log_step), state, cfg, log)             # late, without waiting
        if log_step:
            steps = window.steps
            finite, values = window.read()                     # waits for the device: the window's work ends here
        data_seconds, step_seconds = data_seconds + start - tick, step_seconds + time.perf_counter() - start
        if log_step:
            seconds = max(data_seconds + step_seconds, 1e-9)
            if finite:
                log.log({"step": state.step, "epoch": state.epoch, "lr": lr, **values,
                         "samples_seen": state.samples_seen, "step_time": step_seconds / steps,
                         "data_time": data_seconds / steps, "samples_per_s": samples / seconds})
            if finite and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{values['loss']:.3f}", samples_per_s=f"{samples / seconds:.0f}",
                                refresh=False)
            data_seconds, step_seconds, samples = 0.0, 0.0, 0
        every = cfg.run.save_every_n_steps
        if every and state.step % every == 0 and state.batch < loader.num_batches:    # the epoch's end saves anyway
            count_nonfinite(flags.ready(wait=True), state, cfg, log)
            save_checkpoints(parts, state, run_dir, run)
        tick = time.perf_counter()
    count_nonfinite(flags.ready(wait=True), state, cfg, log)
    return run.means.result()


def count_nonfinite(flags: list[tuple[int, float, float]], state: Progress, cfg: TrainConfig, log: RunLogger
                    ) -> None:
    """Count the steps whose non-finite flags have been read ((step, lr, flag) in step order): a skipped step gets its
    own metrics.jsonl record ("nonfinite": 1, loss null) and a warning; TrainingStopped after --max-nonfinite-steps of
    them in a row."""
    for step, lr, flag in flags:
        if not flag:
            state.nonfinite_in_row = 0
            continue
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        limit = cfg.optim.max_nonfinite_steps
        log.log({"step": step, "epoch": state.epoch, "lr": lr, "loss": None, "nonfinite": 1})
        logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all; stop at %d in a "
                       "row)", step, state.nonfinite_in_row, state.nonfinite_total, limit)
        if state.nonfinite_in_row >= limit:
            raise TrainingStopped(
                f"stopped at step {step}: {limit} steps in a row had a non-finite loss or gradient (each skipped); "
                f"weights, λ and u are those from before them and no checkpoint holds NaN: lower --lr (the lr was "
                f"{lr:.3g}), set --grad-clip-norm, or check the data, then --resume latest")


def check_across_ranks(batch: Batch, run: EpochRun, parts: Parts) -> None:
    """Several processes: an id that another rank already trained this epoch (or that comes twice in this step) is an
    error on every rank at once, naming its places; with --skip-bad-samples a warning (the batch is formed already,
    so it trains). Each rank's loader drops its own repeats before batching; repeat passes are exempt. The ids are
    gathered on the CPU (a gloo group beside NCCL): the check never waits for the GPU."""
    if run.seen_all is None or batch.first_seen is None:
        return
    mine = torch.where(batch.first_seen, batch.ids, torch.full_like(batch.ids, -1))                # [b] CPU
    gathered = distributed.all_gather_cpu(mine, parts.dist)                                       # [B] CPU
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
            model=parts.model, optimizer=parts.optimizer, scaler=parts.scaler, fnd_img=views.get("fnd_img"),
            fnd_txt=views.get("fnd_txt"), loss_fn=views["loss"], epoch=state.epoch, step=state.step, name=cfg.run.name,
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
