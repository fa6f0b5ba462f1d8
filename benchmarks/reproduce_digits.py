"""The paper's claims at small scale on the digits set: clip-tiny trained from scratch (both towers learn).

Data: clip_glofnd.digits.make_digits — 1,500 training pairs of 10 classes whose captions name only the class (12
wordings), so ~10% of every anchor's negatives are true false negatives; 297 held-out images for zero-shot
classification and retrieval. Filters, losses, seeds, metrics and targets: benchmarks/_reproduce.py. Recipe (full
form): clip-tiny, 6 epochs of 1,500 samples, batch 32, lr 1e-3, 47 warmup steps (one epoch), α = 0.1 (the expected
share of same-class negatives with 10 balanced classes), λ step 0.1, every filter masks from epoch 3 (0-based 2) on,
once the model has left its initial plateau (it sits at ln 32 for about two epochs; at lr 2e-3 with 20 warmup steps
it stayed there three to four epochs, zero-shot acc1 0.35–0.39 after 6).

    python -m benchmarks.reproduce_digits            # 30 runs (2 losses x 5 filters x 3 seeds)
    python -m benchmarks.reproduce_digits --quick    # CI: CLIP, the 5 filters, 1 seed, 3 steps (seconds per run)

Writes benchmarks/results/reproduce_digits.json and, next to it, reproduce_digits_filtered.png (filtered fraction per
epoch against α), reproduce_digits_lambda.png and reproduce_digits_fn.png.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import _common, _reproduce
from benchmarks.throughput import prepare_data

PRESETS = {
    "full": dict(seeds=[0, 1, 2], epochs=6, batch_size=32, lr=1e-3, warmup=47, alphas=[0.1], fnd_lr=0.1,
                 mask_start_epoch=2, train_num_samples=None),
    "quick": dict(seeds=[0], epochs=1, batch_size=32, lr=1e-3, warmup=3, alphas=[0.1], fnd_lr=0.1, mask_start_epoch=0,
                  train_num_samples=96, losses=["clip"]),
}
FLAGS = ["--model", "clip-tiny", "--wd", "0.1", "--precision", "fp32", "--workers", "1"]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; unset ones take the preset (full, or quick with --quick)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce_digits", description=__doc__.split("\n\n")[0])
    _reproduce.add_common_args(p)
    ns = p.parse_args(list(argv))
    ns.output = ns.output or _common.RESULTS_DIR / "reproduce_digits.json"
    _reproduce.apply_preset(ns, PRESETS, p)
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or reuse) the digits, run every (seed, loss, filter), write the JSON and PNGs, print the tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reproduce-digits-") as scratch:
        data = prepare_data(ns.data, Path(scratch))
        bed = _reproduce.Bed("digits", data["train"], data["zeroshot"][0],
                             data["retrieval"][0] if ns.retrieval else None, FLAGS)
        _reproduce.run_benchmark(ns, bed, "reproduce_digits", argv, ns.runs_dir or Path(scratch) / "runs",
                                 {"model": "clip-tiny", "train_num_samples": ns.train_num_samples or data["num_samples"],
                                  "data": "digits (make_digits seed 0): 1,500 train, 297 held-out"})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
