"""Time share of the per-sample state sync in a real 2-process training step, and the bytes each rank moves per step.

Two gloo processes on the CPU (torch.multiprocessing, torchrun's variables) run `train.train_step` on random images
and captions with their own ids (rank r: rows r·b:(r+1)·b of a fresh permutation of the ids each step), loss SogCLR
with GloFND, model `clip-tiny` by default. Timed per step, after a barrier: the whole `train_step`, and inside it
the call `distributed.sync_rows([fnd_img, fnd_txt, loss_fn], ids, dist)`, wrapped with a timer that first waits at a
barrier for the other rank (that wait, the ranks' skew after the optimizer step, is reported apart: without the sync
it would move to the next collective). Timed alone: the same sync_rows call repeated after a barrier.

Bytes per rank per step are recorded from one real step by wrapping `distributed._all_gather` (every gather of
train_step goes through it): features (image + text [b, d] float32), ids and labels ([b] int64), the state rows
(uint8 [b, bytes per anchor]); "send" is the local tensor, "recv" the gathered one. Not gathers, so counted from
sizes: the backward of the feature gather (an all-reduce of the gathered gradient on gloo, a reduce-scatter on NCCL)
and DDP's gradient all-reduce (every trainable parameter once, float32). Sizes of the tensors entering and leaving
the collectives, not wire bytes (those depend on the algorithm: a ring all-reduce sends ~2x its tensor).

Prints a table and writes benchmarks/results/sync_share_cpu.json.

    python -m benchmarks.sync_share            # b = 32 and 128 per rank, ~3 min on 2 idle cores
    python -m benchmarks.sync_share --quick    # b = 8, seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common

WORLD = 2
DEADLINE_S = 1800.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags (--quick: b = 8, 2 timed steps, 1,000 samples)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_share", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch per rank (default 32 128; quick 8)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; quick 1)")
    p.add_argument("--sync-repeats", type=int, help="sync_rows calls timed alone (default 50; quick 5)")
    p.add_argument("--num-samples", type=int, help="size of the per-sample state (default 1000000; quick 1000)")
    p.add_argument("--model", default="clip-tiny", help="open_clip model name, our config name or a JSON path")
    p.add_argument("--loss", default="sogclr", choices=("clip", "sogclr", "fastclip"))
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores // 2, at least 1)")
    p.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/sync_share_cpu.json)")
    ns = p.parse_args(list(argv))
    quick = ns.quick
    ns.batch_sizes = ns.batch_sizes or ([8] if quick else [32, 128])
    ns.steps = ns.steps or (2 if quick else 10)
    ns.warmup = ns.warmup if ns.warmup is not None else (1 if quick else 2)
    ns.sync_repeats = ns.sync_repeats or (5 if quick else 50)
    ns.num_samples = ns.num_samples or (1000 if quick else 1_000_000)
    ns.threads = ns.threads or max(1, (os.cpu_count() or 2) // WORLD)
    ns.output = ns.output or _common.RESULTS_DIR / f"sync_share_cpu{'_quick' if quick else ''}.json"
    if ns.num_samples < WORLD * max(ns.batch_sizes):
        p.error(f"--num-samples must be >= {WORLD} x the largest batch size")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Run the 2 ranks, print the table, write the JSON; returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = parse_args(argv)
    info = _common.machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = run_ranks(ns, Path(tmp))
    info.update(torch_threads=ns.threads * WORLD, threads_per_process=ns.threads, processes=WORLD)
    result = {
        "benchmark": "sync_share",
        "command": _common.command_line("benchmarks.sync_share", argv),
        "machine": _common.finish_info(info),
        "world_size": WORLD,
        "backend": "gloo",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
        "rows": [merge_ranks([rank[i] for rank in per_rank]) for i in range(len(ns.batch_sizes))],
    }
    _common.write_json(ns.output, result)
    print(report(result))
    print(f"wrote {ns.output}")
    return 0


def run_ranks(ns: argparse.Namespace, tmp: Path) -> list[list[dict[str, Any]]]:
    """Spawn the ranks; each one's list of per-batch-size measurements. Kills them after DEADLINE_S."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.spawn(_rank, args=(vars(ns), port, tmp), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise RuntimeError(f"benchmark ranks did not finish within {DEADLINE_S:.0f} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _rank(rank: int, options: dict[str, Any], port: int, out: Path) -> None:
    """One spawned rank: join the gloo group and measure every batch size."""
    from clip_glofnd import distributed
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(options["threads"])
    dist = distributed.init_distributed("cpu")
    try:
        rows = [measure(argparse.Namespace(**options), b, dist) for b in options["batch_sizes"]]
    finally:
        distributed.cleanup(dist)
    (out / f"rank{rank}.json").write_text(json.dumps(rows))


