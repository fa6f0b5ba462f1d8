"""Issue #17's GPU measurements in one command that keeps to a deadline (one GPU, about 8 minutes).

    python -m benchmarks.gpu --out DIR                        # one GPU, --budget-s 480 (8 min) by default
    python -m benchmarks.gpu --device cpu --quick --out DIR   # ~20 s on 2 CPU cores, tiny sizes (CI)
    bash benchmarks/gpu_run.sh run "$OUT"                     # on the GPU machine, wheels from `gpu_run.sh prepare`

Parts, cheapest and most wanted first; the compiled trainer runs, the slowest, come last:

a. **Throughput.** samples/s of `clip-glofnd train` (--fnd none, --fnd glofnd) and of `open_clip_train.main` on the
   same synthetic 224 px JPEG shards, ViT-B-32, batch 256, amp_bf16, TF32 as each trainer sets it, run and parsed by
   benchmarks/throughput.py (step = data wait + compute + that step's log line; the first --skip-steps steps, which
   hold the compilation, left out). Eager runs first; the same three with --torch-compile at the end (`clip-glofnd
   train` accepts that flag only once issue #17's training step is merged: until then its compiled runs record the
   error).
b. **GloFND on the device.** benchmarks/overhead.py at b 1024, M 8192 and 32768: one modality's fused
   `update_and_mask` against one read of the [b, M] float32 similarity (`sim.sum()`), and both modalities' calls as a
   share of a ViT-B-32 step (bf16 autocast).
c. **Host syncs per step.** The real training step (`step.build_parts` + the step function `step_function()` names,
   on batches from `train.make_loader`, pinned) under `torch.cuda.set_sync_debug_mode("warn")`: warnings counted over
   --sync-steps steady steps (after --sync-warmup), for --fnd none / glofnd × --loss clip / sogclr / fastclip, with
   the first warnings' sources (the innermost clip_glofnd frame). On CPU: "n/a (CPU)", the steps still run.
d. **Peak GPU memory per state placement.** The same step (CLIP + GloFND, n = --memory-num-samples ids, batch ids
   spread over them) for --state-device train|cpu × --state-sharding replicated|by-id at world size 1:
   `torch.cuda.max_memory_allocated` over building the parts and --memory-steps steps, and the steady step time.

Before a part starts, its estimate is checked against the time left of --budget-s; a part (or trainer run) that
does not fit is skipped with a note in the JSON, and trainer processes are killed at the deadline. DIR/gpu.json and
DIR/gpu.md are rewritten after every part, so a run cut short still leaves what it measured. Nothing is downloaded:
the models are randomly initialised and the shards are made here (benchmarks/loader_throughput.make_synthetic).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common

logger = logging.getLogger(__name__)

PRESETS = {
    "gpu": dict(model="ViT-B-32", precision="amp_bf16", batch_size=256, image_size=224, skip_steps=5, steps=40,
                log_every=10,
                sync_warmup=3, sync_steps=20, memory_steps=5, memory_num_samples=10**7, cached_batches=6,
                trainers=("ours_clip", "ours_glofnd", "openclip"), compiled=("openclip", "ours_glofnd", "ours_clip"),
                overhead=["--batch-sizes", "1024", "--candidates", "8192", "32768", "--warmup", "2", "--repeats", "4",
                          "--micro-repeats", "10", "--sweep", "1e6", "--sweep-batch", "1024",
                          "--sweep-candidates", "8192"]),
    "quick": dict(model="clip-tiny", precision="fp32", batch_size=8, image_size=64, skip_steps=1, steps=3,
                  log_every=1,
                  sync_warmup=1, sync_steps=2, memory_steps=2, memory_num_samples=1000, cached_batches=2,
                  trainers=("ours_glofnd",), compiled=(), overhead=["--quick", "--max-num-samples", "1000"]),
}
ESTIMATES_S = {   # seconds per item on one H100 (start-up, compilation and loader start included), and on CPU --quick
    "gpu": dict(shards=25, trainer=45, compiled=110, overhead=90, sync_bed=20, sync=12, memory=15),
    "quick": dict(shards=1, trainer=12, compiled=30, overhead=4, sync_bed=3, sync=1, memory=1),
}
LOSSES = ("clip", "sogclr", "fastclip")
PLACEMENTS = (("train", "replicated"), ("cpu", "replicated"), ("train", "by-id"), ("cpu", "by-id"))
SYNC_MESSAGE = "synchroniz"           # torch: "called a synchronizing CUDA operation"


def step_function() -> Callable:
    """The training step every in-process part calls: the one import to repoint when train_step moves."""
    from clip_glofnd.step import train_step
    return train_step


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; the sizes come from the preset (gpu, or quick with --quick)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.md and the parts' own JSON")
    p.add_argument("--budget-s", type=float, default=480.0, help="total wall-time budget; parts that would overrun "
                                                                  "are skipped (default 480)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, ours only in (a), no compiled runs (CI)")
    p.add_argument("--workers", type=int, help="loader workers (default: CPU cores - 2, at most 12; quick: 1)")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ac' (default abcd)")
    p.add_argument("--no-compile", action="store_true", help="leave out the --torch-compile trainer runs")
    ns = p.parse_args(list(argv))
    ns.preset = PRESETS["quick" if ns.quick else "gpu"]
    ns.estimates = ESTIMATES_S["quick" if ns.quick else "gpu"]
    ns.workers = ns.workers or (1 if ns.quick else max(1, min(12, (os.cpu_count() or 4) - 2)))
    if set(ns.parts) - set("abcd"):
        p.error(f"--parts {ns.parts!r}: letters from 'abcd' only")
    return ns


# ------------------------------------------------------------------------------------------------- the deadline
@dataclass
class Clock:
    """Wall time left of the budget, and the notes of what did not fit."""

    budget_s: float
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def skip_note(self, what: str, estimate_s: float) -> str | None:
        """None if `what` (estimated at estimate_s) fits in the time left, else why it is skipped."""
        if estimate_s <= self.left():
            return None
        return f"skipped: {what} needs ~{estimate_s:.0f} s, {max(0.0, self.left()):.0f} s of the budget left"


def time_plan(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """Each item with its estimated seconds and the cumulative total, in run order."""
    e, preset = ns.estimates, ns.preset
    items = [("shards", e["shards"])]
    items += [(f"a: {t}", e["trainer"]) for t in preset["trainers"]] if "a" in ns.parts else []
    items += [("b: overhead", e["overhead"])] if "b" in ns.parts else []
    items += [("c: syncs", e["sync_bed"] + 2 * len(LOSSES) * e["sync"])] if "c" in ns.parts else []
    items += [("d: memory", len(PLACEMENTS) * e["memory"])] if "d" in ns.parts else []
    compiled = () if ns.no_compile or "a" not in ns.parts else preset["compiled"]
    items += [(f"a: {t} --torch-compile", e["compiled"]) for t in compiled]
    plan, total = [], 0.0
    for name, seconds in items:
        total += seconds
        plan.append({"item": name, "estimate_s": seconds, "cumulative_s": total})
    return plan


# -------------------------------------------------------------------------------------------- (a) throughput
def trainer_runs(ns: argparse.Namespace, data: dict[str, Any], scratch: Path, clock: Clock, compiled: bool
                 ) -> list[dict[str, Any]]:
    """Each trainer of the preset once (compiled or not) through benchmarks/throughput.py, within the deadline."""
    from benchmarks import throughput
    preset = ns.preset
    tns = throughput.parse_args(["--model", preset["model"], "--precision", preset["precision"], "--device",
                                 ns.device, "--batch-size", str(preset["batch_size"]), "--workers", str(ns.workers),
                                 "--epochs", "1", "--repeats", "1", "--skip-steps", str(preset["skip_steps"]),
                                 "--train-num-samples", str(data["num_samples"]),
                                 "--log-every-n-steps", str(preset["log_every"]),
                                 *(["--torch-compile"] if compiled else [])])
    cmds = throughput.commands(tns, data, scratch / "logs", repeat=int(compiled))
    runs = []
    for trainer in preset["compiled"] if compiled else preset["trainers"]:
        estimate = ns.estimates["compiled" if compiled else "trainer"]
        run = {"trainer": trainer, "torch_compile": compiled, "command": " ".join(cmds[trainer])}
        note = clock.skip_note(f"{trainer}{' compiled' if compiled else ''}", estimate)
        if note:
            runs.append(run | {"skipped": note})
            continue
        try:
            run |= throughput.run_trainer(trainer, cmds[trainer], scratch / "logs", preset["batch_size"],
                                          preset["skip_steps"], timeout=max(1.0, clock.left()))
        except subprocess.TimeoutExpired:
            run["skipped"] = f"killed at the deadline after {clock.elapsed():.0f} s of the run"
        except RuntimeError as error:                              # e.g. ours without --torch-compile before #17
            run["error"] = str(error)[-1500:]
        runs.append(run)
        logger.info("a: %s%s: %s", trainer, " compiled" if compiled else "",
                    f"{run['samples_per_s']:.1f} samples/s" if "samples_per_s" in run else "no rate")
    return runs


def throughput_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """ours / OpenCLIP samples/s per compile mode, where both ran."""
    rates = {(r["trainer"], r["torch_compile"]): r["samples_per_s"] for r in runs if "samples_per_s" in r}
    out = {}
    for compiled in (False, True):
        base = rates.get(("openclip", compiled))
        for ours in ("ours_clip", "ours_glofnd"):
            if base and (ours, compiled) in rates:
                out[f"{ours}_vs_openclip{'_compiled' if compiled else ''}"] = rates[(ours, compiled)] / base
    return out


# ------------------------------------------------------------------------------------------- (b) overhead
def overhead_part(ns: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/overhead.py in this process at the preset's sizes; its rows reduced to the read and share
    columns."""
    from benchmarks import overhead
    path = ns.out / f"overhead_{ns.device}.json"
    argv = ["--device", ns.device, *ns.preset["overhead"], "--output", str(path)]
    overhead.main(argv)
    result = json.loads(path.read_text())
    keys = ("batch", "candidates", "read_s", "fused_one_s", "fused_vs_read", "fused_s", "step_plain_s", "fused_pct",
            "prep_s", "fused_total_pct")
    return {"command": _common.command_line("benchmarks.overhead", argv), "json": path.name,
            "rows": [{k: row[k] for k in keys} for row in result["steps"]], "targets": result["targets"]}


