"""False-negative detection at equal filtered share, from frozen embeddings: GloFND's global per-sample λ against the
mini-batch quantile (fnd) over α, at batch 32 and 128 (issue 20, item 3; the paper's detection claim, GloFND F1 53.1
against FNC 36.4 on ImageNet-100).

A checkpoint of the frozen-MiniLM bed (`clip-glofnd make-digits-minilm`; trained here without a filter on the bed's
recipe when --checkpoint is unset) embeds the 1,500 training pairs once; the similarities are then fixed, so what is
measured is the threshold rule alone, not the training it would steer. For every batch size, α and seed, random
batches visit every sample once per epoch and each rule filters the negatives of image and text anchors through
`GloFND.update_and_mask_unchecked` (the trainer's call):
- `fnd`: each row's mini-batch (1 − α) quantile;
- `glofnd-one` / `glofnd-quantile`: the learned λ (start 1, or the first visit's mini-batch quantile), λ step --fnd-lr;
- `global`: each row's exact (1 − α) quantile over all its n − 1 negatives — the threshold λ converges to.
Counted over the masking epochs (from --mask-start-epoch), both anchor modalities pooled, against the digit labels:
precision, recall, F1 and the filtered share. Each rule's points over α trace a precision–recall curve; the rules are
compared at equal filtered share (fnd's precision interpolated linearly at GloFND's share, where fnd reaches it).

    python -m benchmarks.fn_detection            # 2 batch sizes x 12 α x 4 rules x 3 seeds, minutes on 2 cores
    python -m benchmarks.fn_detection --quick    # CI: a one-epoch checkpoint, 96 pairs, a tiny grid

Writes benchmarks/results/fn_detection.json and fn_detection.png (precision and recall against filtered share).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common

RULES = ("fnd", "glofnd-one", "glofnd-quantile", "global")
COLORS = {"fnd": "C1", "glofnd-one": "C0", "glofnd-quantile": "C2", "global": "k"}
ALPHAS = [0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15]
PRESETS = {"full": dict(batch_sizes=[32, 128], alphas=ALPHAS, seeds=[0, 1, 2], epochs=6, mask_start_epoch=1,
                        fnd_lr=0.1),
           "quick": dict(batch_sizes=[16], alphas=[0.02, 0.2], seeds=[0], epochs=2, mask_start_epoch=1, fnd_lr=0.1)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; unset ones take the preset (full, or quick with --quick)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.fn_detection", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid on a few embeddings (CI)")
    p.add_argument("--data", help="the frozen-MiniLM bed's folder (make-digits-minilm); built in a temporary folder "
                                  "if unset or missing")
    p.add_argument("--checkpoint", help="a checkpoint of the bed's model (default: trained here, no filter, seed 0)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes (default 32 128)")
    p.add_argument("--alphas", type=float, nargs="+", help="α grid (default 12 values, 0.002 to 0.15)")
    p.add_argument("--seeds", type=int, nargs="+", help="batch-order seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, help="passes over the samples (default 6, the bed's budget)")
    p.add_argument("--mask-start-epoch", type=int, help="epochs counted from (0-based; default 1, the bed's)")
    p.add_argument("--fnd-lr", type=float, help="Adam step of λ (default 0.1, the bed's)")
    p.add_argument("--num-samples", type=int, help="embed only the first N training pairs (default: all)")
    p.add_argument("--output", type=Path, default=_common.RESULTS_DIR / "fn_detection.json",
                   help="JSON result; the PNG goes beside it (<stem>.png)")
    ns = p.parse_args(list(argv))
    for key, value in PRESETS["quick" if ns.quick else "full"].items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    if ns.quick and ns.num_samples is None:
        ns.num_samples = 96
    if min(ns.batch_sizes) < 2 or not 0 <= ns.mask_start_epoch < ns.epochs or not all(0 < a < 1 for a in ns.alphas):
        p.error("need --batch-sizes >= 2, 0 <= --mask-start-epoch < --epochs and --alphas in (0, 1)")
    return ns


# ------------------------------------------------------------------------------------------------- embeddings
def train_checkpoint(data: Path, logs: Path, quick: bool) -> Path:
    """A checkpoint of the bed's recipe without a filter (seed 0), saved after its last epoch."""
    from clip_glofnd import cli
    argv = ["train", "--config", str(data / "recipe.yaml"), "--fnd", "none", "--seed", "0", "--logs", str(logs),
            "--name", "no-filter", "--save-frequency", "1"]
    if quick:
        argv += ["--epochs", "1", "--train-num-samples", "64", "--warmup", "2"]
    if cli.main(argv) != 0:
        raise RuntimeError("training the checkpoint failed: clip-glofnd " + " ".join(argv))
    return max((logs / "no-filter" / "checkpoints").glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem[6:]))


