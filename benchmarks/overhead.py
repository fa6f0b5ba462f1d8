"""GloFND's cost: share of a full CLIP training step, against one read of the similarity matrix, and vs n.

Three measurements on one device (``--device cpu`` or ``cuda``); every time is the best of its repeats (one-sided
noise on a shared machine; medians are kept in the JSON too), and the direct calls of one (b, M) are timed
interleaved (one block of each per repeat, order rotated), so that load changes hit them alike:

1. **Step share.** A full training step of a randomly initialised open_clip model (forward, loss, backward, AdamW
   step) on a local batch b, the gathered batch of M candidates simulated by concatenating the local features with
   M − b random unit vectors (as if all-gathered from other ranks). GloFND work = the two detached similarity
   matrices [b, M] ("sims+neg"; the two-call path also builds the negative mask), then the filter for both
   modalities (image anchors vs all texts, text anchors vs all images): the trainer's fused `update_and_mask`
   ("fused"), and for comparison the separate `update` + `keep_mask` with a [b, M] negative mask ("update+mask").
   Measured twice: as the difference between steps with and without GloFND (the step uses the fused call;
   alternated; includes the masked loss path and the host syncs), and directly by timing the calls alone
   (synchronised on CUDA). Percentages are of the step without GloFND.
2. **One read.** One modality's filter against `sim.sum()` on the same [b, M] float32 matrix (the least an update
   must do: read sim once), and `sim > λ` (one comparison: the floor of any update written in torch ops). The
   target: update + mask of one modality (the fused call) within 2x one read.
3. **Flat in n.** The fused call (both modalities) at fixed b, M for num_samples 1e4 .. 1e8, ids spread over
   the whole table, timed interleaved; the state (16 B per sample per modality) is allocated only when n ≤
   --max-num-samples and the device has twice its size free (with the smaller tables allocated).

Prints tables and writes benchmarks/results/overhead_<device>.json (machine, threads, load, exact command). On a
busy machine prefer ``--threads 1``: with every core oversubscribed, each multi-threaded op waits for its slowest,
descheduled thread, and even the best of 15 short calls is inflated.

    python -m benchmarks.overhead                     # CPU, clip-tiny, ~3 min on 2 idle cores (6-9 under load)
    python -m benchmarks.overhead --device cuda       # GPU, ViT-B-32 with bf16 autocast
    python -m benchmarks.overhead --quick             # a few seconds, tiny sizes (CI)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

import clip_glofnd
from benchmarks import _common
from clip_glofnd.glofnd import GloFND
from clip_glofnd.losses import create_loss, positive_mask

logger = logging.getLogger(__name__)

PRESETS = {  # defaults per device; --quick overrides everything for a seconds-long smoke run
    "cpu": dict(model="clip-tiny", precision="fp32", batch_sizes=[128, 512, 1024], candidates=["B", "2048", "8192"],
                warmup=1, repeats=3, micro_repeats=15, sweep=[10**4, 10**5, 10**6, 10**7, 10**8], sweep_batch=512,
                sweep_candidates=2048),
    "cuda": dict(model="ViT-B-32", precision="amp", batch_sizes=[128, 512, 1024], candidates=["B", "2048", "8192"],
                 warmup=3, repeats=10, micro_repeats=20, sweep=[10**4, 10**5, 10**6, 10**7, 10**8],
                 sweep_batch=1024, sweep_candidates=8192),
    "quick": dict(model="clip-tiny", precision="fp32", batch_sizes=[8], candidates=["B", "32"], warmup=1,
                  repeats=2, micro_repeats=3, sweep=[10**3, 10**4], sweep_batch=8, sweep_candidates=32),
}
ALPHA = 1e-3           # the cost does not depend on α; the GloFND CC3M value
STEP_NUM_SAMPLES = 10**6
LR = 1e-4


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; unset ones take the device's preset (PRESETS), or the quick preset with --quick."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI)")
    p.add_argument("--model", help="open_clip model name, 'clip-tiny', or a model JSON (default: clip-tiny on CPU, "
                                   "ViT-B-32 on CUDA)")
    p.add_argument("--precision", choices=("fp32", "amp"), help="amp = bf16 autocast (default: fp32 CPU, amp CUDA)")
    p.add_argument("--loss", choices=("clip", "sogclr", "fastclip"), default="clip")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="local batch sizes b (default: 128 512 1024)")
    p.add_argument("--candidates", nargs="+", help="global candidate counts M; 'B' means M = b (default: B 2048 8192)")
    p.add_argument("--num-samples", type=int, default=STEP_NUM_SAMPLES, help="GloFND state size in the step test")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, help="timed steps with and without GloFND (best of)")
    p.add_argument("--micro-repeats", type=int, help="timed blocks of the direct calls (best of)")
    p.add_argument("--sweep", type=lambda s: int(float(s)), nargs="+", help="num_samples values (default 1e4 .. 1e8)")
    p.add_argument("--max-num-samples", type=lambda s: int(float(s)), default=10**8, help="cap of the n sweep")
    p.add_argument("--sweep-batch", type=int, help="b of the n sweep")
    p.add_argument("--sweep-candidates", type=int, help="M of the n sweep")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", type=Path,
                   help="JSON path (default: benchmarks/results/overhead_<device>[_<N>thread][_quick].json)")
    ns = p.parse_args(list(argv))
    preset = PRESETS["quick" if ns.quick else ns.device]
    for key, value in preset.items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    threads = f"_{ns.threads}thread" if ns.threads else ""
    ns.output = ns.output or _common.RESULTS_DIR / f"overhead_{ns.device}{threads}{'_quick' if ns.quick else ''}.json"
    for b in ns.batch_sizes:
        for m in ns.candidates:
            if m != "B" and not (m.isdigit() and int(m) >= b):
                p.error(f"--candidates {m}: need 'B' or an integer >= every batch size (got batch {b})")
    if ns.sweep_candidates < ns.sweep_batch:
        p.error(f"--sweep-candidates {ns.sweep_candidates} must be >= --sweep-batch {ns.sweep_batch}")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements, print tables, write the JSON; returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("overhead: --device cuda but CUDA is not available")
    torch.manual_seed(0)
    info = _common.machine_info(device)
    steps = []
    for b in ns.batch_sizes:
        parts = build_parts(ns, device)                                   # one model per batch size, reused over M
        steps += [_bench_config(parts, ns, b, m) for m in _candidate_counts(ns.candidates, b)]
    sweep = _sweep_num_samples(ns, device)
    result = {
        "benchmark": "overhead",
        "command": _common.command_line("benchmarks.overhead", argv),
        "machine": _common.finish_info(info),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()} | {"alpha": ALPHA},
        "steps": steps,
        "num_samples_sweep": sweep,
        "targets": _targets(steps, sweep),
    }
    _common.write_json(ns.output, result)
    print(_report(result))
    print(f"wrote {ns.output}")
    return 0


def _candidate_counts(candidates: Sequence[str], b: int) -> list[int]:
    """M values for batch b, 'B' → b, duplicates dropped, ascending."""
    return sorted({b if m == "B" else int(m) for m in candidates})


@dataclasses.dataclass
class Filters:
    """GloFND for image anchors (vs all texts) and for text anchors (vs all images)."""

    img: GloFND
    txt: GloFND


@dataclasses.dataclass
class Parts:
    """Model, loss, optimizer and the two GloFND filters of one step benchmark."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    filters: Filters
    amp: bool                                      # bf16 autocast around the forward


