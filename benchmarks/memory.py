"""Per-sample state bytes of GloFND and the losses, per rank for each placement, extrapolated to CC3M, CC12M,
LAION-400M and DataComp-1B, and the bytes each rank moves per step to keep the state consistent.

Measured from the real objects, not from a formula: the `state_dict()` bytes of `GloFND(n)` and
`create_loss(name, n)` at n and 2n give bytes per sample (the slope) and a size-independent constant (FastCLIP-v3's
τ). Per placement (--state-device, --state-sharding; clip_glofnd/state.py) the bytes a rank holds are counted from a
real `StateStore` built as step.build_parts builds it, for rank 0 of W (no process group needed), at n and 2n:
on the training device and in CPU memory, slope and constant (by-id: 40·n/W + the working rows).

Bytes per step are what the real code puts into its collectives, recorded with fakes: replicated, the packed
[b, bytes per row] tensor `distributed.sync_rows` all-gathers (ids + every holder's rows); by-id, the fixed-size
`distributed.exchange_rows` all-to-all of `StateStore.fetch` (W·b rows each way, so that no split size is read on
the host), run for every rank of W on one random global batch of distinct ids; its commit all-gathers the written
rows as the replicated placement does. GloFND on both modalities plus the loss.

Prints tables and writes benchmarks/results/memory.json.

    python -m benchmarks.memory            # < 5 s
    python -m benchmarks.memory --quick    # the same at tiny sizes (CI)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from benchmarks import _common
from clip_glofnd import distributed
from clip_glofnd.glofnd import GloFND
from clip_glofnd.losses import create_loss
from clip_glofnd.state import StateStore, working_rows

DATASETS = {"CC3M": 3_318_333, "CC12M": 12_423_374,
            "LAION-400M": 400_000_000,        # nominal (the release has ~413M pairs)
            "DataComp-1B": 1_400_000_000}     # the DataComp paper's count (1.4B pairs)
PLACEMENTS = (("train", "replicated"), ("cpu", "replicated"), ("train", "by-id"), ("cpu", "by-id"))
LOSSES = ("clip", "sogclr", "fastclip")
ALPHA = 1e-3


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags (--quick: tiny n, one batch size, one world size)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--num-samples", type=int, help="n of the measured objects (and 2n); default 10000, quick 64")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="local batch b of the sync (default 128 1024)")
    p.add_argument("--world-sizes", type=int, nargs="+", help="ranks W of the sync and the shards (default 8 64)")
    p.add_argument("--placement-batch", type=int, default=1024, help="--batch-size per rank (the working rows)")
    p.add_argument("--loss", default="sogclr", choices=LOSSES, help="loss of the per-placement tables")
    p.add_argument("--embed-dim", type=int, default=512, help="d of the feature all-gather shown for scale")
    p.add_argument("--output", type=Path, help="JSON path (default: benchmarks/results/memory.json)")
    ns = p.parse_args(list(argv))
    ns.num_samples = ns.num_samples or (64 if ns.quick else 10_000)
    ns.batch_sizes = ns.batch_sizes or ([8] if ns.quick else [128, 1024])
    ns.world_sizes = ns.world_sizes or ([2] if ns.quick else [8, 64])
    ns.output = ns.output or _common.RESULTS_DIR / f"memory{'_quick' if ns.quick else ''}.json"
    if min(ns.world_sizes) < 2 or ns.num_samples < max(ns.batch_sizes):
        p.error("need --world-sizes >= 2 (one process syncs nothing) and --num-samples >= every batch size")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print tables, write the JSON; returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = parse_args(argv)
    torch.manual_seed(0)
    info = _common.machine_info(torch.device("cpu"))
    state = state_bytes(ns.num_samples)
    result = {
        "benchmark": "memory",
        "command": _common.command_line("benchmarks.memory", argv),
        "machine": _common.finish_info(info),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
        "state": state,
        "datasets": extrapolate(state),
        "sync": [sync_volume(ns.num_samples, b, loss, ns.world_sizes, ns.embed_dim)
                 for b in ns.batch_sizes for loss in LOSSES],
        "placements": [placement_bytes(ns.num_samples, w, device, sharding, ns.loss, ns.placement_batch)
                       for w in ns.world_sizes for device, sharding in PLACEMENTS],
        "exchange": [exchange_volume(ns.num_samples, b, ns.loss, w) for b in ns.batch_sizes for w in ns.world_sizes],
    }
    result["placement_datasets"] = extrapolate_placements(result["placements"])
    _common.write_json(ns.output, result)
    print(_report(result))
    print(f"wrote {ns.output}")
    return 0


def nbytes(state_dict: dict[str, Tensor]) -> int:
    """Bytes held by the tensors of a state_dict."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def slope(make: Any, n: int) -> dict[str, float]:
    """Bytes per sample and constant bytes of the state_dict of `make(n)`, from n and 2n; per-key bytes per sample."""
    small, large = make(n).state_dict(), make(2 * n).state_dict()
    per_sample = (nbytes(large) - nbytes(small)) / n
    per_key = {key: (nbytes({key: large[key]}) - nbytes({key: small[key]})) / n for key in small}
    return {"bytes_per_sample": per_sample, "constant_bytes": nbytes(small) - per_sample * n, "per_key": per_key}