@torch.no_grad()
def embed(data: Path, checkpoint: Path, num_samples: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings [n, d] of the bed's training pairs (by global id) and their labels [n]."""
    from clip_glofnd.config import undump
    from clip_glofnd.model import create_model
    from clip_glofnd.shards import decode_image, iter_samples, parse_id, read_caption, read_label, resolve_shards
    recipe = undump((data / "recipe.yaml").read_text())
    model, _, preprocess, tokenizer = create_model(recipe["model"], str(checkpoint))
    model.eval()
    shards, _ = resolve_shards(recipe["train_data"])
    samples = sorted(((parse_id(s, shard), decode_image(s, shard), read_caption(s, "txt", shard), read_label(s, shard))
                      for shard in shards for s in iter_samples(shard)), key=lambda t: t[0])[:num_samples]
    images = torch.stack([preprocess(image) for _, image, _, _ in samples])              # [n, 3, H, W]
    img = torch.cat([model.encode_image(chunk, normalize=True) for chunk in images.split(256)])
    tokens = tokenizer([caption for _, _, caption, _ in samples])
    txt = torch.cat([model.encode_text(chunk, normalize=True) for chunk in tokens.split(256)])
    return img.float(), txt.float(), torch.tensor([label for *_, label in samples])


# ------------------------------------------------------------------------------------------------------ rules
def detect(sim: torch.Tensor, labels: torch.Tensor, rule: str, alpha: float, batch_size: int, epochs: int,
           mask_start_epoch: int, fnd_lr: float, seed: int) -> dict[str, int]:
    """Counts (filtered, true, present) of one rule over the masking epochs, both anchor modalities (sim [n, n]:
    image anchors against texts; its transpose for text anchors); the batch order is the seed's, alike for every rule.
    """
    from clip_glofnd.glofnd import GloFND
    n = sim.shape[0]
    counts = {"filtered": 0, "true": 0, "present": 0}
    for anchors in (sim, sim.T.contiguous()):
        if rule == "global":
            lam = _common.global_quantile(anchors, alpha)                                      # [n]
        else:
            mode, init = ("fnd", "one") if rule == "fnd" else ("glofnd", rule.split("-")[1])
            fnd = GloFND(n, alpha, lr=fnd_lr, mode=mode, init=init, mask_start_epoch=mask_start_epoch,
                         start_epoch=mask_start_epoch if init == "quantile" else 0)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            for ids in torch.randperm(n, generator=gen).split(batch_size):
                if len(ids) < 2:
                    continue
                block = anchors[ids][:, ids]                                             # [b, b]
                positive = torch.arange(len(ids))
                if rule == "global":
                    keep = (block <= lam[ids][:, None]) | torch.eye(len(ids), dtype=torch.bool)
                else:
                    keep, _ = fnd.update_and_mask_unchecked(block, ids, epoch, positive)
                if epoch < mask_start_epoch:
                    continue
                same = (labels[ids][:, None] == labels[ids][None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
                counts["filtered"] += int((~keep).sum())
                counts["true"] += int((~keep & same).sum())
                counts["present"] += int(same.sum())
    per_epoch = sum(len(b) * (len(b) - 1) for b in torch.arange(n).split(batch_size) if len(b) >= 2)
    counts["negatives"] = 2 * per_epoch * (epochs - mask_start_epoch)                  # both modalities
    return counts


def scores(counts: dict[str, int]) -> dict[str, float | None]:
    """Precision, recall, F1 and filtered share of pooled counts (None where undefined)."""
    precision = counts["true"] / counts["filtered"] if counts["filtered"] else None
    recall = counts["true"] / counts["present"] if counts["present"] else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    return {"precision": precision, "recall": recall, "f1": f1, "share": counts["filtered"] / counts["negatives"]}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, rule, α): scores of the counts pooled over seeds; GloFND rows get fnd's precision, recall and F1 at
    their share (`fnd_at_share`)."""
    rows = []
    for key in sorted({(r["batch_size"], r["rule"], r["alpha"]) for r in runs}, key=lambda k: (k[0], RULES.index(k[1]),
                                                                                                k[2])):
        mine = [r for r in runs if (r["batch_size"], r["rule"], r["alpha"]) == key]
        pooled = {c: sum(r["counts"][c] for r in mine) for c in ("filtered", "true", "present", "negatives")}
        rows.append({"batch_size": key[0], "rule": key[1], "alpha": key[2], "seeds": len(mine), **scores(pooled)})
    for row in rows:
        if row["rule"] != "fnd":
            fnd = [r for r in rows if r["rule"] == "fnd" and r["batch_size"] == row["batch_size"]]
            row["fnd_at_share"] = {m: _common.interpolate([(r["share"], r[m]) for r in fnd if r[m] is not None],
                                                          row["share"])
                                   for m in ("precision", "recall", "f1")}
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (batch, rule, α), in %; fnd's precision at the same share beside GloFND's."""
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"
    lines = ["| batch | rule | α | filtered % | FN precision | FN recall | FN F1 | fnd's precision at that share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        at = r.get("fnd_at_share", {}).get("precision")
        lines.append(f"| {r['batch_size']} | {r['rule']} | {r['alpha']:g} | {100 * r['share']:.2f} | "
                     f"{pct(r['precision'])} | {pct(r['recall'])} | {pct(r['f1'])} | {pct(at)} |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """PNG: per batch size, precision and recall against filtered share (log), a line per rule over α."""
    from matplotlib.figure import Figure
    sizes = sorted({r["batch_size"] for r in rows})
    fig = Figure(figsize=(11, 3.8 * len(sizes)), dpi=100)
    for i, b in enumerate(sizes):
        for k, metric in enumerate(("precision", "recall")):
            ax = fig.add_subplot(len(sizes), 2, 2 * i + k + 1)
            for rule in RULES:
                line = sorted((r["share"], r[metric]) for r in rows
                              if r["batch_size"] == b and r["rule"] == rule and r[metric] is not None)
                if line:
                    ax.plot([100 * x for x, _ in line], [y for _, y in line], marker="o", color=COLORS[rule],
                            label=rule)
            ax.set(title=f"batch {b}: FN {metric} at its filtered share (frozen embeddings)", xscale="log",
                   xlabel="filtered % of negatives (log; points: the α grid)", ylabel=metric, ylim=(0, 1.02))
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    return _common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Embed the bed once, run every (batch, α, rule, seed), write the JSON and PNG, print the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    machine = _common.machine_info(torch.device("cpu"))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fn-detection-") as scratch:
        from benchmarks.reproduce_digits_minilm import prepare
        prepare(ns.data, Path(scratch))
        data = Path(ns.data) if ns.data else Path(scratch) / "digits_minilm"
        checkpoint = Path(ns.checkpoint) if ns.checkpoint else train_checkpoint(data, Path(scratch) / "logs",
                                                                                 ns.quick)
        img, txt, labels = embed(data, checkpoint, ns.num_samples)
    sim = img @ txt.T                                                                    # [n, n] frozen
    runs = [{"batch_size": b, "rule": rule, "alpha": alpha, "seed": seed,
             "counts": detect(sim, labels, rule, alpha, b, ns.epochs, ns.mask_start_epoch, ns.fnd_lr, seed)}
            for b in ns.batch_sizes for alpha in ns.alphas for rule in RULES for seed in ns.seeds]
    rows = summarize(runs)
    png = plot(ns.output.with_suffix(".png"), rows)
    result = {"benchmark": "fn_detection", "command": _common.command_line("benchmarks.fn_detection", argv),
              "machine": _common.finish_info(machine), "wall_s": time.perf_counter() - began,
              "settings": {k: getattr(ns, k) for k in ("batch_sizes", "alphas", "seeds", "epochs", "mask_start_epoch",
                                                       "fnd_lr", "num_samples")} | {
                  "checkpoint": ns.checkpoint or "trained here: bed recipe, --fnd none, seed 0",
                  "samples": int(sim.shape[0]), "same_class_share": float(
                      ((labels[:, None] == labels[None, :]).sum() - len(labels)) / (len(labels) * (len(labels) - 1)))},
              "summary": rows, "runs": runs, "plots": [png.name]}
    _common.write_json(ns.output, result)
    print(table(rows))
    print(f"wall {result['wall_s']:.0f} s   wrote {ns.output}, {png}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