def build_parts(ns: argparse.Namespace, device: torch.device) -> Parts:
    """A randomly initialised open_clip model, the loss, AdamW over both, and GloFND for image and text anchors."""
    model = create_model(ns.model, device)
    loss_fn = create_loss(ns.loss, ns.num_samples).to(device)
    if ns.loss != "clip":
        model.logit_scale.requires_grad_(False)                         # SogCLR / FastCLIP own τ
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    filters = Filters(*(GloFND(ns.num_samples, ALPHA, device=device) for _ in range(2)))
    return Parts(model, loss_fn, optimizer, filters, ns.precision == "amp")


def create_model(name: str, device: torch.device) -> torch.nn.Module:
    """open_clip model by name, randomly initialised; 'clip-tiny' (our packaged config) or a JSON path is registered
    with open_clip first."""
    config = Path(name) if name.endswith(".json") else _packaged_config(name)
    if config is not None:
        open_clip.add_model_config(config)
        name = config.stem
    return open_clip.create_model(name, device=device)


def _packaged_config(name: str) -> Path | None:
    """clip_glofnd/model_configs/<name>.json when it exists."""
    path = Path(clip_glofnd.__file__).parent / "model_configs" / f"{name}.json"
    return path if path.exists() else None


@dataclasses.dataclass
class Inputs:
    """One fixed batch: images, tokens, ids of the b local samples, and the M − b simulated gathered rows."""

    images: Tensor             # [b, 3, H, W]
    texts: Tensor              # [b, ctx] long
    ids: Tensor                # [b] global ids
    extra_img: Tensor          # [M - b, d] unit vectors, as if gathered from other ranks
    extra_txt: Tensor          # [M - b, d]
    extra_ids: Tensor          # [M - b]


