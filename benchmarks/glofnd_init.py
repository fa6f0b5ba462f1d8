"""How fast does λ reach the global (1 − α) quantile? GloFND's start λ = 1 (`init="one"`) against the warm start
(`init="quantile"`) on frozen clustered embeddings, where the exact answer is known.

Set-up (frozen, so the target does not move): n image embeddings in K clusters (unit cluster centres in d
dimensions plus Gaussian noise, normalised) and their texts (the image plus noise, normalised); the similarities of
image anchor i are s_ij = img_i · txt_j. An epoch visits every sample once in a random order, in batches of b; each
batch updates λ of its image anchors from the [b, b] mini-batch similarities (negatives: off the diagonal), exactly
as the trainer does. After every epoch, per sample: the **global filtered fraction** f_i = mean over ALL its n − 1
negatives of 1[s_ij > λ_i] (what λ_i would filter if every negative were in the batch), its relative error
|f_i − α| / α (1.0 = filters nothing), and |λ_i − q_i| against the exact global (1 − α) quantile q_i. The medians over
samples are reported per epoch, for each (α, λ step size) and both inits, averaged over --seeds (each seed draws
new embeddings and a new visiting order).

    python -m benchmarks.glofnd_init            # ~1 min on 2 cores
    python -m benchmarks.glofnd_init --quick    # CI: small n, 3 epochs

Writes benchmarks/results/glofnd_init.json (settings, per-epoch medians per config and seed, summary table) and
glofnd_init.png (median relative error of the global filtered fraction against epochs).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import _common
from clip_glofnd.glofnd import GloFND

logger = logging.getLogger(__name__)

INITS = ("one", "quantile")
PRESETS = {
    "full": dict(num_samples=4000, clusters=10, dim=64, batch_size=64, epochs=20, alphas=[0.05, 0.01],
                 lrs=[0.05, 0.1], seeds=[0, 1, 2]),
    "quick": dict(num_samples=256, clusters=4, dim=16, batch_size=32, epochs=3, alphas=[0.1], lrs=[0.1], seeds=[0]),
}
REPORT_EPOCHS = (1, 2, 3, 5, 10, 20)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags; unset ones take the preset (full, or quick with --quick)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.glofnd_init", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small n, 3 epochs, one config (CI)")
    p.add_argument("--num-samples", type=int, help="n (default 4000)")
    p.add_argument("--clusters", type=int, help="K clusters (default 10: ~10%% of a sample's negatives share its "
                                                "cluster)")
    p.add_argument("--dim", type=int, help="embedding dimension (default 64)")
    p.add_argument("--batch-size", type=int, help="b (default 64)")
    p.add_argument("--epochs", type=int, help="epochs, one λ update per sample each (default 20)")
    p.add_argument("--alphas", type=float, nargs="+", help="α values (default 0.05 0.01)")
    p.add_argument("--lrs", type=float, nargs="+", help="Adam step sizes of λ (default 0.05, the paper's, and 0.1)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument("--noise", type=float, default=0.6, help="std of the per-coordinate image noise around the "
                                                            "cluster centre, times 1/sqrt(d) (default 0.6)")
    p.add_argument("--text-noise", type=float, default=0.4, help="the same for text around its image (default 0.4)")
    p.add_argument("--output", type=Path, default=_common.RESULTS_DIR / "glofnd_init.json",
                   help="JSON result; the PNG goes beside it (<stem>.png)")
    ns = p.parse_args(list(argv))
    for key, value in PRESETS["quick" if ns.quick else "full"].items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    if ns.batch_size < 2 or ns.num_samples < ns.batch_size or ns.epochs < 1:
        p.error("need --batch-size >= 2, --num-samples >= --batch-size and --epochs >= 1")
    return ns


def clustered_embeddings(n: int, clusters: int, dim: int, noise: float, text_noise: float, seed: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen image and text embeddings [n, d], unit norm, in `clusters` groups."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=gen), dim=1)                 # [K, d]
    labels = torch.randint(clusters, (n,), generator=gen)                                    # [n]
    scale = dim ** -0.5
    img = F.normalize(centres[labels] + noise * scale * torch.randn(n, dim, generator=gen), dim=1)       # [n, d]
    txt = F.normalize(img + text_noise * scale * torch.randn(n, dim, generator=gen), dim=1)              # [n, d]
    return img, txt


def global_errors(sim: torch.Tensor, lam: torch.Tensor, target: torch.Tensor, alpha: float) -> dict[str, float]:
    """Medians over samples of |f_i − α| / α (f_i: fraction of ALL negatives above λ_i) and |λ_i − q_i|; mean f_i."""
    n = sim.shape[0]
    neg = ~torch.eye(n, dtype=torch.bool)                                                    # [n, n]
    frac = ((sim > lam[:, None]) & neg).sum(1).float() / (n - 1)                             # [n]
    return {"rel_err_median": float(((frac - alpha).abs() / alpha).median()),
            "lam_err_median": float((lam - target).abs().median()), "filtered_mean": float(frac.mean())}


def run_config(img: torch.Tensor, txt: torch.Tensor, *, alpha: float, lr: float, init: str, batch_size: int,
               epochs: int, seed: int) -> list[dict[str, float]]:
    """λ of the image anchors learned from mini-batches, epoch by epoch; errors against the global quantile."""
    n = img.shape[0]
    sim = img @ txt.T                                                                        # [n, n] frozen
    target = _common.global_quantile(sim, alpha)                                             # [n]
    fnd = GloFND(n, alpha=alpha, lr=lr, init=init)
    gen = torch.Generator().manual_seed(seed + 1000)                                         # same order per init
    out = []
    for epoch in range(epochs):
        for ids in torch.randperm(n, generator=gen).split(batch_size):                       # every sample once
            neg = ~torch.eye(len(ids), dtype=torch.bool)                                     # [b, b] off-diagonal
            fnd.update(sim[ids][:, ids], ids, epoch, neg_mask=neg)                           # [b, b] mini-batch
        out.append({"epoch": epoch + 1, **global_errors(sim, fnd.lam, target, alpha)})
    return out


def summarize(runs: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """Per (α, lr, init): mean over seeds of each epoch's medians, at the report epochs."""
    rows = []
    keys = sorted({(r["alpha"], r["lr"]) for r in runs}, key=lambda k: (-k[0], k[1]))
    for alpha, lr in keys:
        for init in INITS:
            mine = [r for r in runs if (r["alpha"], r["lr"], r["init"]) == (alpha, lr, init)]
            if not mine:
                continue
            row: dict[str, Any] = {"alpha": alpha, "lr": lr, "init": init, "seeds": len(mine)}
            for epoch in (e for e in REPORT_EPOCHS if e <= epochs):
                for key in ("rel_err_median", "lam_err_median", "filtered_mean"):
                    row[f"{key}@{epoch}"] = statistics.mean(r["per_epoch"][epoch - 1][key] for r in mine)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], epochs: int) -> str:
    """Markdown: median relative error of the global filtered fraction (and mean filtered fraction) per epoch."""
    shown = [e for e in REPORT_EPOCHS if e <= epochs]
    lines = ["| α | λ lr | init | " + " | ".join(f"epoch {e}" for e in shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for row in rows:
        cells = [f"{row[f'rel_err_median@{e}']:.2f} ({100 * row[f'filtered_mean@{e}']:.1f}%)" for e in shown]
        lines.append(f"| {row['alpha']:g} | {row['lr']:g} | {row['init']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, runs: list[dict[str, Any]]) -> Path:
    """PNG: median relative error of the global filtered fraction against epochs, one panel per α, mean of seeds."""
    from matplotlib.figure import Figure
    alphas = sorted({r["alpha"] for r in runs}, reverse=True)
    fig = Figure(figsize=(5.5 * len(alphas), 4), dpi=100)
    for i, alpha in enumerate(alphas):
        ax = fig.add_subplot(1, len(alphas), i + 1)
        for k, lr in enumerate(sorted({r["lr"] for r in runs if r["alpha"] == alpha})):
            for init, style in (("one", "--"), ("quantile", "-")):
                mine = [r for r in runs if (r["alpha"], r["lr"], r["init"]) == (alpha, lr, init)]
                curve = [statistics.mean(r["per_epoch"][e]["rel_err_median"] for r in mine)
                         for e in range(len(mine[0]["per_epoch"]))]
                ax.plot(range(1, len(curve) + 1), curve, style, color=f"C{k}", marker=".", label=f"{init}, lr {lr:g}")
        ax.set(title=f"α = {alpha:g}: median |f_i − α| / α (f_i: global filtered fraction)", xlabel="epochs (λ "
               "updates per sample)", ylabel="relative error (1 = filters nothing)", ylim=(0, None))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    return _common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (seed, α, lr, init), write the JSON and PNG, print the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    machine = _common.machine_info(torch.device("cpu"))
    began = time.perf_counter()
    runs = []
    for seed in ns.seeds:
        img, txt = clustered_embeddings(ns.num_samples, ns.clusters, ns.dim, ns.noise, ns.text_noise, seed)
        for alpha in ns.alphas:
            for lr in ns.lrs:
                for init in INITS:
                    per_epoch = run_config(img, txt, alpha=alpha, lr=lr, init=init, batch_size=ns.batch_size,
                                           epochs=ns.epochs, seed=seed)
                    runs.append({"seed": seed, "alpha": alpha, "lr": lr, "init": init, "per_epoch": per_epoch})
    rows = summarize(runs, ns.epochs)
    png = plot(ns.output.with_suffix(".png"), runs)
    result = {"benchmark": "glofnd_init", "command": _common.command_line("benchmarks.glofnd_init", argv),
              "machine": _common.finish_info(machine), "wall_s": time.perf_counter() - began,
              "settings": {k: getattr(ns, k) for k in ("num_samples", "clusters", "dim", "batch_size", "epochs",
                                                       "alphas", "lrs", "seeds", "noise", "text_noise")},
              "summary": rows, "runs": runs, "plots": [png.name]}
    _common.write_json(ns.output, result)
    print(table(rows, ns.epochs))
    print(f"wall {result['wall_s']:.0f} s; wrote {ns.output}, {png}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
