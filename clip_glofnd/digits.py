"""`clip-glofnd make-digits OUT_DIR`: scikit-learn's 1,797 handwritten digits as training shards with captions, plus
a held-out split in CLIP_benchmark's local `wds/` layout (zero-shot classification and retrieval).

The embedded data set of the quick start and the tests; data/README.md describes the layout it writes.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from clip_glofnd.shards import ShardWriter, brace_pattern, sample_members, write_sizes_json

logger = logging.getLogger(__name__)

DIGITS_IMAGE_SIZE = 64
DIGITS_TRAIN_SHARDS = 12
DIGITS_HELDOUT = 297
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# caption templates for the digits: {d} = "7", {w} = "seven"; several wordings so captions of one class differ
DIGIT_CAPTIONS = (
    "a handwritten {d}", "the digit {w}", "a photo of the number {d}", "a scanned handwritten digit {w}",
    "the number {w}, written by hand", "a low-resolution image of a {d}", "{w}", "a black and white picture of a {w}",
    "a hand-drawn numeral {d}", "a blurry {w} drawn with a pen", "digit: {d}", "someone wrote the number {w}",
)
DIGIT_ZEROSHOT_TEMPLATES = ("a handwritten {c}.", "the digit {c}.", "a photo of the number {c}.",
                            "a blurry image of the number {c}.", "{c}")
RETRIEVAL_CAPTIONS_PER_IMAGE = 5


def digit_image_png(pixels, size: int = DIGITS_IMAGE_SIZE) -> bytes:
    """An 8x8 sklearn digit (values 0..16) as a `size` px RGB PNG: dark ink on white paper, bicubic upscale."""
    import numpy as np
    from PIL import Image
    grey = (255 - np.asarray(pixels, dtype=np.float64).reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
    image = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def digit_captions(label: int, rng, k: int) -> list[str]:
    """`k` distinct captions for a digit, drawn from DIGIT_CAPTIONS with `rng` (numpy Generator)."""
    picks = rng.choice(len(DIGIT_CAPTIONS), size=k, replace=False)
    return [DIGIT_CAPTIONS[i].format(d=label, w=DIGIT_WORDS[label]) for i in picks]


def split_digits(labels, seed: int, heldout: int = DIGITS_HELDOUT) -> tuple[list[int], list[int]]:
    """Stratified train / held-out split of sample indices, both in a seeded random order."""
    from sklearn.model_selection import train_test_split
    train, test = train_test_split(list(range(len(labels))), test_size=heldout, stratify=labels, random_state=seed)
    return [int(i) for i in train], [int(i) for i in test]


def write_clip_benchmark_dir(out_dir: Path, kind: str, samples: list[dict[str, bytes | str]], keys: list[str],
                             shard_size: int) -> None:
    """One data set in CLIP_benchmark's local `wds/` layout (read by clip_benchmark.datasets.builder.build_wds_dataset).

    `test/{0..N-1}.tar` + `test/nshards.txt`; `dataset_type.txt` says classification or retrieval; classification
    sets add `classnames.txt` and `zeroshot_classification_templates.txt` ({c} = class name, one per line).
    """
    with ShardWriter(out_dir / "test", shard_size, name_format="{}.tar") as writer:
        for key, members in zip(keys, samples):
            writer.write(key, members)
    (out_dir / "test" / "nshards.txt").write_text(f"{len(writer.counts)}\n")
    (out_dir / "dataset_type.txt").write_text(f"{kind}\n")
    if kind == "classification":
        (out_dir / "classnames.txt").write_text("".join(f"{w}\n" for w in DIGIT_WORDS))
        templates = "".join(f"{t}\n" for t in DIGIT_ZEROSHOT_TEMPLATES)
        (out_dir / "zeroshot_classification_templates.txt").write_text(templates)


def make_digits(out_dir: str | Path, seed: int = 0) -> dict:
    """Write scikit-learn's handwritten digits as WebDataset shards: a training set and CLIP_benchmark eval sets.

    Layout (data/README.md has the details):
      out_dir/train/{00000..00011}.tar  1,500 samples, 125 a shard: png (64 px RGB), txt (one caption), cls,
                                        json {"key": global id 0..1499, "caption", "label", "source_index"}
      out_dir/train/sizes.json          {"00000.tar": 125, ..., "num_samples": 1500}
      out_dir/wds/digits_cls/           297 held-out images, zero-shot classification (classnames, templates, cls)
      out_dir/wds/digits_ret/           the same 297 images, retrieval: txt = 5 captions, one per line
    The split is stratified; the sample order, captions and split depend only on `seed`; the bytes are reproducible.
    Returns a summary dict (paths, counts) that is also written to out_dir/digits.json.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    out_dir = Path(out_dir)
    digits = load_digits()
    train_idx, heldout_idx = split_digits(digits.target, seed)
    rng = np.random.default_rng(seed)
    per_shard = -(-len(train_idx) // DIGITS_TRAIN_SHARDS)
    with ShardWriter(out_dir / "train", per_shard) as writer:
        for gid, src in enumerate(train_idx):
            label = int(digits.target[src])
            writer.write(f"{gid:09d}", sample_members(digit_image_png(digits.images[src]), "png",
                                                      digit_captions(label, rng, 1)[0], gid, label, source_index=src))
    sizes = write_sizes_json(out_dir / "train", writer.counts, len(train_idx))
    heldout, keys = [], []
    for gid, src in enumerate(heldout_idx):
        label = int(digits.target[src])
        captions = "\n".join(digit_captions(label, rng, RETRIEVAL_CAPTIONS_PER_IMAGE))
        heldout.append(sample_members(digit_image_png(digits.images[src]), "png", captions, gid, label,
                                      source_index=src))
        keys.append(f"{gid:09d}")
    cls_dir, ret_dir = out_dir / "wds" / "digits_cls", out_dir / "wds" / "digits_ret"
    write_clip_benchmark_dir(cls_dir, "classification", heldout, keys, shard_size=75)
    write_clip_benchmark_dir(ret_dir, "retrieval", heldout, keys, shard_size=75)
    summary = {"train": brace_pattern(out_dir / "train", writer.counts), "sizes_json": str(sizes),
               "num_samples": len(train_idx), "train_shards": len(writer.counts), "heldout": len(heldout_idx),
               "zeroshot": [str(cls_dir)], "retrieval": [str(ret_dir)], "classnames": list(DIGIT_WORDS),
               "image_size": DIGITS_IMAGE_SIZE, "seed": seed}
    (out_dir / "digits.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("wrote %d training and %d held-out digits to %s", len(train_idx), len(heldout_idx), out_dir)
    return summary


def make_digits_main(argv: Sequence[str]) -> int:
    """`clip-glofnd make-digits OUT_DIR [--seed S]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd make-digits", description=make_digits.__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="output folder (created); train/ and wds/ go inside")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the sample order and the captions")
    ns = parser.parse_args(argv)
    summary = make_digits(ns.out_dir, seed=ns.seed)
    print(f"train: {summary['train']}  ({summary['num_samples']} samples, {summary['sizes_json']})")
    print(f"zero-shot: {summary['zeroshot'][0]}  retrieval: {summary['retrieval'][0]}  ({summary['heldout']} images)")
    return 0
