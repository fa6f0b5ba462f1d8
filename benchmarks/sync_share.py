"""Time share of the per-sample state exchange in a real multi-process training step, replicated vs sharded by id,
and the bytes each rank moves per step.

W gloo processes on the CPU (torch.multiprocessing, torchrun's variables; W = 2 and 4 by default) run
`train_step` on random images and captions with their own ids (rank r: rows r·b:(r+1)·b of a fresh permutation
of the ids each step), loss SogCLR with GloFND, model `clip-tiny` by default, once with --state-sharding replicated
(after the step one all-gather of the written rows, `distributed.sync_rows`) and once with by-id (a fixed-size
all-to-all fetching the anchors' rows from their owners before the step, the same all-gather of the written rows
after it, `StateStore.fetch` / `commit`). Timed per step, after a barrier: the whole `train_step`, and inside it the
store's `fetch` and `commit` (the state exchange, with the row gathers and writes around it), each wrapped with a timer that first waits at a
barrier for the other ranks (that wait, the ranks' skew, is reported apart: without the exchange it would move to the
next collective). Timed alone: the same fetch + commit repeated after a barrier.

Bytes per rank per step are recorded from one real step by wrapping `distributed._all_gather` (every gather of
train_step goes through it: features, ids, labels, and the replicated state rows) and `distributed.exchange_rows`
(the by-id all-to-all): "send" is what this rank puts in, "recv" what it gets. Not gathers, so counted from sizes:
the backward of the feature gather (an all-reduce of the gathered gradient on gloo, a reduce-scatter on NCCL) and
DDP's gradient all-reduce (every trainable parameter once, float32). Sizes of the tensors entering and leaving the
collectives, not wire bytes (those depend on the algorithm: a ring all-reduce sends ~2x its tensor). The state bytes
are extrapolated to W = 64 from the measured bytes per anchor (`extrapolate`).

Prints tables and writes benchmarks/results/sync_share_cpu.json.

    python -m benchmarks.sync_share            # W = 2, 4; b = 32 and 128 per rank; ~10 min on 2 idle cores
    python -m benchmarks.sync_share --quick    # W = 2, b = 8, seconds (CI)
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

DEADLINE_S = 3600.0
SHARDINGS = ("replicated", "by-id")
EXTRAPOLATE_TO = 64


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags (--quick: W = 2, b = 8, 2 timed steps, 1,000 samples)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_share", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--world-sizes", type=int, nargs="+", help="numbers of processes W (default 2 4; quick 2)")
    p.add_argument("--shardings", nargs="+", choices=SHARDINGS, default=list(SHARDINGS),
                   help="--state-sharding values to compare (default both)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch per rank (default 32 128; quick 8)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; quick 1)")
    p.add_argument("--sync-repeats", type=int, help="state exchanges timed alone (default 50; quick 5)")
    p.add_argument("--num-samples", type=int, help="size of the per-sample state (default 1000000; quick 1000)")
    p.add_argument("--model", default="clip-tiny", help="open_clip model name, our config name or a JSON path")
    p.add_argument("--loss", default="sogclr", choices=("clip", "sogclr", "fastclip"))
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores // W, at least 1)")
    p.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/sync_share_cpu.json)")
    ns = p.parse_args(list(argv))
    quick = ns.quick
    ns.world_sizes = ns.world_sizes or ([2] if quick else [2, 4])
    ns.batch_sizes = ns.batch_sizes or ([8] if quick else [32, 128])
    ns.steps = ns.steps or (2 if quick else 10)
    ns.warmup = ns.warmup if ns.warmup is not None else (1 if quick else 2)
    ns.sync_repeats = ns.sync_repeats or (5 if quick else 50)
    ns.num_samples = ns.num_samples or (1000 if quick else 1_000_000)
    ns.output = ns.output or _common.RESULTS_DIR / f"sync_share_cpu{'_quick' if quick else ''}.json"
    if min(ns.world_sizes) < 2:
        p.error("--world-sizes must be >= 2 (one process exchanges nothing)")
    if ns.num_samples < max(ns.world_sizes) * max(ns.batch_sizes):
        p.error("--num-samples must be >= the largest world size x the largest batch size")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ranks for each world size, print the tables, write the JSON; returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = parse_args(argv)
    info = _common.machine_info(torch.device("cpu"))
    rows = []
    for world in ns.world_sizes:
        threads = ns.threads or max(1, (os.cpu_count() or 2) // world)
        with tempfile.TemporaryDirectory() as tmp:
            per_rank = run_ranks(ns, world, threads, Path(tmp))
        rows += [merge_ranks([rank[i] for rank in per_rank]) | {"threads_per_process": threads}
                 for i in range(len(per_rank[0]))]
    info.update(torch_threads=max(r["threads_per_process"] * r["world_size"] for r in rows), processes=ns.world_sizes,
                threads_per_process=sorted({r["threads_per_process"] for r in rows}))
    result = {
        "benchmark": "sync_share",
        "command": _common.command_line("benchmarks.sync_share", argv),
        "machine": _common.finish_info(info),
        "world_sizes": ns.world_sizes,
        "backend": "gloo",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
        "rows": rows,
    }
    _common.write_json(ns.output, result)
    print(report(result))
    print(f"wrote {ns.output}")
    return 0


def run_ranks(ns: argparse.Namespace, world: int, threads: int, tmp: Path) -> list[list[dict[str, Any]]]:
    """Spawn `world` ranks; each one's list of measurements (shardings x batch sizes). Kills them after
    DEADLINE_S."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = vars(ns) | {"threads": threads, "output": str(ns.output)}
    context = torch.multiprocessing.spawn(_rank, args=(options, port, tmp, world), nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise RuntimeError(f"benchmark ranks did not finish within {DEADLINE_S:.0f} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def _rank(rank: int, options: dict[str, Any], port: int, out: Path, world: int) -> None:
    """One spawned rank: join the gloo group and measure every (sharding, batch size)."""
    from clip_glofnd import distributed
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(options["threads"])
    dist = distributed.init_distributed("cpu")
    try:
        ns = argparse.Namespace(**options)
        rows = [measure(ns, b, sharding, dist) for sharding in options["shardings"] for b in options["batch_sizes"]]
    finally:
        distributed.cleanup(dist)
    (out / f"rank{rank}.json").write_text(json.dumps(rows))


def measure(ns: argparse.Namespace, b: int, sharding: str, dist: Any) -> dict[str, Any]:
    """Step and state-exchange times (seconds, per step) and bytes of one rank at batch b."""
    from clip_glofnd import distributed
    from clip_glofnd.step import train_step
    parts, make_batch = _setup(ns, b, sharding, dist)
    for step in range(ns.warmup):
        train_step(make_batch(step), parts, epoch=0)
    counted = count_bytes(parts, make_batch(ns.warmup))
    store = parts.store
    times: dict[str, list[float]] = {"fetch": [], "commit": [], "wait": []}

    def timed(name: str, call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            distributed.barrier(dist)                                    # the other ranks' lag is not the exchange's
            middle = time.perf_counter()
            value = call(*args, **kwargs)
            times["wait"].append(middle - start)
            times[name].append(time.perf_counter() - middle)
            return value
        return wrapper

    store.fetch, store.commit = timed("fetch", store.fetch), timed("commit", store.commit)   # what train_step calls
    step_times = []
    for step in range(ns.warmup + 1, ns.warmup + 1 + ns.steps):
        batch = make_batch(step)
        distributed.barrier(dist)
        start = time.perf_counter()
        train_step(batch, parts, epoch=0)
        step_times.append(time.perf_counter() - start)
    del store.fetch, store.commit                                         # the class's methods again
    ids = make_batch(0).ids
    ids_all, = distributed.all_gather_no_grad([ids], dist)
    distributed.barrier(dist)
    start = time.perf_counter()
    for _ in range(ns.sync_repeats):
        store.fetch(ids, ids_all)
        store.commit()
    isolated = (time.perf_counter() - start) / ns.sync_repeats
    sync_times = [f + c for f, c in zip(times["fetch"], times["commit"])]
    waits = [sum(times["wait"][i:i + 2]) for i in range(0, len(times["wait"]), 2)]
    return {"batch": b, "sharding": sharding, "world_size": dist.world_size, "embed_dim": counted.pop("embed_dim"),
            "step_times_s": step_times, "sync_times_s": sync_times, "wait_times_s": waits,
            "sync_isolated_s": isolated, "bytes": counted}


def _setup(ns: argparse.Namespace, b: int, sharding: str, dist: Any) -> tuple[Any, Any]:
    """Parts from build_parts and a function step -> this rank's Batch of random data with its own ids."""
    from clip_glofnd.step import build_parts
    from clip_glofnd.config import from_flat
    from clip_glofnd.data import Batch
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    model = create_model(ns.model)[0]
    cfg = from_flat({"train_data": "unused", "model": ns.model, "batch_size": b, "loss": ns.loss, "fnd": "glofnd",
                     "fnd_alpha": 0.01, "state_sharding": sharding})
    parts = build_parts(cfg, dist, model, ns.num_samples)
    size, ctx, vocab = model.visual.image_size, model.context_length, model.vocab_size
    size = size if isinstance(size, int) else size[0]
    world = dist.world_size

    def make_batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(step)
        global_ids = torch.randperm(ns.num_samples, generator=g)[:world * b]           # [W·b] this step's samples
        texts = torch.randint(1, vocab - 1, (b, ctx), generator=g)
        texts[:, -1] = vocab - 1                                                     # end-of-text token
        return Batch(torch.randn(b, 3, size, size, generator=g), texts,
                     global_ids[dist.rank * b:(dist.rank + 1) * b], torch.randint(0, 10, (b,), generator=g))
    return parts, make_batch


def count_bytes(parts: Any, batch: Any) -> dict[str, int]:
    """Bytes this rank puts into and gets out of the collectives of one train_step (see the module docstring)."""
    from clip_glofnd import distributed
    from clip_glofnd.step import train_step
    calls: list[tuple[torch.dtype, int, int]] = []
    exchanges: list[tuple[int, int]] = []
    gather, exchange = distributed._all_gather, distributed.exchange_rows

    def recording(tensor: torch.Tensor) -> torch.Tensor:
        gathered = gather(tensor)
        calls.append((tensor.dtype, tensor.numel() * tensor.element_size(),
                      gathered.numel() * gathered.element_size()))
        return gathered

    def recording_exchange(fields: Any, send: Sequence[int], recv: Sequence[int], dist: Any) -> list[torch.Tensor]:
        row_bytes = sum(f[:1].numel() * f.element_size() for f in fields)
        exchanges.append((sum(send) * row_bytes, sum(recv) * row_bytes))
        return exchange(fields, send, recv, dist)

    distributed._all_gather, distributed.exchange_rows = recording, recording_exchange
    try:
        train_step(batch, parts, epoch=0)
    finally:
        distributed._all_gather, distributed.exchange_rows = gather, exchange
    sharded = parts.store.sharded
    kinds = [dtype for dtype, _, _ in calls]
    expected = [torch.int64, torch.int64, torch.float32, torch.float32, torch.uint8]   # ids, labels, features, rows
    if kinds != expected or len(exchanges) != (1 if sharded else 0):
        raise RuntimeError(f"train_step's collectives changed ({kinds}, {len(exchanges)} exchanges; expected "
                           f"{expected}); update benchmarks/sync_share.py")
    (_, ids_s, ids_r), (_, lab_s, lab_r), (_, img_s, img_r), (_, txt_s, txt_r) = calls[:4]
    row_s, row_r = calls[4][1:]                                      # commit: the written rows, all-gathered
    if sharded:                                                       # fetch: the fixed-size all-to-all (W·b rows)
        row_s, row_r = row_s + exchanges[0][0], row_r + exchanges[0][1]
    trainable = sum(p.numel() * p.element_size() for p in parts.model.parameters() if p.requires_grad)
    return {"ids_send": ids_s, "ids_recv": ids_r, "labels_send": lab_s, "labels_recv": lab_r,
            "features_send": img_s + txt_s, "features_recv": img_r + txt_r,
            "features_grad_reduce": img_r + txt_r,                            # gloo all-reduce of the gathered grad
            "state_rows_send": row_s, "state_rows_recv": row_r,
            "state_row_bytes_per_anchor": calls[4][1] // len(batch),
            "gradients_allreduce": trainable, "embed_dim": img_s // (4 * len(batch))}


def merge_ranks(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row per (world size, sharding, batch size): medians per rank, their mean, the exchange's share of the
    step; rank 0's bytes, with the state rows as the mean over ranks (by-id: they vary with the batch's ids), and
    the state bytes extrapolated to W = 64."""
    step = [statistics.median(r["step_times_s"]) for r in rows]
    sync = [statistics.median(r["sync_times_s"]) for r in rows]
    wait = [statistics.median(r["wait_times_s"]) for r in rows]
    isolated = [r["sync_isolated_s"] for r in rows]
    row: dict[str, Any] = {"world_size": rows[0]["world_size"], "sharding": rows[0]["sharding"],
                           "batch": rows[0]["batch"], "embed_dim": rows[0]["embed_dim"],
                           "step_s": statistics.mean(step), "sync_s": statistics.mean(sync),
                           "sync_isolated_s": statistics.mean(isolated), "wait_s": statistics.mean(wait), "per_rank": {
                               "step_median_s": step, "sync_median_s": sync, "wait_median_s": wait,
                               "sync_isolated_s": isolated, "step_times_s": [r["step_times_s"] for r in rows],
                               "state_rows_send": [r["bytes"]["state_rows_send"] for r in rows],
                               "state_rows_recv": [r["bytes"]["state_rows_recv"] for r in rows]}}
    row["sync_share_pct"] = 100 * row["sync_s"] / row["step_s"]
    row["sync_isolated_share_pct"] = 100 * row["sync_isolated_s"] / row["step_s"]
    row["bytes"] = dict(rows[0]["bytes"])
    for key in ("state_rows_send", "state_rows_recv"):
        row["bytes"][key] = statistics.mean(row["per_rank"][key])
    gathered = ("ids_send", "labels_send", "features_send", "state_rows_send")
    row["bytes"]["gathers_send_total"] = sum(row["bytes"][k] for k in gathered)
    row["state_rows_share_of_gathers_pct"] = 100 * row["bytes"]["state_rows_send"] / row["bytes"]["gathers_send_total"]
    row["extrapolated"] = extrapolate(row, EXTRAPOLATE_TO)
    return row


def extrapolate(row: dict[str, Any], world: int) -> dict[str, Any]:
    """State bytes per rank per step at `world` ranks from the measured bytes per anchor (with its id): both
    placements all-gather the written rows after the step (b out, world·b in); by-id also fetches before it with a
    fixed-size all-to-all, world·b rows (without ids) each way — every owner answers every requester's b slots, so
    that no split size is read on the host."""
    b, per_anchor = row["batch"], row["bytes"]["state_row_bytes_per_anchor"]
    send, recv = b * per_anchor, world * b * per_anchor
    if row["sharding"] == "by-id":
        send, recv = send + world * b * (per_anchor - 8), recv + world * b * (per_anchor - 8)
    return {"world_size": world, "state_rows_send": send, "state_rows_recv": recv,
            "features_send": row["bytes"]["features_send"],
            "features_recv": world * row["bytes"]["features_send"]}


def report(result: dict[str, Any]) -> str:
    """Three tables: times and shares; bytes per rank per step; state bytes extrapolated to W = 64."""
    rows = [{**r, **r["bytes"], **{f"x_{k}": v for k, v in r["extrapolated"].items()}} for r in result["rows"]]
    key = [("world_size", "W", "d", 1), ("sharding", "sharding", "s", 1), ("batch", "b/rank", "d", 1)]
    times = _common.format_table(rows, key + [
        ("step_s", "step (ms)", ".1f", 1e3), ("sync_s", "exchange in step (ms)", ".3f", 1e3),
        ("sync_share_pct", "share %", ".3f", 1), ("sync_isolated_s", "exchange alone (ms)", ".3f", 1e3),
        ("sync_isolated_share_pct", "alone share %", ".3f", 1), ("wait_s", "wait before it (ms)", ".3f", 1e3)])
    volume = _common.format_table(rows, key + [
        ("features_send", "features send (KB)", ".1f", 1e-3), ("features_recv", "features recv (KB)", ".1f", 1e-3),
        ("ids_send", "ids send (B)", "d", 1), ("state_rows_send", "state send (KB)", ".2f", 1e-3),
        ("state_rows_recv", "state recv (KB)", ".2f", 1e-3), ("state_row_bytes_per_anchor", "state B/anchor", "d", 1),
        ("state_rows_share_of_gathers_pct", "state % of sends", ".2f", 1),
        ("gradients_allreduce", "DDP grads (MB)", ".1f", 1e-6)])
    extrapolated = _common.format_table(rows, key + [
        ("x_state_rows_send", f"state send W={EXTRAPOLATE_TO} (KB)", ".1f", 1e-3),
        ("x_state_rows_recv", f"state recv W={EXTRAPOLATE_TO} (KB)", ".1f", 1e-3),
        ("x_features_recv", f"features recv W={EXTRAPOLATE_TO} (KB)", ".1f", 1e-3)])
    machine = result["machine"]
    head = (f"{', '.join(map(str, result['world_sizes']))} gloo processes x "
            f"{'/'.join(map(str, machine['threads_per_process']))} thread(s), {result['config']['model']}, loss "
            f"{result['config']['loss']} + GloFND, {machine['cpu_model']}, load {machine['loadavg_1min_start']:.1f} "
            f"-> {machine['loadavg_1min_end']:.1f}{' (UNDER LOAD)' if machine['under_load'] else ''}")
    return "\n\n".join([head, "Time per step (medians, mean over ranks)\n" + times,
                        "Bytes per rank per step (tensors into / out of the collectives; state: mean over ranks)\n"
                        + volume, f"State exchange extrapolated to W = {EXTRAPOLATE_TO} (from the bytes per "
                                  f"anchor)\n" + extrapolated])


if __name__ == "__main__":
    raise SystemExit(main())