def state_bytes(n: int) -> dict[str, Any]:
    """Measured per-sample bytes: one GloFND (one anchor modality) and each loss; totals for image + text anchors."""
    glofnd = slope(lambda k: GloFND(k, ALPHA), n)
    losses = {name: slope(lambda k, name=name: create_loss(name, k), n) for name in LOSSES}
    totals = {name: {"bytes_per_sample": 2 * glofnd["bytes_per_sample"] + loss["bytes_per_sample"],
                     "constant_bytes": 2 * glofnd["constant_bytes"] + loss["constant_bytes"]}
              for name, loss in losses.items()}
    return {"measured_at_num_samples": n, "glofnd_one_modality": glofnd, "loss": losses, "total_glofnd_both": totals}


def extrapolate(state: dict[str, Any]) -> list[dict[str, Any]]:
    """State bytes (per process: replicated on every rank) for each data set size and loss, GloFND on both sides."""
    rows = []
    for dataset, n in DATASETS.items():
        row: dict[str, Any] = {"dataset": dataset, "num_samples": n}
        for name, total in state["total_glofnd_both"].items():
            row[f"{name}_bytes"] = total["bytes_per_sample"] * n + total["constant_bytes"]
        rows.append(row)
    return rows


def sync_volume(n: int, b: int, loss: str, world_sizes: Sequence[int], embed_dim: int) -> dict[str, Any]:
    """Bytes one rank sends and receives per step in `sync_rows([glofnd_img, glofnd_txt, loss_fn], ids, dist)`."""
    holders = [GloFND(n, ALPHA), GloFND(n, ALPHA), create_loss(loss, n)]
    ids = torch.randperm(n)[:b]                                               # [b] this rank's local anchors
    row: dict[str, Any] = {"batch": b, "loss": loss}
    for world in world_sizes:
        packed = _record_sync(holders, ids, world)                             # [b, bytes per row] uint8
        row |= {"row_bytes": packed.shape[1], "send_bytes": packed.numel() * packed.element_size()}
        row[f"recv_bytes_w{world}"] = world * row["send_bytes"]                # all-gather output on every rank
    row["feature_gather_bytes_per_anchor"] = 2 * embed_dim * 4                # img + txt rows [d] float32, for scale
    return row


def _record_sync(holders: Sequence[Any], ids: Tensor, world: int) -> Tensor:
    """Run the real sync_rows with `world` fake ranks (every rank holding these ids); returns the tensor it gathers."""
    seen: list[Tensor] = []

    def fake_all_gather(tensor: Tensor) -> Tensor:
        seen.append(tensor)
        return torch.cat([tensor] * world)                                     # [W*b, bytes per row]

    dist = distributed.DistInfo(rank=0, world_size=world)
    with mock.patch.object(distributed, "_all_gather", fake_all_gather):
        distributed.sync_rows(holders, ids, dist)
    if len(seen) != 1 or seen[0].dtype != torch.uint8 or seen[0].shape[0] != len(ids):
        raise RuntimeError(f"sync_rows no longer does one uint8 [b, bytes] all-gather (saw {[t.shape for t in seen]}); "
                           "update benchmarks/memory.py")
    return seen[0]


