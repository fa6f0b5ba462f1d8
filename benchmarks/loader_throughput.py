#!/usr/bin/env python
"""Loader throughput (samples/s) of clip_glofnd.data on the digits shards and on synthetic JPEG shards.

Usage: python benchmarks/loader_throughput.py [--workers 1 2] [--batch-size 64] [--synthetic 4096] [--output X.json]
       python benchmarks/loader_throughput.py --image-size 224 --synthetic 2048 --no-digits --formats float32 uint8
Builds the data sets in a temporary folder, then times whole epochs through `make_train_loader`, world_size 1, with
open_clip's train preprocess (RandomResizedCrop + ToTensor + Normalize; clip-tiny's at 64 px, else
open_clip.image_transform(--image-size, is_train=True)) and tokenizer. `--formats uint8` makes the workers send uint8
images (the preprocess minus ToTensor + Normalize; the trainer would normalise on the device): a quarter of the bytes
through the workers' shared memory. Reported: samples/s over the whole epoch (loader start-up included), after the
first batch (steady state), and the batches joined from two worker items.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
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


def time_epoch(pattern: str, preprocess, tokenizer, batch_size: int, workers: int, epoch: int,
               uint8: bool = False) -> dict:
    """One epoch through make_train_loader: wall time, samples, time to the first batch, joined batches."""
    from clip_glofnd.data import make_train_loader
    start = time.perf_counter()
    loader = make_train_loader(pattern, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size,
                               num_samples=None, workers=workers, epoch=epoch, uint8=uint8)
    samples, first = 0, None
    for batch in loader:
        samples += len(batch)
        first = first or time.perf_counter() - start
    wall = time.perf_counter() - start
    return {"samples": samples, "wall_s": round(wall, 3), "first_batch_s": round(first, 3),
            "samples_per_s": round(samples / wall, 1),
            "steady_samples_per_s": round((samples - len(batch)) / max(wall - first, 1e-9), 1),
            "joined_batches": loader.joined, "image_dtype": str(batch.images.dtype),
            "image_bytes_per_sample": batch.images[0].nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--synthetic", type=int, default=4096, help="synthetic JPEG samples")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting; the best one is reported")
    parser.add_argument("--image-size", type=int, default=64, help="preprocess size (64: clip-tiny's transform)")
    parser.add_argument("--synthetic-size", type=int, help="synthetic JPEG side in px (default: --image-size)")
    parser.add_argument("--formats", nargs="+", default=["float32"], choices=("float32", "uint8"),
                        help="image format the workers send")
    parser.add_argument("--no-digits", action="store_true", help="synthetic shards only")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import open_clip
    import torch

    from clip_glofnd.digits import make_digits
    torch.set_num_threads(1)
    open_clip.add_model_config(str(Path(__file__).parents[1] / "clip_glofnd" / "model_configs" / "clip-tiny.json"))
    if args.image_size == 64:
        _, preprocess, _ = open_clip.create_model_and_transforms("clip-tiny")
    else:
        preprocess = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("clip-tiny")
    side = args.synthetic_size or args.image_size
    results = {"command": " ".join(["python", "benchmarks/loader_throughput.py", *sys.argv[1:]]),
               "python": platform.python_version(), "torch": torch.__version__, "batch_size": args.batch_size,
               "image_size": args.image_size, "cpu_count": os.cpu_count(), "loadavg_1min_start": os.getloadavg()[0],
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = {} if args.no_digits else {"digits (png 64px)": make_digits(Path(tmp) / "digits")["train"]}
        data[f"synthetic jpeg {side}px"] = make_synthetic(Path(tmp) / "synthetic", args.synthetic, size=side)
        for name, pattern in data.items():
            for workers in args.workers:
                for fmt in args.formats:
                    epochs = [time_epoch(pattern, preprocess, tokenizer, args.batch_size, workers, e, fmt == "uint8")
                              for e in range(args.epochs)]
                    best = max(epochs, key=lambda r: r["samples_per_s"])
                    results["runs"].append({"data": name, "workers": workers, "format": fmt, **best})
                    print(f"{name:20s} workers={workers} {fmt:7s}: {best['samples_per_s']:8.1f} samples/s epoch "
                          f"({best['samples']} samples, {best['wall_s']} s, first batch {best['first_batch_s']} s), "
                          f"{best['steady_samples_per_s']:8.1f} samples/s after the first batch, "
                          f"{best['joined_batches']} joined", flush=True)
    results["loadavg_1min_end"] = os.getloadavg()[0]
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