# ------------------------------------------------------------------------------------ (c, d) the real step
@dataclass
class StepBed:
    """What the in-process parts share: the model template (CPU), its data batches, and the run's sizes."""

    ns: argparse.Namespace
    pattern: str
    num_samples: int
    template: torch.nn.Module
    batches: list
    image_norm: tuple | None = None               # (mean, std) when the loader sends uint8 images (on CUDA)

    def config(self, **values: Any) -> Any:
        """A TrainConfig for this bed; `values` are flat keys (loss, fnd, state_device, ...)."""
        from clip_glofnd.config import from_flat
        preset = self.ns.preset
        return from_flat({"train_data": self.pattern, "model": preset["model"], "precision": preset["precision"],
                          "device": self.ns.device, "batch_size": preset["batch_size"], "workers": self.ns.workers,
                          "log_every_n_steps": 10**9, "fnd_alpha": 0.05, "warmup": 10, **values})

    def parts(self, cfg: Any, num_samples: int) -> Any:
        """build_parts around a fresh copy of the template model (with the uint8 images' mean / std, as train())."""
        from clip_glofnd.distributed import DistInfo
        from clip_glofnd.step import build_parts
        dist = DistInfo(device=torch.device(self.ns.device))
        parts = build_parts(cfg, dist, copy.deepcopy(self.template), num_samples)
        if self.image_norm is not None:
            parts.image_norm = tuple(torch.tensor(v, device=dist.device) for v in self.image_norm)
        return parts


