"""Per-sample state bytes of GloFND and the losses, extrapolated to CC3M / CC12M / 1B, and the per-step row sync.

Measured from the real objects, not from a formula: the `state_dict()` bytes of `GloFND(n)` and
`create_loss(name, n)` at n and 2n give bytes per sample (the slope) and a size-independent constant (FastCLIP-v3's
τ). The sync volume is what `distributed.sync_rows` puts on the wire: it is run with a fake all-gather that records
the packed [b, bytes per row] tensor (ids + every holder's rows), for GloFND on both modalities plus the loss.

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

DATASETS = {"CC3M": 3_318_333, "CC12M": 12_423_374, "1B": 1_000_000_000}
LOSSES = ("clip", "sogclr", "fastclip")
ALPHA = 1e-3


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags (--quick: tiny n, one batch size, one world size)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--num-samples", type=int, help="n of the measured objects (and 2n); default 10000, quick 64")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="local batch b of the sync (default 128 1024)")
    p.add_argument("--world-sizes", type=int, nargs="+", help="ranks W of the sync (default 8 64)")
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
    }
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
    ])


if __name__ == "__main__":
    raise SystemExit(main())