def make_inputs(model: torch.nn.Module, b: int, m: int, num_samples: int, device: torch.device) -> Inputs:
    """Random inputs shaped for `model` (image size, context length, embed dim)."""
    size = model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    dim = model.visual.output_dim                                         # embed dim d
    ids_all = torch.randperm(num_samples, device=device)[:m]              # [M] distinct global ids
    return Inputs(
        images=torch.randn(b, 3, height, width, device=device),
        texts=torch.randint(0, model.vocab_size, (b, model.context_length), device=device),
        ids=ids_all[:b], extra_ids=ids_all[b:],
        extra_img=F.normalize(torch.randn(m - b, dim, device=device), dim=1),
        extra_txt=F.normalize(torch.randn(m - b, dim, device=device), dim=1),
    )


def glofnd_prep(img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Detached float32 similarities and the negative mask: sim_i2t, sim_t2i [b, M], neg [b, M] (offset 0)."""
    sim_i2t = img.detach().float() @ txt_all.detach().float().T          # [b, M] image anchors vs all texts
    sim_t2i = txt.detach().float() @ img_all.detach().float().T          # [b, M] text anchors vs all images
    neg = ~positive_mask(img.shape[0], img_all.shape[0], 0, img.device)  # [b, M] True off the positive
    return sim_i2t, sim_t2i, neg


def glofnd_filter(
        filters: Filters, sim_i2t: Tensor, sim_t2i: Tensor, neg: Tensor, ids: Tensor,
) -> tuple[Tensor, Tensor]:
    """`update` then `keep_mask` for both modalities (epoch 0: learning and masking): keep_i2t, keep_t2i [b, M]."""
    filters.img.update(sim_i2t, ids, 0, neg)
    filters.txt.update(sim_t2i, ids, 0, neg)
    return filters.img.keep_mask(sim_i2t, ids, 0, neg), filters.txt.keep_mask(sim_t2i, ids, 0, neg)


def glofnd_fused(filters: Filters, sim_i2t: Tensor, sim_t2i: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The trainer's call: `update_and_mask` for both modalities, positives at columns 0..b-1 (offset 0)."""
    positive = torch.arange(len(ids), device=ids.device)                  # [b] column of each row's positive
    return (filters.img.update_and_mask(sim_i2t, ids, 0, positive)[0],
            filters.txt.update_and_mask(sim_t2i, ids, 0, positive)[0])


def random_sims(b: int, m: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stand-in features of b correlated pairs among M candidates: img, txt [b, d], img_all, txt_all [M, d]."""
    img = F.normalize(torch.randn(b, dim, device=device), dim=1)                     # [b, d]
    txt = F.normalize(img + torch.randn(b, dim, device=device), dim=1)               # [b, d] correlated pairs
    img_all = torch.cat([img, F.normalize(torch.randn(m - b, dim, device=device), dim=1)])   # [M, d]
    txt_all = torch.cat([txt, F.normalize(torch.randn(m - b, dim, device=device), dim=1)])   # [M, d]
    return img, txt, img_all, txt_all


def train_step(parts: Parts, inputs: Inputs, use_glofnd: bool) -> None:
    """Forward, (GloFND,) loss, backward and optimizer step on the fixed batch."""
    device_type = inputs.images.device.type
    # forward
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=parts.amp):
        img, txt, logit_scale = parts.model(inputs.images, inputs.texts)  # [b, d] unit, [b, d] unit, scalar
    img, txt = img.float(), txt.float()
    img_all = torch.cat([img, inputs.extra_img])                          # [M, d] local rows first (offset 0)
    txt_all = torch.cat([txt, inputs.extra_txt])                          # [M, d]
    ids_all = torch.cat([inputs.ids, inputs.extra_ids])                   # [M]
    # false-negative filter
    keep_i2t = keep_t2i = None
    if use_glofnd:                                                       # as step.filter_negatives: fused
        sim_i2t = img.detach().float() @ txt_all.detach().float().T       # [b, M] image anchors vs all texts
        sim_t2i = txt.detach().float() @ img_all.detach().float().T       # [b, M] text anchors vs all images
        keep_i2t, keep_t2i = glofnd_fused(parts.filters, sim_i2t, sim_t2i, inputs.ids)
    # loss
    loss, _ = parts.loss_fn(img, txt, img_all, txt_all, ids=inputs.ids, ids_all=ids_all, epoch=0, keep_i2t=keep_i2t,
                            keep_t2i=keep_t2i, offset=0, logit_scale=logit_scale.float())
    # backward + step
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.optimizer.step()
    if hasattr(parts.loss_fn, "clamp_tau_"):
        parts.loss_fn.clamp_tau_()


def _time_steps(parts: Parts, inputs: Inputs, ns: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Step time summaries without and with GloFND, the two alternated (order flipped every repeat) against drift."""
    device = inputs.images.device
    for _ in range(ns.warmup):
        train_step(parts, inputs, False)
        train_step(parts, inputs, True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(ns.repeats):
        for use_glofnd in ((False, True) if repeat % 2 == 0 else (True, False)):
            _common.synchronize(device)
            start = time.perf_counter()
            train_step(parts, inputs, use_glofnd)
            _common.synchronize(device)
            times[use_glofnd].append(time.perf_counter() - start)
    return {"step_plain": _common.summarize(times[False]), "step_glofnd": _common.summarize(times[True])}


def _time_direct(
        filters: Filters, ids: Tensor, m: int, dim: int, ns: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """The GloFND calls alone on stand-in features: prep, update+mask and fused (both modalities), and for one
    modality update, keep_mask, fused, one read (`sim.sum()`) and one comparison (`sim > λ`, the floor of any torch
    update)."""
    device = ids.device
    img, txt, img_all, txt_all = random_sims(len(ids), m, dim, device)
    sim_i2t, sim_t2i, neg = glofnd_prep(img, txt, img_all, txt_all)                # [b, M] x3
    lam_rows = torch.rand(len(ids), device=device)                                  # [b] stand-in λ_i
    positive = torch.arange(len(ids), device=device)                                # [b] offset 0
    calls = {
        "prep": lambda: glofnd_prep(img, txt, img_all, txt_all),
        "update_mask": lambda: glofnd_filter(filters, sim_i2t, sim_t2i, neg, ids),
        "fused": lambda: glofnd_fused(filters, sim_i2t, sim_t2i, ids),
        "fused_one": lambda: filters.img.update_and_mask(sim_i2t, ids, 0, positive),
        "read": lambda: sim_i2t.sum(),
        "compare": lambda: sim_i2t > lam_rows[:, None],
        "update_one": lambda: filters.img.update(sim_i2t, ids, 0, neg),
        "mask_one": lambda: filters.img.keep_mask(sim_i2t, ids, 0, neg),
    }
    return _common.time_interleaved(calls, device, warmup=2, repeats=ns.micro_repeats,
                                    min_block_s=0.02 if device.type == "cuda" else 0.0)


def _bench_config(parts: Parts, ns: argparse.Namespace, b: int, m: int) -> dict[str, float]:
    """One (b, M) row: step times with/without GloFND, direct GloFND times, and their ratios."""
    inputs = make_inputs(parts.model, b, m, ns.num_samples, torch.device(ns.device))
    timings = _time_steps(parts, inputs, ns)
    timings |= _time_direct(parts.filters, inputs.ids, m, inputs.extra_img.shape[1], ns)
    row: dict[str, float] = {"batch": b, "candidates": m}
    for name, timing in timings.items():                                  # best of repeats; medians for reference
        row |= {f"{name}_s": timing["min_s"], f"{name}_median_s": timing["median_s"]}
    plain = row["step_plain_s"]
    row["diff_s"] = row["step_glofnd_s"] - plain
    row |= {
        "diff_pct": 100 * row["diff_s"] / plain,
        "update_mask_pct": 100 * row["update_mask_s"] / plain,
        "fused_pct": 100 * row["fused_s"] / plain,
        "glofnd_total_pct": 100 * (row["prep_s"] + row["update_mask_s"]) / plain,
        "fused_total_pct": 100 * (row["prep_s"] + row["fused_s"]) / plain,
        "update_vs_read": row["update_one_s"] / row["read_s"],
        "fused_vs_read": row["fused_one_s"] / row["read_s"],
        "mask_vs_read": row["mask_one_s"] / row["read_s"],
        "compare_vs_read": row["compare_s"] / row["read_s"],
    }
    logger.info("b=%d M=%d: step %.3f s, fused update+mask %.2f%% of it", b, m, plain, row["fused_pct"])
    return row


def _sweep_num_samples(ns: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The fused update_and_mask (both modalities) at fixed b, M for each num_samples that fits, all tables allocated
    first and the calls timed interleaved; the time should be flat."""
    b, m = ns.sweep_batch, ns.sweep_candidates
    sim_i2t, sim_t2i, _ = glofnd_prep(*random_sims(b, m, 64, device))         # [b, M] x2
    calls, skipped = {}, []
    for n in ns.sweep:
        need = 2 * 16 * n                                                 # λ, m, v fp32 + steps int32, 2 modalities
        reason = _skip_reason(n, need, ns.max_num_samples, device)        # the tables so far are allocated
        if reason:
            skipped.append({"num_samples": n, "reason": reason})
            continue
        filters = Filters(*(GloFND(n, ALPHA, device=device) for _ in range(2)))
        ids = torch.randint(0, n, (b,), device=device)                        # [b] rows spread over the whole table
        calls[n] = lambda filters=filters, ids=ids: glofnd_fused(filters, sim_i2t, sim_t2i, ids)
    timings = _common.time_interleaved(calls, device, warmup=2, repeats=ns.micro_repeats,
                                       min_block_s=0.02 if device.type == "cuda" else 0.0) if calls else {}
    points = [{"num_samples": n, "state_bytes": 2 * 16 * n, "fused_s": t["min_s"], "fused_median_s": t["median_s"]}
              for n, t in timings.items()]
    times = [p["fused_s"] for p in points]
    spread = max(times) / min(times) if times else float("nan")
    return {"batch": b, "candidates": m, "points": points, "skipped": skipped, "max_over_min": spread}


def _skip_reason(n: int, need: int, cap: int, device: torch.device) -> str | None:
    """Why a sweep point is not run: above --max-num-samples, or the device lacks 2x the state's bytes."""
    if n > cap:
        return f"above --max-num-samples {cap}"
    free = _common.available_memory(device)
    if 2 * need > free:
        return f"needs {need / 2**30:.1f} GiB of state, only {free / 2**30:.1f} GiB available"
    return None


def _targets(steps: list[dict[str, float]], sweep: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, judged where they matter: the trainer's fused update+mask < 1 % of the step at the
    largest batch (every M); update + mask of one modality (fused) ≤ 2x one read at the largest b·M (small ones
    measure per-call overhead), and the separate update alone for reference; flat in n (max/min ≤ 1.5)."""
    largest = max(row["batch"] for row in steps)
    worst_pct = max(row["fused_pct"] for row in steps if row["batch"] == largest)
    worst_total = max(row["fused_total_pct"] for row in steps if row["batch"] == largest)
    biggest = max(steps, key=lambda row: row["batch"] * row["candidates"])
    ratio = biggest["fused_vs_read"]
    return {
        "batch": largest, "fused_pct_max": worst_pct, "fused_total_pct_max": worst_total,
        "two_call_pct_max": max(row["update_mask_pct"] for row in steps if row["batch"] == largest),
        "fused_pct_target": 1.0, "fused_pct_met": worst_pct < 1.0,
        "read_at": [biggest["batch"], biggest["candidates"]], "fused_vs_read": ratio,
        "fused_vs_read_target": 2.0, "fused_vs_read_met": ratio <= 2.0, "update_vs_read": biggest["update_vs_read"],
        "compare_vs_read": biggest["compare_vs_read"],
        "num_samples_max_over_min": sweep["max_over_min"], "num_samples_target": 1.5,
        "num_samples_flat": sweep["max_over_min"] <= 1.5,
    }


MS = 1e3
STEP_COLUMNS = [
    ("batch", "b", "d", 1), ("candidates", "M", "d", 1), ("step_plain_s", "step (ms)", ".0f", MS),
    ("step_glofnd_s", "step+GloFND (ms)", ".0f", MS), ("diff_pct", "diff %", ".1f", 1),
    ("update_mask_s", "update+mask (ms)", ".2f", MS), ("fused_s", "fused (ms)", ".2f", MS),
    ("fused_pct", "fused %", ".3f", 1), ("prep_s", "sims+neg (ms)", ".2f", MS),
    ("fused_total_pct", "direct total %", ".3f", 1),
]
READ_COLUMNS = [
    ("batch", "b", "d", 1), ("candidates", "M", "d", 1), ("read_s", "sim.sum() (ms)", ".3f", MS),
    ("compare_s", "sim > λ (ms)", ".3f", MS), ("update_one_s", "update (ms)", ".3f", MS),
    ("update_vs_read", "update/read", ".1f", 1), ("compare_vs_read", "compare/read", ".1f", 1),
    ("mask_one_s", "keep_mask (ms)", ".3f", MS), ("mask_vs_read", "mask/read", ".1f", 1),
    ("fused_one_s", "fused (ms)", ".3f", MS), ("fused_vs_read", "fused/read", ".1f", 1),
]
SWEEP_COLUMNS = [("num_samples", "num_samples", ".0e", 1), ("state_bytes", "state (MB)", ",.4g", 1e-6),
                 ("fused_s", "fused (ms)", ".3f", MS), ("fused_median_s", "median (ms)", ".3f", MS)]


def _report(result: dict[str, Any]) -> str:
    """The three tables and the target verdicts, as printed text."""
    machine, targets, sweep = result["machine"], result["targets"], result["num_samples_sweep"]
    head = (f"{machine['device_name']} ({machine['device']}), {machine['torch_threads']} threads, torch "
            f"{machine['torch_version']}, load {machine['loadavg_1min_start']:.1f}->{machine['loadavg_1min_end']:.1f}"
            f"{' (UNDER LOAD: timings noisy)' if machine['under_load'] else ''}; model {result['config']['model']} "
            f"{result['config']['precision']}, loss {result['config']['loss']}")
    skipped = "".join(f"\n  skipped n={s['num_samples']:.0e}: {s['reason']}" for s in sweep["skipped"])
    verdicts = (
        f"targets: fused update+mask at b={targets['batch']} <= {targets['fused_pct_max']:.2f}% of the step (< 1%: "
        f"{targets['fused_pct_met']}; with sims {targets['fused_total_pct_max']:.2f}%; two calls "
        f"{targets['two_call_pct_max']:.2f}%); fused/read at b, M = {targets['read_at']}: "
        f"{targets['fused_vs_read']:.1f} (<= 2: {targets['fused_vs_read_met']}; update alone "
        f"{targets['update_vs_read']:.1f}, one comparison alone: {targets['compare_vs_read']:.1f}); n sweep max/min "
        f"{targets['num_samples_max_over_min']:.2f} (<= 1.5: {targets['num_samples_flat']})")
    return "\n\n".join([
        head,
        "Step share (% of the step without GloFND)\n" + _common.format_table(result["steps"], STEP_COLUMNS),
        "One modality's update / keep_mask / fused call vs one read of sim [b, M] float32\n"
        + _common.format_table(result["steps"], READ_COLUMNS),
        f"fused update_and_mask, both modalities, b={sweep['batch']} M={sweep['candidates']}, vs num_samples\n"
        + _common.format_table(sweep["points"], SWEEP_COLUMNS) + skipped,
        verdicts,
    ])


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)                                                  # our progress lines on stderr
    raise SystemExit(main())