def measure(ns: argparse.Namespace, b: int, dist: Any) -> dict[str, Any]:
    """Step and sync times (seconds, per step) and bytes of one rank at batch b."""
    from clip_glofnd import distributed, train
    parts, make_batch = _setup(ns, b, dist)
    for step in range(ns.warmup):
        train.train_step(make_batch(step), parts, epoch=0)
    counted = count_bytes(parts, make_batch(ns.warmup))
    sync_times: list[float] = []
    wait_times: list[float] = []
    step_times = []
    original = distributed.sync_rows

    def timed_sync(holders, ids, info):
        start = time.perf_counter()
        distributed.barrier(info)                                        # the other rank's lag is not the sync's
        middle = time.perf_counter()
        original(holders, ids, info)
        wait_times.append(middle - start)
        sync_times.append(time.perf_counter() - middle)

    distributed.sync_rows = timed_sync                                   # train.py calls distributed.sync_rows
    try:
        for step in range(ns.warmup + 1, ns.warmup + 1 + ns.steps):
            batch = make_batch(step)
            distributed.barrier(dist)
            start = time.perf_counter()
            train.train_step(batch, parts, epoch=0)
            step_times.append(time.perf_counter() - start)
    finally:
        distributed.sync_rows = original
    holders, ids = [parts.fnd_img, parts.fnd_txt, parts.loss_fn], make_batch(0).ids
    distributed.barrier(dist)
    start = time.perf_counter()
    for _ in range(ns.sync_repeats):
        distributed.sync_rows(holders, ids, dist)
    isolated = (time.perf_counter() - start) / ns.sync_repeats
    return {"batch": b, "embed_dim": counted.pop("embed_dim"), "step_times_s": step_times,
            "sync_times_s": sync_times, "wait_times_s": wait_times, "sync_isolated_s": isolated, "bytes": counted}


def _setup(ns: argparse.Namespace, b: int, dist: Any) -> tuple[Any, Any]:
    """Parts from train.build_parts and a function step -> this rank's Batch of random data with its own ids."""
    from clip_glofnd import train
    from clip_glofnd.config import from_flat
    from clip_glofnd.data import Batch
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    model = create_model(ns.model)[0]
    cfg = from_flat({"train_data": "unused", "model": ns.model, "batch_size": b, "loss": ns.loss, "fnd": "glofnd",
                     "fnd_alpha": 0.01})
    parts = train.build_parts(cfg, dist, model, ns.num_samples)
    size, ctx, vocab = model.visual.image_size, model.context_length, model.vocab_size
    size = size if isinstance(size, int) else size[0]

    def make_batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(step)
        global_ids = torch.randperm(ns.num_samples, generator=g)[:WORLD * b]          # [W·b] this step's samples
        texts = torch.randint(1, vocab - 1, (b, ctx), generator=g)
        texts[:, -1] = vocab - 1                                                     # end-of-text token
        return Batch(torch.randn(b, 3, size, size, generator=g), texts,
                     global_ids[dist.rank * b:(dist.rank + 1) * b], torch.randint(0, 10, (b,), generator=g))
    return parts, make_batch