def make_bed(ns: argparse.Namespace, pattern: str, num_samples: int) -> StepBed:
    """The CPU model template and --cached-batches batches from train.make_loader as training makes them on the
    device (on CUDA: pinned, uint8 images)."""
    from clip_glofnd.distributed import DistInfo
    from clip_glofnd.model import create_model
    from clip_glofnd.data import split_normalize
    from clip_glofnd.train import make_loader, uint8_images
    preset = ns.preset
    template, preprocess, _, tokenizer = create_model(preset["model"], precision=preset["precision"])
    bed = StepBed(ns, pattern, num_samples, template, [])
    dist = DistInfo(device=torch.device(ns.device))                  # pinned, uint8 images on CUDA: as training
    if uint8_images(bed.config(), dist):
        bed.image_norm = split_normalize(preprocess)[1:]
    loader = make_loader(bed.config(), dist, preprocess, tokenizer, num_samples, epoch=0)
    for batch in loader:
        bed.batches.append(batch)                                       # pinned by the loader on CUDA
        if len(bed.batches) == preset["cached_batches"]:
            break
    return bed


def run_steps(parts: Any, batches: list, steps: int, start: int = 0) -> None:
    """`steps` training steps cycling over `batches`."""
    step = step_function()
    for i in range(steps):
        step(batches[(start + i) % len(batches)], parts, epoch=0)