def _holders(rows: int, loss: str) -> dict[str, Any]:
    """The math objects step.build_parts makes, with `rows` rows."""
    return {"fnd_img": GloFND(rows, ALPHA), "fnd_txt": GloFND(rows, ALPHA), "loss": create_loss(loss, rows)}


def _store_bytes(n: int, world: int, device: str, sharding: str, loss: str, batch: int) -> dict[str, int]:
    """Bytes rank 0 of `world` holds for n samples: on the training device and in CPU memory."""
    store = StateStore(_holders(working_rows(n, batch, device, sharding), loss), n,
                       distributed.DistInfo(rank=0, world_size=world), device=device, sharding=sharding,
                       batch_size=batch)
    holders = sum(nbytes(dict(h.state_dict())) for h in store.holders.values())     # full tables or working rows
    tables = sum(nbytes(cols) for cols in store.tables.values())                    # lent placements only
    on_cpu = tables if device == "cpu" else 0
    return {"train_device_bytes": holders + tables - on_cpu, "cpu_bytes": on_cpu}


def placement_bytes(n: int, world: int, device: str, sharding: str, loss: str, batch: int) -> dict[str, Any]:
    """Per-rank bytes of one placement, as slope (bytes per sample) and constant, from n and 2n samples (n rounded up
    to a multiple of W, so that every shard has n/W rows)."""
    n = -(-n // world) * world
    small, large = (_store_bytes(k, world, device, sharding, loss, batch) for k in (n, 2 * n))
    row: dict[str, Any] = {"world_size": world, "state_device": device, "state_sharding": sharding, "loss": loss,
                           "batch": batch}
    for where in ("train_device", "cpu"):
        slope_ = (large[f"{where}_bytes"] - small[f"{where}_bytes"]) / n
        row[f"{where}_bytes_per_sample"] = slope_
        row[f"{where}_constant_bytes"] = small[f"{where}_bytes"] - slope_ * n
    return row


def extrapolate_placements(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-rank bytes (training device, CPU) of each placement for each data set size."""
    out = []
    for dataset, n in DATASETS.items():
        for row in rows:
            entry = {"dataset": dataset, "num_samples": n, **{k: row[k] for k in ("world_size", "state_device",
                                                                                   "state_sharding")}}
            for where in ("train_device", "cpu"):
                entry[f"{where}_bytes"] = row[f"{where}_bytes_per_sample"] * n + row[f"{where}_constant_bytes"]
            out.append(entry)
    return out


def exchange_volume(n: int, b: int, loss: str, world: int) -> dict[str, Any]:
    """Bytes each rank sends / receives per step in the by-id fetch (--state-sharding by-id): the fixed-size all-to-all
    of StateStore.fetch for every rank on one global batch of W·b distinct random ids, with `distributed.exchange_rows`
    recording its sizes (W·b rows each way: every owner answers every requester's b slots). Its commit all-gathers
    the written rows as the replicated placement does (replicated_send / replicated_recv)."""
    ids_all = torch.randperm(max(n, world * b))[:world * b]                    # [W·b] the global batch
    sizes: list[tuple[int, int]] = []

    def fake_exchange(fields: Sequence[Tensor], send: Sequence[int], recv: Sequence[int], dist: Any) -> list[Tensor]:
        row_bytes = sum(f[:1].numel() * f.element_size() for f in fields)
        sizes.append((sum(send) * row_bytes, sum(recv) * row_bytes))
        return [torch.zeros((sum(recv), *f.shape[1:]), dtype=f.dtype) for f in fields]

    per_rank = []
    with mock.patch.object(distributed, "exchange_rows", fake_exchange):
        for rank in range(world):
            store = StateStore(_holders(b, loss), max(n, world * b), distributed.DistInfo(rank=rank, world_size=world),
                               sharding="by-id", batch_size=b)
            sizes.clear()
            store.fetch(ids_all[rank * b:(rank + 1) * b], ids_all)
            store.discard()
            per_rank.append({"send": sum(s for s, _ in sizes), "recv": sum(r for _, r in sizes)})
    row_bytes = 2 * (3 * 4 + 4) + (8 if loss != "clip" else 0)
    return {"batch": b, "world_size": world, "loss": loss,
            "send_mean": sum(r["send"] for r in per_rank) / world, "send_max": max(r["send"] for r in per_rank),
            "recv_mean": sum(r["recv"] for r in per_rank) / world, "recv_max": max(r["recv"] for r in per_rank),
            "formula_each_way": world * b * row_bytes, "replicated_send": b * (8 + row_bytes),
            "replicated_recv": world * b * (8 + row_bytes)}


def _report(result: dict[str, Any]) -> str:
    """Tables: per-sample bytes, data set totals, sync volume."""
    state = result["state"]
    glofnd, worlds = state["glofnd_one_modality"], result["config"]["world_sizes"]
    per_sample = [{"holder": "GloFND, one modality", **glofnd}] + [
        {"holder": f"loss {name}", **loss} for name, loss in state["loss"].items()] + [
        {"holder": f"GloFND img+txt + {name}", **total, "per_key": {}}
        for name, total in state["total_glofnd_both"].items()]
    for row in per_sample:
        row["keys"] = ", ".join(f"{k} {v:g}" for k, v in row["per_key"].items()) or "-"
    data_cols = [("dataset", "data set", "s", 1), ("num_samples", "n", ",d", 1)] + [
        (f"{name}_bytes", f"GloFND + {name} (MB)", ",.1f", 1e-6) for name in LOSSES]
    sync_cols = [("batch", "b", "d", 1), ("loss", "loss", "s", 1), ("row_bytes", "B/anchor", "d", 1),
                 ("send_bytes", "send (KB)", ".1f", 1e-3)] + [
        (f"recv_bytes_w{w}", f"recv W={w} (KB)", ".1f", 1e-3) for w in worlds] + [
        ("feature_gather_bytes_per_anchor", "features B/anchor", "d", 1)]
    return "\n\n".join([
        f"Per-sample state, measured at n={state['measured_at_num_samples']} and 2n\n" + _common.format_table(
            per_sample, [("holder", "holder", "s", 1), ("bytes_per_sample", "B/sample", "g", 1),
                         ("constant_bytes", "constant B", "g", 1), ("keys", "per key B/sample", "s", 1)]),
        "State per process (replicated on every rank)\n" + _common.format_table(result["datasets"], data_cols),
        "sync_rows per rank per step (ids + GloFND img/txt rows + loss rows)\n"
        + _common.format_table(result["sync"], sync_cols),
        f"Per-rank state by placement (rank 0 of W, loss {result['config']['loss']}, working rows = --batch-size "
        f"{result['config']['placement_batch']})\n" + _common.format_table(result["placements"], [
            ("world_size", "W", "d", 1), ("state_device", "--state-device", "s", 1),
            ("state_sharding", "--state-sharding", "s", 1),
            ("train_device_bytes_per_sample", "device B/sample", "g", 1),
            ("train_device_constant_bytes", "device constant B", "g", 1),
            ("cpu_bytes_per_sample", "CPU B/sample", "g", 1), ("cpu_constant_bytes", "CPU constant B", "g", 1)]),
        "Per-rank state by placement and data set (GB)\n" + _common.format_table(result["placement_datasets"], [
            ("dataset", "data set", "s", 1), ("world_size", "W", "d", 1), ("state_device", "device", "s", 1),
            ("state_sharding", "sharding", "s", 1), ("train_device_bytes", "training device (GB)", ",.3f", 1e-9),
            ("cpu_bytes", "CPU (GB)", ",.3f", 1e-9)]),
        "by-id fetch: the fixed-size all-to-all's bytes per rank per step (its commit is the replicated all-gather)\n"
        + _common.format_table(result["exchange"], [
            ("batch", "b", "d", 1), ("world_size", "W", "d", 1), ("send_mean", "send mean (KB)", ".1f", 1e-3),
            ("send_max", "send max (KB)", ".1f", 1e-3), ("recv_mean", "recv mean (KB)", ".1f", 1e-3),
            ("recv_max", "recv max (KB)", ".1f", 1e-3), ("formula_each_way", "W·b·row (KB)", ".1f", 1e-3),
            ("replicated_send", "replicated send (KB)", ".1f", 1e-3),
            ("replicated_recv", "replicated recv (KB)", ".1f", 1e-3)]),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