def count_bytes(parts: Any, batch: Any) -> dict[str, int]:
    """Bytes this rank puts into and gets out of the collectives of one train_step (see the module docstring)."""
    from clip_glofnd import distributed, train
    calls: list[tuple[torch.dtype, int, int]] = []
    original = distributed._all_gather

    def recording(tensor: torch.Tensor) -> torch.Tensor:
        gathered = original(tensor)
        calls.append((tensor.dtype, tensor.numel() * tensor.element_size(),
                      gathered.numel() * gathered.element_size()))
        return gathered

    distributed._all_gather = recording
    try:
        train.train_step(batch, parts, epoch=0)
    finally:
        distributed._all_gather = original
    kinds = [dtype for dtype, _, _ in calls]
    expected = [torch.int64, torch.int64, torch.float32, torch.float32, torch.uint8]   # ids, labels, img, txt, rows
    if kinds != expected:
        raise RuntimeError(f"train_step's gathers changed ({kinds}, expected {expected}); update benchmarks/"
                           "sync_share.py")
    (_, ids_s, ids_r), (_, lab_s, lab_r), (_, img_s, img_r), (_, txt_s, txt_r), (_, row_s, row_r) = calls
    trainable = sum(p.numel() * p.element_size() for p in parts.model.parameters() if p.requires_grad)
    return {"ids_send": ids_s, "ids_recv": ids_r, "labels_send": lab_s, "labels_recv": lab_r,
            "features_send": img_s + txt_s, "features_recv": img_r + txt_r,
            "features_grad_reduce": img_r + txt_r,                            # gloo all-reduce of the gathered grad
            "state_rows_send": row_s, "state_rows_recv": row_r, "state_row_bytes_per_anchor": row_s // len(batch),
            "gradients_allreduce": trainable, "embed_dim": img_s // (4 * len(batch))}


def merge_ranks(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row per batch size: medians per rank, their mean, the sync's share of the step, rank 0's bytes."""
    step = [statistics.median(r["step_times_s"]) for r in rows]
    sync = [statistics.median(r["sync_times_s"]) for r in rows]
    wait = [statistics.median(r["wait_times_s"]) for r in rows]
    isolated = [r["sync_isolated_s"] for r in rows]
    row: dict[str, Any] = {"batch": rows[0]["batch"], "embed_dim": rows[0]["embed_dim"],
                           "step_s": statistics.mean(step), "sync_s": statistics.mean(sync),
                           "sync_isolated_s": statistics.mean(isolated), "wait_s": statistics.mean(wait), "per_rank": {
                               "step_median_s": step, "sync_median_s": sync, "wait_median_s": wait,
                               "sync_isolated_s": isolated,
                               "step_times_s": [r["step_times_s"] for r in rows]}}
    row["sync_share_pct"] = 100 * row["sync_s"] / row["step_s"]
    row["sync_isolated_share_pct"] = 100 * row["sync_isolated_s"] / row["step_s"]
    row["bytes"] = dict(rows[0]["bytes"])
    gathered = ("ids_send", "labels_send", "features_send", "state_rows_send")
    row["bytes"]["gathers_send_total"] = sum(row["bytes"][k] for k in gathered)
    row["state_rows_share_of_gathers_pct"] = 100 * row["bytes"]["state_rows_send"] / row["bytes"]["gathers_send_total"]
    return row


def report(result: dict[str, Any]) -> str:
    """Two tables: times and shares; bytes per rank per step."""
    rows = [{**r, **r["bytes"]} for r in result["rows"]]
    times = _common.format_table(rows, [
        ("batch", "b/rank", "d", 1), ("step_s", "step (ms)", ".1f", 1e3), ("sync_s", "sync in step (ms)", ".3f", 1e3),
        ("sync_share_pct", "share %", ".3f", 1), ("sync_isolated_s", "sync alone (ms)", ".3f", 1e3),
        ("sync_isolated_share_pct", "alone share %", ".3f", 1), ("wait_s", "wait before sync (ms)", ".3f", 1e3)])
    volume = _common.format_table(rows, [
        ("batch", "b/rank", "d", 1), ("features_send", "features send (KB)", ".1f", 1e-3),
        ("features_recv", "features recv (KB)", ".1f", 1e-3), ("ids_send", "ids send (B)", "d", 1),
        ("labels_send", "labels send (B)", "d", 1), ("state_rows_send", "rows send (KB)", ".2f", 1e-3),
        ("state_rows_recv", "rows recv (KB)", ".2f", 1e-3),
        ("state_row_bytes_per_anchor", "rows B/anchor", "d", 1),
        ("state_rows_share_of_gathers_pct", "rows % of gathers", ".2f", 1),
        ("gradients_allreduce", "DDP grads (MB)", ".1f", 1e-6)])
    machine = result["machine"]
    head = (f"{result['world_size']} gloo processes x {machine['threads_per_process']} thread(s), "
            f"{result['config']['model']}, loss {result['config']['loss']} + GloFND, {machine['cpu_model']}, "
            f"load {machine['loadavg_1min_start']:.1f} -> {machine['loadavg_1min_end']:.1f}"
            f"{' (UNDER LOAD)' if machine['under_load'] else ''}")
    return "\n\n".join([head, "Time per step (medians, mean of the 2 ranks)\n" + times,
                        "Bytes per rank per step (tensors into / out of the collectives)\n" + volume])


if __name__ == "__main__":
    raise SystemExit(main())
