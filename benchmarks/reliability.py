"""What the reliability machinery of issue 12 costs: per step, per save, per resume.

- **seen ids** (duplicate check): `SeenIds.add` on one worker item of b ids (the loader, every item) and on the
  gathered W·b first-pass ids (the cross-process check, every step with several processes), at CC12M's n; memory
  n/8 bytes per bitmap.
- **non-finite guard**: what `train_step` adds to a step: keeping the batch's λ/u rows and the model's buffers before
  it and putting them back with `torch.where(ok, new, old)` after it (`step.snapshot` + `step.undo_unless`), and the
  gradient norm the device-side check reads (`finite_check_s`), against a whole training step of clip-tiny on the
  CPU.
- **saves**: a mid-epoch `save_checkpoints` (the same file plus every rank's data position) against an end-of-epoch
  one, on the digits with clip-tiny; the data position's size and `state_dict` time at CC12M's n; the NaN check of a
  checkpoint's per-sample state at CC12M's n.
- **resume**: time to the first batch of a loader resumed near the end of its epoch (the workers re-read the
  shards up to there without decoding) against a fresh loader's first batch.

Prints a table and writes benchmarks/results/reliability_cpu.json.

    python -m benchmarks.reliability            # ~1-2 min
    python -m benchmarks.reliability --quick    # seconds, tiny sizes (CI)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common
from clip_glofnd import checkpoint, loop, train
from clip_glofnd import step as step_module
from clip_glofnd.config import from_flat
from clip_glofnd.data import Batch, make_train_loader
from clip_glofnd.distributed import DistInfo
from clip_glofnd.glofnd import GloFND
from clip_glofnd.losses import create_loss
from clip_glofnd.seen import SeenIds
from clip_glofnd.step import build_parts, train_step

CC12M = 12_423_374
CPU = torch.device("cpu")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--num-samples", type=int, help=f"n of the per-sample state and bitmaps (default {CC12M})")
    p.add_argument("--batch", type=int, default=64, help="local batch of the clip-tiny step (default 64)")
    p.add_argument("--world-size", type=int, default=8, help="W of the cross-process id check (default 8)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--output", type=Path, default=_common.RESULTS_DIR / "reliability_cpu.json")
    return p.parse_args(list(argv))


def seen_ids(n: int, sizes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """SeenIds.add of k new ids (consecutive slices of a random permutation) into a bitmap of n ids: seconds per
    call, best of `repeats` blocks, each on a fresh bitmap."""
    rows = []
    order = torch.randperm(n)
    for k in sizes:
        calls = max(1, min(200, n // k))
        best = float("inf")
        for _ in range(repeats):
            seen = SeenIds(n)
            start = time.perf_counter()
            for i in range(calls):
                seen.add(order[i * k:(i + 1) * k])
            best = min(best, (time.perf_counter() - start) / calls)
        rows.append({"ids": k, "add_s": best, "bitmap_bytes": seen.bits.numel()})
    return rows


def guard(batch_size: int, repeats: int) -> dict[str, float]:
    """The non-finite guard's parts against a whole clip-tiny step (FastCLIP-v3 + GloFND, CPU, fp32): rows and buffers
    kept and put back, and the gradient norm (the all-reduce of the flag is a no-op in one process)."""
    from clip_glofnd.model import create_model
    torch.manual_seed(0)
    cfg = from_flat({"train_data": "x", "model": "clip-tiny", "batch_size": batch_size, "loss": "fastclip",
                     "fnd": "glofnd", "fnd_alpha": 0.05})
    parts = build_parts(cfg, DistInfo(), create_model("clip-tiny")[0], num_samples=10 * batch_size)
    batch = Batch(torch.randn(batch_size, 3, 64, 64), torch.randint(1, 400, (batch_size, 32)),
                  torch.randperm(10 * batch_size)[:batch_size], None)
    step = _common.time_call(lambda: train_step(batch, parts, epoch=0), CPU, warmup=1, repeats=repeats)
    grads = [p.grad for p in parts.unwrapped.parameters() if p.grad is not None]     # the last step's
    ok = torch.tensor(True)

    def undo() -> None:                                                  # the snapshot, then the on-device restore
        step_module.undo_unless(parts, step_module.snapshot(parts, batch.ids), ok)

    before = _common.time_call(undo, CPU, repeats=repeats)
    finite = _common.time_call(lambda: torch.isfinite(torch.nn.utils.get_total_norm(grads)), CPU, repeats=repeats)
    out = {"step_s": step["min_s"], "before_step_s": before["min_s"], "finite_check_s": finite["min_s"]}
    out["guard_pct"] = 100 * (out["before_step_s"] + out["finite_check_s"]) / out["step_s"]
    return out


def state_checks(n: int, world_size: int, repeats: int) -> dict[str, float]:
    """At n samples: the NaN check of GloFND (both modalities) + SogCLR u, and the data position's size."""
    state = {"glofnd": {"img": GloFND(n, 0.01).state_dict(), "txt": GloFND(n, 0.01).state_dict()},
             "loss": create_loss("sogclr", n).state_dict()}
    nan_check = _common.time_call(lambda: checkpoint.nonfinite_entries(state), CPU, repeats=repeats)
    seen = SeenIds(n)
    seen.add(torch.randperm(n)[: n // 2])
    copy = _common.time_call(lambda: seen.state_dict(), CPU, repeats=repeats)
    state_bytes = sum(t.numel() * t.element_size() for part in state.values() for t in _leaves(part))
    return {"num_samples": n, "state_bytes": state_bytes, "nonfinite_check_s": nan_check["min_s"],
            "position_bytes": (world_size + 1) * seen.bits.numel(), "bitmap_copy_s": copy["min_s"]}


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for value in tree.values() for t in _leaves(value)]


def saves_and_resume(root: Path, batch_size: int, repeats: int) -> dict[str, float]:
    """Digits + clip-tiny: save_checkpoints at an epoch's end vs inside it; first batch fresh vs resumed late."""
    from clip_glofnd.model import create_model
    from clip_glofnd.resume import continue_schedule
    from clip_glofnd.digits import make_digits
    make_digits(root / "digits", seed=0)
    pattern = str(root / "digits" / "train" / "{00000..00011}.tar")
    model, preprocess, _, tokenizer = create_model("clip-tiny")
    cfg = from_flat({"train_data": pattern, "model": "clip-tiny", "batch_size": batch_size, "loss": "sogclr",
                     "fnd": "glofnd", "name": "bench", "epochs": 2})
    parts = build_parts(cfg, DistInfo(), model, num_samples=1500)

    def loader():
        return make_train_loader(pattern, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                                 num_samples=None, workers=2)

    def first_batch(resume_state=None) -> float:
        fresh = loader()
        if resume_state is not None:
            fresh.load_state_dict(resume_state)
        start = time.perf_counter()
        it = iter(fresh)
        next(it)
        took = time.perf_counter() - start
        it.close()
        return took

    running = loader()
    it = iter(running)
    for _ in range(running.num_batches - 2):
        next(it)
    late = running.state_dict()
    it.close()
    run = loop.EpochRun(running, continue_schedule(None, None, (0, 0), (running.num_batches, 2)),
                         loop.RunningMeans(), None)
    at_end, inside = loop.Progress(epoch=1, step=1), loop.Progress(epoch=0, step=1, batch=1)
    end_save = _common.time_call(lambda: train.save_checkpoints(parts, at_end, root / "run", run), CPU,
                                 warmup=1, repeats=repeats)
    mid_save = _common.time_call(lambda: train.save_checkpoints(parts, inside, root / "run", run), CPU,
                                 warmup=1, repeats=repeats)
    return {"save_end_of_epoch_s": end_save["min_s"], "save_mid_epoch_s": mid_save["min_s"],
            "checkpoint_bytes": (root / "run" / "checkpoints" / checkpoint.LATEST).stat().st_size,
            "first_batch_fresh_s": min(first_batch() for _ in range(repeats)),
            "first_batch_resumed_late_s": min(first_batch(late) for _ in range(repeats)),
            "resumed_after_samples": late["samples"]}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.num_samples or (10_000 if args.quick else CC12M)
    repeats = 2 if args.quick else 5
    info = _common.machine_info(CPU)
    result: dict[str, Any] = {"benchmark": "reliability", "command": _common.command_line("benchmarks.reliability",
                                                                                          argv or sys.argv[1:])}
    result["seen_ids"] = seen_ids(n, (args.batch, 1024, args.world_size * 1024), repeats)
    result["guard"] = guard(8 if args.quick else args.batch, repeats)
    result["state"] = state_checks(n, args.world_size, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        result["saves"] = saves_and_resume(Path(tmp), 8 if args.quick else args.batch, repeats)
    result["machine"] = _common.finish_info(info)
    _common.write_json(args.output, result)
    print(_common.format_table(result["seen_ids"], [("ids", "ids per add", "d", 1), ("add_s", "µs", ".1f", 1e6)]))
    for key in ("guard", "state", "saves"):
        print(key, {k: round(v, 6) if isinstance(v, float) else v for k, v in result[key].items()})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