def sync_source(stack: traceback.StackSummary) -> str:
    """Where a sync came from: the innermost frame inside clip_glofnd (file:line function), else the innermost
    frame outside torch and this module."""
    ours = [f for f in stack if f"{os.sep}clip_glofnd{os.sep}" in f.filename]
    frames = ours or [f for f in stack if f"{os.sep}torch{os.sep}" not in f.filename and "warnings" not in f.filename]
    frame = frames[-1] if frames else stack[-1]
    return f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def capture_syncs(fn: Callable[[], None]) -> list[str]:
    """The source (sync_source) of every synchronizing-call warning raised while `fn` runs; every occurrence is
    recorded, none printed, other warnings are dropped."""
    seen: list[str] = []

    def record(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if SYNC_MESSAGE in str(message):
            seen.append(sync_source(traceback.extract_stack()[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        fn()
    return seen


def count_syncs(parts: Any, batches: list, warmup: int, steps: int) -> dict[str, Any]:
    """Synchronizing CUDA calls per steady step, counted from set_sync_debug_mode("warn") warnings."""
    run_steps(parts, batches, warmup)
    if parts.dist.device.type != "cuda":
        run_steps(parts, batches, steps, start=warmup)
        return {"steps": steps, "syncs_per_step": "n/a (CPU)", "sources": {}, "first": []}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        seen = capture_syncs(lambda: run_steps(parts, batches, steps, start=warmup))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"steps": steps, "syncs": len(seen), "syncs_per_step": len(seen) / steps,
            "sources": dict(Counter(seen).most_common(12)), "first": seen[:5]}


def syncs_part(bed: StepBed, clock: Clock) -> list[dict[str, Any]]:
    """count_syncs for --fnd none / glofnd × each loss, as long as the budget lasts."""
    rows = []
    preset = bed.ns.preset
    for loss in LOSSES:
        for fnd in ("none", "glofnd"):
            row = {"loss": loss, "fnd": fnd}
            note = clock.skip_note(f"syncs {loss} {fnd}", bed.ns.estimates["sync"])
            if note:
                rows.append(row | {"skipped": note})
                continue
            parts = bed.parts(bed.config(loss=loss, fnd=fnd), bed.num_samples)
            rows.append(row | count_syncs(parts, bed.batches, preset["sync_warmup"], preset["sync_steps"]))
            release(parts)
            logger.info("c: %s %s: %s syncs per step", loss, fnd, rows[-1]["syncs_per_step"])
    return rows


def release(parts: Any = None) -> None:
    """Free a run's parts and the allocator's cache, so that the next measurement starts from zero."""
    del parts
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spread_ids(batches: list, num_samples: int, seed: int = 0) -> list:
    """The batches with distinct ids drawn from [0, num_samples) (the state's rows spread over the whole table)."""
    from clip_glofnd.data import Batch
    total = sum(len(b) for b in batches)
    ids = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))[:total]
    out, start = [], 0
    for b in batches:
        new = ids[start:start + len(b)].clone()
        out.append(Batch(b.images, b.texts, new.pin_memory() if b.images.is_pinned() else new, b.labels,
                         b.first_seen))
        start += len(b)
    return out


def memory_part(bed: StepBed, clock: Clock) -> list[dict[str, Any]]:
    """Peak device memory and steady step time of CLIP + GloFND for each state placement."""
    preset, device = bed.ns.preset, torch.device(bed.ns.device)
    n = preset["memory_num_samples"]
    batches = spread_ids(bed.batches, n)
    rows = []
    for state_device, sharding in PLACEMENTS:
        row = {"state_device": state_device, "state_sharding": sharding, "num_samples": n}
        note = clock.skip_note(f"memory {state_device} {sharding}", bed.ns.estimates["memory"])
        if note:
            rows.append(row | {"skipped": note})
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        parts = bed.parts(bed.config(fnd="glofnd", state_device=state_device, state_sharding=sharding), n)
        static = torch.cuda.memory_allocated() if device.type == "cuda" else None
        run_steps(parts, batches, 1)
        _common.synchronize(device)
        began = time.perf_counter()
        run_steps(parts, batches, preset["memory_steps"], start=1)
        _common.synchronize(device)
        row["step_s"] = (time.perf_counter() - began) / preset["memory_steps"]
        if device.type == "cuda":
            row |= {"static_bytes": static, "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        else:
            row["peak_allocated_bytes"] = "n/a (CPU)"
        rows.append(row)
        release(parts)
        logger.info("d: %s %s: peak %s", state_device, sharding, row["peak_allocated_bytes"])
    return rows


# ------------------------------------------------------------------------------------------------ the run
def make_shards(ns: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Synthetic JPEG shards of exactly (skip + counted) full batches, one batch per shard."""
    from benchmarks.loader_throughput import make_synthetic
    preset = ns.preset
    n = (preset["skip_steps"] + preset["steps"]) * preset["batch_size"]
    pattern = make_synthetic(folder, n, per_shard=preset["batch_size"], size=preset["image_size"])
    return {"train": pattern, "num_samples": n}


def run_parts(ns: argparse.Namespace, result: dict[str, Any], clock: Clock, save: Callable[[], None]) -> None:
    """The parts in plan order, each skipped with a note when it does not fit; `save` after each."""
    parts = result["parts"]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        data = make_shards(ns, Path(scratch) / "shards")
        result["data"] = {"num_samples": data["num_samples"], "image_size": ns.preset["image_size"],
                          "images": "smooth random RGB JPEG (quality 90), one batch per shard"}
        if "a" in ns.parts:
            throughput_part(ns, data, Path(scratch), clock, parts, compiled=False)
            save()
        if "b" in ns.parts:
            note = clock.skip_note("b: overhead", ns.estimates["overhead"])
            parts["b_overhead"] = {"skipped": note} if note else overhead_part(ns)
            release()
            save()
        step_parts(ns, data, parts, clock, save)
        if "a" in ns.parts and ns.preset["compiled"] and not ns.no_compile:
            throughput_part(ns, data, Path(scratch), clock, parts, compiled=True)
            save()


def throughput_part(ns: argparse.Namespace, data: dict[str, Any], scratch: Path, clock: Clock, parts: dict,
                    compiled: bool) -> None:
    """(a): the trainer runs of one compile mode added to parts["a_throughput"], ratios refreshed."""
    a = parts.setdefault("a_throughput", {"runs": []})
    a["runs"] += trainer_runs(ns, data, scratch, clock, compiled=compiled)
    a["ratios"] = throughput_summary(a["runs"])


def step_parts(ns: argparse.Namespace, data: dict[str, Any], parts: dict, clock: Clock, save: Callable[[], None]
               ) -> None:
    """(c) and (d) on one shared bed, built only if it and the first measurement fit in the time left."""
    wanted = [key for key in ("c_syncs", "d_memory") if key[0] in ns.parts]
    if not wanted:
        return
    first = ns.estimates["sync" if wanted[0] == "c_syncs" else "memory"]
    note = clock.skip_note("c/d: model and cached batches", ns.estimates["sync_bed"] + first)
    if note:
        parts.update({key: {"skipped": note, "rows": []} for key in wanted})
        return
    bed = make_bed(ns, data["train"], data["num_samples"])
    if "c_syncs" in wanted:
        parts["c_syncs"] = {"rows": syncs_part(bed, clock)}
        save()
    if "d_memory" in wanted:
        parts["d_memory"] = {"rows": memory_part(bed, clock)}
        save()


def main(argv: Sequence[str] | None = None) -> int:
    """Check the device, print the time plan, run the parts within --budget-s, write gpu.json and gpu.md."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"benchmarks.gpu: CUDA is not available (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); run it on the GPU machine, or use --device cpu --quick")
    clock = Clock(ns.budget_s)
    plan = time_plan(ns)
    print(f"time plan (budget {ns.budget_s:.0f} s; items that do not fit are skipped and noted):")
    for item in plan:
        print(f"  {item['item']:<32} ~{item['estimate_s']:>4.0f} s   by {item['cumulative_s']:>5.0f} s")
    ns.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "gpu", "command": _common.command_line("benchmarks.gpu", argv),
                              "machine": _common.machine_info(torch.device(ns.device)), "budget_s": ns.budget_s,
                              "plan": plan, "settings": settings(ns), "parts": {}}

    def save() -> None:
        result["elapsed_s"] = clock.elapsed()
        _common.write_json(ns.out / "gpu.json", result)
        (ns.out / "gpu.md").write_text(report(result))

    save()
    run_parts(ns, result, clock, save)
    result["machine"] = _common.finish_info(result["machine"])
    save()
    print(report(result))
    print(f"wrote {ns.out / 'gpu.json'} and {ns.out / 'gpu.md'} in {clock.elapsed():.0f} s")
    return 0


def settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The sizes of this run (the preset without the overhead argv) and the device."""
    keep = {k: v for k, v in ns.preset.items() if k != "overhead"}
    return {"device": ns.device, "quick": ns.quick, "workers": ns.workers, "parts": ns.parts, **keep}


# --------------------------------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    """A short markdown summary of what has been measured so far."""
    machine, parts = result["machine"], result["parts"]
    lines = [f"# benchmarks.gpu — {machine['device_name']} ({machine['device']}), torch {machine['torch_version']}",
             "", f"`{result['command']}`; {result.get('elapsed_s', 0):.0f} s of a {result['budget_s']:.0f} s budget",
             ""]
    if "a_throughput" in parts:
        lines += ["## a. Throughput (samples/s)", "", "| trainer | compiled | samples/s | median step | note |",
                  "|---|---|---|---|---|"]
        for r in parts["a_throughput"]["runs"]:
            rate = f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else "—"
            median = f"{r['median_samples_per_s']:.1f}" if "median_samples_per_s" in r else "—"
            note = r.get("skipped") or (r.get("error", "").strip().splitlines() or [""])[-1][:100]
            lines.append(f"| {r['trainer']} | {r['torch_compile']} | {rate} | {median} | {note} |")
        lines += ["", f"ratios: {parts['a_throughput'].get('ratios', {})}", ""]
    if "b_overhead" in parts:
        lines += ["## b. GloFND update_and_mask vs one read and vs the step", ""]
        b = parts["b_overhead"]
        if "skipped" in b:
            lines += [b["skipped"], ""]
        else:
            lines += ["| b | M | read ms | fused (one) ms | fused/read | fused (both) ms | step ms | fused % |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['candidates']} | {1e3 * r['read_s']:.3f} | {1e3 * r['fused_one_s']:.3f} "
                      f"| {r['fused_vs_read']:.1f} | {1e3 * r['fused_s']:.3f} | {1e3 * r['step_plain_s']:.1f} | "
                      f"{r['fused_pct']:.3f} |" for r in b["rows"]]
            lines.append("")
    if "c_syncs" in parts:
        lines += ["## c. Host syncs per steady step", "", parts["c_syncs"].get("skipped", ""),
                  "| loss | fnd | syncs/step | top sources |", "|---|---|---|---|"]
        for r in parts["c_syncs"]["rows"]:
            top = "; ".join(f"{k} ×{v}" for k, v in list(r.get("sources", {}).items())[:3])
            lines.append(f"| {r['loss']} | {r['fnd']} | {r.get('syncs_per_step', r.get('skipped'))} | {top} |")
        lines.append("")
    if "d_memory" in parts:
        lines += ["## d. Peak device memory per state placement", "", parts["d_memory"].get("skipped", ""),
                  "| state-device | sharding | n | peak allocated MB | static MB | step ms |",
                  "|---|---|---|---|---|---|"]
        for r in parts["d_memory"]["rows"]:
            peak, static = r.get("peak_allocated_bytes", r.get("skipped")), r.get("static_bytes")
            peak = f"{peak / 2**20:.0f}" if isinstance(peak, int) else peak
            static = f"{static / 2**20:.0f}" if isinstance(static, int) else "—"
            step = f"{1e3 * r['step_s']:.1f}" if "step_s" in r else "—"
            lines.append(f"| {r['state_device']} | {r['state_sharding']} | {r['num_samples']:.0e} | {peak} | "
                         f"{static} | {step} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    sys.exit(main())
