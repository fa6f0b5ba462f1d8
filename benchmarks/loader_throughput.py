#!/usr/bin/env python
"""Loader throughput (samples/s) of clip_glofnd.data on the digits shards and on synthetic 64 px JPEG shards.

Usage: python benchmarks/loader_throughput.py [--workers 1 2] [--batch-size 64] [--synthetic 4096] [--output X.json]
Builds both data sets in a temporary folder, then times whole epochs through `make_train_loader` with the
clip-tiny open_clip train preprocess (RandomResizedCrop 64 + normalise) and tokenizer, world_size 1. Reported:
samples/s over the whole epoch (loader start-up included) and after the first batch (steady state).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

WORDS = "a photo of the small big red green blue dog cat car tree house on in with near".split()


def make_synthetic(out_dir: Path, n: int, per_shard: int = 256, size: int = 64, seed: int = 0) -> str:
    """n smooth random RGB JPEGs (size px, quality 90) with random captions, ids 0..n-1; returns the pattern."""
    import numpy as np
    from PIL import Image

    from clip_glofnd.shards import ShardWriter, brace_pattern, sample_members, write_sizes_json
    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, per_shard) as writer:
        for gid in range(n):
            low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS, size=8))
            writer.write(f"{gid:09d}", sample_members(buffer.getvalue(), "jpg", caption, gid))
    write_sizes_json(out_dir, writer.counts, n)
    return brace_pattern(out_dir, writer.counts)


def time_epoch(pattern: str, preprocess, tokenizer, batch_size: int, workers: int, epoch: int) -> dict:
    """One epoch through make_train_loader: wall time, samples, time to the first batch."""
    from clip_glofnd.data import make_train_loader
    start = time.perf_counter()
    loader = make_train_loader(pattern, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                               num_samples=None, workers=workers, epoch=epoch)
    samples, first = 0, None
    for batch in loader:
        samples += len(batch)
        first = first or time.perf_counter() - start
    wall = time.perf_counter() - start
    return {"samples": samples, "wall_s": round(wall, 3), "first_batch_s": round(first, 3),
            "samples_per_s": round(samples / wall, 1),
            "steady_samples_per_s": round((samples - len(batch)) / max(wall - first, 1e-9), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--synthetic", type=int, default=4096, help="synthetic JPEG samples")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting; the best one is reported")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import open_clip
    import torch

    from clip_glofnd.shards import make_digits
    torch.set_num_threads(1)
    open_clip.add_model_config(str(Path(__file__).parents[1] / "clip_glofnd" / "model_configs" / "clip-tiny.json"))
    _, preprocess, _ = open_clip.create_model_and_transforms("clip-tiny")
    tokenizer = open_clip.get_tokenizer("clip-tiny")
    results = {"python": platform.python_version(), "torch": torch.__version__, "batch_size": args.batch_size,
               "cpu_count": __import__("os").cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = {"digits (png 64px)": make_digits(Path(tmp) / "digits")["train"],
                "synthetic jpeg 64px": make_synthetic(Path(tmp) / "synthetic", args.synthetic)}
        for name, pattern in data.items():
            for workers in args.workers:
                epochs = [time_epoch(pattern, preprocess, tokenizer, args.batch_size, workers, e)
                          for e in range(args.epochs)]
                best = max(epochs, key=lambda r: r["samples_per_s"])
                results["runs"].append({"data": name, "workers": workers, **best})
                print(f"{name:20s} workers={workers}: {best['samples_per_s']:8.1f} samples/s epoch "
                      f"({best['samples']} samples, {best['wall_s']} s, first batch {best['first_batch_s']} s), "
                      f"{best['steady_samples_per_s']:8.1f} samples/s after the first batch", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
