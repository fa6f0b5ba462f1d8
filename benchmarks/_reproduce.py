"""Shared machinery of the small-scale reproductions (`reproduce_digits`, `reproduce_lit_digits`): does GloFND find
the false negatives, and does dropping them help the model within a training budget?

For one test bed (data + model + recipe) `clip-glofnd train` runs, in this process and one after the other, with
each loss of --losses and each filter: `none`, the mini-batch quantile baseline `fnd`, GloFND with the paper's start
λ = 1 (`glofnd-one`) and with the warm start (`glofnd-quantile`, `--fnd-init quantile`), and the label `oracle`;
for several seeds at the same budget (epochs, batch, lr, masking from the same epoch, the same α for fnd and GloFND;
λ = 1 learns from epoch 0, the warm start from the masking epoch: `learn_from`).
Per run, from the trainer's own metrics.jsonl:
- zero-shot top-1 and retrieval R@1 both ways on the bed's held-out sets, evaluated after the last epoch;
- the filter against the labels (same class = true false negative): the per-step counts the trainer logs
  (`fn_true_*`, `fn_false_*`, `fn_present_*`, per anchor modality) summed over the masking epochs, both modalities
  pooled: precision = true / filtered, recall = true / same-class negatives present, F1;
- the filtered fraction of negatives per epoch (against α), λ over training (GloFND), wall time.

The summary is mean ± std over seeds per (loss, filter) and, per filter, its paired acc1 difference to no filter on
the same seed (same initialisation and data order) with a 95% t interval over the seeds; the issue's targets are
checked per loss for both GloFND starts (the paired ones: interval above 0, and 0 not above it): filtered fraction
within ×1.5 of α in every masking epoch (mean over seeds); FN F1 ≥ fnd's + 0.10; zero-shot acc1 not below no filter by
more than one std (of no filter's seeds) and closing at least half of the none → oracle gap (when the oracle is
ahead). Results are written as measured, targets met or not.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _common
from clip_glofnd.compare import MODALITIES, filtered_fraction, fn_scores, paired_differences, paired_interval

LOSSES = ("clip", "sogclr")
VARIANTS = {"none": ["--fnd", "none"], "fnd": ["--fnd", "fnd"],
            "glofnd-one": ["--fnd", "glofnd", "--fnd-init", "one"],
            "glofnd-quantile": ["--fnd", "glofnd", "--fnd-init", "quantile"], "oracle": ["--fnd", "oracle"]}
GLOFND = ("glofnd-one", "glofnd-quantile")
ALPHA_VARIANTS = ("fnd", *GLOFND)                       # the filters that read α (swept by --alphas)
_GLOFND_ONLY = ("fnd_lr", "fnd_init", "fnd_bias_correction", "fnd_start_epoch")
UNREAD = {"glofnd": (), "fnd": _GLOFND_ONLY, "oracle": ("fnd_alpha", *_GLOFND_ONLY),   # settings a --fnd mode never
          "none": ("fnd_alpha", "fnd_mask_start_epoch", *_GLOFND_ONLY)}              # reads: not compared on reuse
COLORS = {"none": "C7", "fnd": "C1", "glofnd-one": "C0", "glofnd-quantile": "C2", "oracle": "C3"}


@dataclass
class Bed:
    """A test bed: its data (train pattern, eval folders) and the training recipe every run shares."""

    name: str
    train: str                                  # shard pattern
    zeroshot: str                               # CLIP_benchmark classification folder
    retrieval: str | None                       # CLIP_benchmark retrieval folder (None: not evaluated)
    flags: list[str] = field(default_factory=list)     # model, batch, epochs, lr, ... (all but loss / filter / seed)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags every reproduction has (their defaults come from the bed's presets)."""
    p.add_argument("--quick", action="store_true", help="1 seed, 1 short epoch (CI)")
    p.add_argument("--data", help="the bed's data folder; built in a temporary folder if unset or missing")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds")
    p.add_argument("--epochs", type=int, help="epochs per run")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--lr", type=float, help="model learning rate")
    p.add_argument("--warmup", type=int, help="lr warmup steps")
    p.add_argument("--train-num-samples", type=int, help="samples per epoch (default: the whole training set)")
    p.add_argument("--alphas", "--alpha", dest="alphas", type=float, nargs="+",
                   help="α of fnd and GloFND; several values sweep it (every α-reading filter runs at each α, no "
                        "filter and the oracle once per seed)")
    p.add_argument("--fnd-lr", type=float, help="Adam step of λ")
    p.add_argument("--mask-start-epoch", type=int,
                   help="every filter masks from this epoch on (0-based); = --epochs: never (a null control: the "
                        "filter's code path, nothing removed)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, help=f"default: {' '.join(LOSSES)}")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help=f"default: {' '.join(VARIANTS)}")
    p.add_argument("--no-retrieval", dest="retrieval", action="store_false", default=None,
                   help="skip the retrieval evaluation (R@1 left empty)")
    p.add_argument("--runs-dir", type=Path, help="keep the run folders here (default: a temporary folder); finished "
                                                 "runs found there with the same flags are reused, not retrained")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side, each in its own process with cores / jobs torch threads "
                        "(2 on 2 cores: ~1.3x the runs per hour of one 2-thread run)")
    p.add_argument("--output", type=Path, help="JSON result; the PNGs go beside it (<stem>_*.png)")


def apply_preset(ns: argparse.Namespace, presets: dict[str, dict[str, Any]], p: argparse.ArgumentParser) -> None:
    """Unset flags take the preset (full, or quick with --quick); sanity checks."""
    defaults = {"losses": list(LOSSES), "variants": list(VARIANTS), "retrieval": True}
    for key, value in {**defaults, **presets["quick" if ns.quick else "full"]}.items():
        if getattr(ns, key, None) is None:
            setattr(ns, key, value)
    if ns.epochs < 1 or ns.batch_size < 1 or not ns.seeds or ns.jobs < 1:
        p.error("--epochs, --batch-size and --jobs must be >= 1; --seeds needs at least one value")
    if not all(0 < a < 1 for a in ns.alphas):
        p.error(f"--alphas must lie in (0, 1); got {' '.join(map(str, ns.alphas))}")
    if not 0 <= ns.mask_start_epoch <= ns.epochs:
        p.error(f"--mask-start-epoch must be in [0, --epochs]; got {ns.mask_start_epoch}")


# --------------------------------------------------------------------------------------------------------- runs
def learn_from(variant: str, mask_start_epoch: int) -> int:
    """--fnd-start-epoch of a filter: λ = 1 learns from epoch 0, so that it has walked down when masking starts; the
    warm start learns from the masking epoch (its first visit then sets λ from the model that masks; set earlier, it
    would come from similarities the model no longer has — on digits from scratch, from the initial plateau)."""
    return mask_start_epoch if variant == "glofnd-quantile" else 0


def filter_flags(ns: argparse.Namespace, variant: str, alpha: float | None) -> list[str]:
    """The filter's flags: only those its --fnd mode reads (no filter: none; the oracle: when it masks)."""
    flags = [*VARIANTS[variant]]
    if variant != "none":
        flags += ["--fnd-mask-start-epoch", str(ns.mask_start_epoch)]
    if variant in ALPHA_VARIANTS:
        flags += ["--fnd-alpha", str(alpha)]
    if variant in GLOFND:
        flags += ["--fnd-lr", str(ns.fnd_lr), "--fnd-start-epoch", str(learn_from(variant, ns.mask_start_epoch))]
    return flags


def train_argv(ns: argparse.Namespace, bed: Bed, loss: str, variant: str, seed: int, logs: Path, name: str,
               alpha: float | None = None) -> list[str]:
    """`clip-glofnd train` flags of one run (eval on the held-out sets after the last epoch only); `alpha` for the
    filters that read it (default: the first of --alphas)."""
    alpha = ns.alphas[0] if alpha is None else alpha
    argv = ["train", "--train-data", bed.train, *bed.flags, "--batch-size", str(ns.batch_size),
            "--epochs", str(ns.epochs), "--lr", str(ns.lr), "--warmup", str(ns.warmup), "--seed", str(seed),
            "--loss", loss, *filter_flags(ns, variant, alpha),
            "--zeroshot-data", bed.zeroshot, *(["--retrieval-data", bed.retrieval] if bed.retrieval else []),
            "--eval-every", str(ns.epochs),
            "--save-frequency", "0", "--log-every-n-steps", "1", "--logs", str(logs), "--name", name]
    if loss != "clip":
        argv += ["--loss-gamma-decay-epochs", str(ns.epochs)]                   # γ reaches its floor in the budget
    if ns.train_num_samples:
        argv += ["--train-num-samples", str(ns.train_num_samples)]
    return argv


def _eval_value(record: dict[str, Any], prefix: str, suffix: str) -> float | None:
    """The first metric named prefix/.../suffix in an evaluation record (None if not evaluated)."""
    return next((v for k, v in record.items() if k.startswith(prefix) and k.endswith(suffix)), None)


def run_metrics(records: list[dict[str, Any]], mask_start_epoch: int) -> dict[str, Any]:
    """One run's numbers from its metrics.jsonl (training steps only; state warm-up records are skipped)."""
    training = [r for r in records if "phase" not in r]
    steps = list({r["step"]: r for r in training if "loss" in r}.values())             # last record per step
    evals = [r for r in training if any(k.startswith("zeroshot/") for k in r)]
    if not steps or not evals:
        raise RuntimeError("metrics.jsonl lacks training steps or the final evaluation")
    masked = [r for r in steps if r["epoch"] >= mask_start_epoch]
    epochs = sorted({r["epoch"] for r in steps})
    out: dict[str, Any] = {
        "zeroshot_acc1": _eval_value(evals[-1], "zeroshot/", "/acc1"),
        "r1_t2i": _eval_value(evals[-1], "retrieval/", "/image_retrieval_recall@1"),    # text query -> image
        "r1_i2t": _eval_value(evals[-1], "retrieval/", "/text_retrieval_recall@1"),     # image query -> text
        "fn": fn_scores(masked), **{f"fn_{m}": fn_scores(masked, [m]) for m in MODALITIES},
        "fn_per_epoch": [{"epoch": e, **fn_scores([r for r in steps if r["epoch"] == e])} for e in epochs],
        "filtered_per_epoch": [statistics.mean(filtered_fraction(r) for r in steps if r["epoch"] == e) for e in epochs],
        "filtered_frac": statistics.mean(filtered_fraction(r) for r in masked) if masked else 0.0,
        "last_epoch_loss": [r for r in training if "epoch_loss" in r][-1]["epoch_loss"],
        "epoch_loss": [r["epoch_loss"] for r in training if "epoch_loss" in r], "steps": len(steps)}
    if "lam_img_p50" in steps[0]:
        out["lambda_trace"] = {key: [r[key] for r in steps] for key in
                               (f"lam_{m}_p{p}" for m in MODALITIES for p in (10, 50, 90))}
    return out


def run_name(loss: str, variant: str, seed: int, alpha: float | None = None) -> str:
    """Run folder name; with α for the filters that read it (a sweep's runs share one --runs-dir)."""
    return f"{loss}-{variant}-a{alpha:g}-s{seed}" if variant in ALPHA_VARIANTS and alpha is not None else \
        f"{loss}-{variant}-s{seed}"


def same_settings(stored: str, argv: Sequence[str]) -> bool:
    """Whether a run folder's config.yaml text holds the settings `argv` gives: every key equal, a key the file lacks
    (an option added to the trainer after that run) at its default, and the filter's knobs only where its --fnd mode
    reads them (`UNREAD`: a run without a filter is the same run at every α, and a changed default of --fnd-init
    leaves it the same run)."""
    from clip_glofnd.config import from_flat, parse_config, to_flat, undump
    old = undump(stored)
    new = to_flat(parse_config(argv[1:])[0])
    defaults = to_flat(from_flat({"train_data": new["train_data"]}))
    unread = UNREAD[new["fnd"]]
    return set(old) <= set(new) and all(old[k] == v if k in old else v == defaults[k]
                                        for k, v in new.items() if k not in unread)


def finished_run(run_dir: Path, argv: Sequence[str], epochs: int) -> dict[str, Any] | None:
    """The records of a run folder that already holds this exact run (its config.yaml holds the settings `argv`
    gives, and it logged its evaluation after the last epoch), else None: a rerun with the same --runs-dir reuses
    finished runs."""
    from clip_glofnd.logger import read_jsonl
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not (config.is_file() and metrics.is_file()) or not same_settings(config.read_text(), argv):
        return None
    records = read_jsonl(metrics)
    done = any(r.get("epoch") == epochs and any(k.startswith("zeroshot/") for k in r) for r in records)
    return {"records": records, "wall_s": sum(r.get("epoch_time", 0.0) for r in records)} if done else None


def plan(ns: argparse.Namespace) -> list[tuple[str, str, int, float | None]]:
    """Every run as (loss, variant, seed, α or None), seed-major (load drift hits every filter alike); the filters
    that read α once per α, no filter and the oracle once per seed."""
    return [(loss, variant, seed, alpha) for seed in ns.seeds for loss in ns.losses for variant in ns.variants
            for alpha in (ns.alphas if variant in ALPHA_VARIANTS else [None])]


def do_run(ns: argparse.Namespace, bed: Bed, logs: Path, loss: str, variant: str, seed: int,
           alpha: float | None = None) -> dict[str, Any]:
    """One training run (or a finished one found in `logs`), its settings and its numbers. A run is bit-reproducible
    at the same torch thread count (stored for the runs trained here; None for reused ones): threads split the float
    sums differently, and the runs part from the first epoch's loss on."""
    import torch
    from clip_glofnd import cli
    from clip_glofnd.logger import read_jsonl
    name = run_name(loss, variant, seed, alpha)
    argv = train_argv(ns, bed, loss, variant, seed, logs, name, alpha)
    found = finished_run(logs / name, argv, ns.epochs)
    if found is None:
        shutil.rmtree(logs / name, ignore_errors=True)                           # an unfinished or other run
        began = time.perf_counter()
        code = cli.main(argv)
        wall = time.perf_counter() - began
        if code != 0:
            raise RuntimeError(f"run {name} failed with exit code {code}: {shlex.join(['clip-glofnd', *argv])}")
        found = {"records": read_jsonl(logs / name / "metrics.jsonl"), "wall_s": wall, "reused": False,
                 "torch_threads": torch.get_num_threads()}
    metrics = run_metrics(found["records"], ns.mask_start_epoch)
    return {"loss": loss, "variant": variant, "seed": seed, "alpha": alpha, "name": name,
            "command": shlex.join(["clip-glofnd", *argv]),
            "wall_s": found["wall_s"], "reused": found.get("reused", True), "loadavg_1min_after": os.getloadavg()[0],
            "torch_threads": found.get("torch_threads"),     # the float sums' order: same threads, same bits
            **metrics}


# ------------------------------------------------------------------------------------------------------ summary
def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the defined values (std 0 for one value; None for none)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None
    return statistics.mean(defined), statistics.stdev(defined) if len(defined) > 1 else 0.0


SUMMARY_KEYS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "zeroshot_acc1": lambda r: r["zeroshot_acc1"], "r1_t2i": lambda r: r["r1_t2i"], "r1_i2t": lambda r: r["r1_i2t"],
    "fn_precision": lambda r: r["fn"]["precision"], "fn_recall": lambda r: r["fn"]["recall"],
    "fn_f1": lambda r: r["fn"]["f1"], "filtered_frac": lambda r: r["filtered_frac"], "wall_s": lambda r: r["wall_s"]}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (loss, variant, α), plus the per-epoch filtered fraction (mean over seeds), the
    paired acc1 difference to no filter and, for GloFND, to fnd at the same α."""
    rows = []
    for loss in LOSSES:
        for variant in VARIANTS:
            for alpha in sorted({r["alpha"] for r in runs if r["loss"] == loss and r["variant"] == variant},
                                key=lambda a: -1.0 if a is None else a):
                mine = _runs_of(runs, loss, variant, alpha)
                row: dict[str, Any] = {"loss": loss, "variant": variant, "alpha": alpha,
                                       "seeds": [r["seed"] for r in mine]}
                for key, get in SUMMARY_KEYS.items():
                    row[f"{key}_mean"], row[f"{key}_std"] = mean_std([get(r) for r in mine])
                row["filtered_per_epoch"] = [statistics.mean(v) for v in zip(*(r["filtered_per_epoch"] for r in mine))]
                if variant != "none":
                    row["zeroshot_acc1_paired"] = paired_acc1(runs, loss, variant, alpha)
                if variant in GLOFND:
                    row["zeroshot_acc1_paired_fnd"] = paired_acc1(runs, loss, variant, alpha, baseline="fnd")
                rows.append(row)
    return rows


def paired_acc1(runs: list[dict[str, Any]], loss: str, variant: str, alpha: float | None = None,
                baseline: str = "none") -> dict[str, Any]:
    """acc1 of `variant` (at `alpha`) minus the baseline's (no filter, or a filter at the same α) on the same seed —
    the same initialisation and data order — per seed, with the mean and its 95% t interval
    (compare.paired_differences)."""
    base_alpha = alpha if baseline in ALPHA_VARIANTS else None
    mine = _runs_of(runs, loss, baseline, base_alpha) + _runs_of(runs, loss, variant, alpha)
    found = paired_differences(mine, key="zeroshot_acc1", group="variant", baseline=baseline).get(variant)
    return found or {"seeds": [], "diffs": [], **paired_interval([])}


def at_equal_share(rows: list[dict[str, Any]], row: dict[str, Any], key: str = "fn_precision_mean") -> float | None:
    """fnd's `key` at `row`'s filtered share: linear in the share between fnd's (share, value) points of the same
    loss over the α swept (means over seeds); None outside their range — below α·(b − 1) = 1 the mini-batch quantile
    filters a row's top-1 whatever α is, so it cannot filter less."""
    if row[key] is None:
        return None
    return _common.interpolate([(r["filtered_frac_mean"], r[key]) for r in rows
                                if r["loss"] == row["loss"] and r["variant"] == "fnd" and r[key] is not None],
                               row["filtered_frac_mean"])


def targets(rows: list[dict[str, Any]], mask_start_epoch: int, batch_size: int | None = None
            ) -> list[dict[str, Any]]:
    """The issue's targets per (loss, GloFND start, α), each with its numbers and met / not met (None: not
    measurable); `batch_size` b marks the rows with α·b < 1, where FN precision at equal filtered share is asked."""
    out = []
    for loss in LOSSES:
        for row in (r for r in rows if r["loss"] == loss and r["variant"] in GLOFND):
            alpha = row["alpha"]
            by = {r["variant"]: r for r in rows if r["loss"] == loss and r["alpha"] in (alpha, None)}
            fracs = row["filtered_per_epoch"][mask_start_epoch:]
            item: dict[str, Any] = {"loss": loss, "variant": row["variant"], "alpha": alpha,
                                    "filtered_per_masking_epoch": fracs,
                                    "filtered_within_1.5x": all(alpha / 1.5 <= f <= 1.5 * alpha for f in fracs)}
            if "fnd" in by and row["fn_f1_mean"] is not None and by["fnd"]["fn_f1_mean"] is not None:
                item["fn_f1_minus_fnd"] = row["fn_f1_mean"] - by["fnd"]["fn_f1_mean"]
                item["fn_f1_10_points_over_fnd"] = item["fn_f1_minus_fnd"] >= 0.10
            fnd_precision = at_equal_share(rows, row)
            if fnd_precision is not None:
                item["fn_precision_minus_fnd_equal_share"] = row["fn_precision_mean"] - fnd_precision
                item["fn_precision_10_points_over_fnd_equal_share"] = (
                    item["fn_precision_minus_fnd_equal_share"] >= 0.10)
            if batch_size:
                item["alpha_times_b"] = alpha * batch_size
            for name, key in (("acc1_paired", "zeroshot_acc1_paired"), ("acc1_paired_fnd", "zeroshot_acc1_paired_fnd")):
                paired = row.get(key)
                if paired and paired["mean"] is not None:
                    item[name] = {k: paired[k] for k in ("n", "mean", "ci")}
            if "acc1_paired" in item:
                ci = item["acc1_paired"]["ci"]
                item["acc1_paired_gain"] = None if ci is None else ci[0] > 0         # interval above 0
                item["acc1_paired_no_loss"] = None if ci is None else ci[1] >= 0     # 0 inside or below it
            if "acc1_paired_fnd" in item:
                item["acc1_paired_at_least_fnd"] = item["acc1_paired_fnd"]["mean"] >= 0
            if "none" in by:
                none = by["none"]
                item["acc1_minus_none"] = row["zeroshot_acc1_mean"] - none["zeroshot_acc1_mean"]
                item["acc1_within_1_std_of_none"] = item["acc1_minus_none"] >= -none["zeroshot_acc1_std"]
                if "oracle" in by:
                    gap = by["oracle"]["zeroshot_acc1_mean"] - none["zeroshot_acc1_mean"]
                    item["oracle_gap"] = gap
                    item["oracle_beats_none_by_1_std"] = gap > none["zeroshot_acc1_std"]    # the bed shows FN harm
                    item["closes_half_of_oracle_gap"] = item["acc1_minus_none"] >= gap / 2 if gap > 0 else None
            out.append(item)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the summary: mean ± std per column ('—' where undefined, e.g. precision of no filter)."""
    columns = [("zeroshot_acc1", "zero-shot acc1", 100), ("r1_t2i", "R@1 t→i", 100), ("r1_i2t", "R@1 i→t", 100),
               ("fn_precision", "FN precision", 100), ("fn_recall", "FN recall", 100), ("fn_f1", "FN F1", 100),
               ("filtered_frac", "filtered %", 100), ("wall_s", "wall s", 1)]
    lines = ["| loss | filter | α | " + " | ".join(h for _, h, _ in columns) + " | acc1 − none, paired (95% CI) |",
             "|---|---|---|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = []
        for key, _, scale in columns:
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            cells.append("—" if mean is None else f"{mean * scale:.1f} ± {std * scale:.1f}")
        paired = row.get("zeroshot_acc1_paired")
        if not paired or paired["mean"] is None:
            cells.append("—")
        else:
            ci = paired["ci"]
            cells.append(f"{100 * paired['mean']:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""))
        shown = "—" if row["alpha"] is None else f"{row['alpha']:g}"
        lines.append(f"| {row['loss']} | {row['variant']} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(items: list[dict[str, Any]]) -> list[str]:
    """One line per (loss, GloFND start): each target's number and met / missed."""
    def mark(value: bool | None) -> str:
        return "n/a" if value is None else ("met" if value else "MISSED")
    lines = []
    for t in items:
        fracs = ", ".join(f"{100 * f:.1f}%" for f in t["filtered_per_masking_epoch"])
        text = (f"{t['loss']} {t['variant']} α {t['alpha']:g}: filtered per masking epoch [{fracs}] "
                f"{mark(t['filtered_within_1.5x'])}")
        if "fn_f1_minus_fnd" in t:
            text += f"; FN F1 − fnd {100 * t['fn_f1_minus_fnd']:+.1f} pts {mark(t['fn_f1_10_points_over_fnd'])}"
        if "fn_precision_minus_fnd_equal_share" in t:
            text += (f"; FN precision − fnd at equal share {100 * t['fn_precision_minus_fnd_equal_share']:+.1f} pts "
                     f"{mark(t['fn_precision_10_points_over_fnd_equal_share'])}")
        if "acc1_minus_none" in t:
            text += f"; acc1 − none {100 * t['acc1_minus_none']:+.1f} pts {mark(t['acc1_within_1_std_of_none'])}"
        if "acc1_paired" in t:
            ci = t["acc1_paired"]["ci"]
            shown = f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "n/a"
            text += (f"; paired acc1 − none {100 * t['acc1_paired']['mean']:+.1f} pts, 95% interval {shown} "
                     f"(gain: {mark(t['acc1_paired_gain'])}, no loss: {mark(t['acc1_paired_no_loss'])})")
        if "acc1_paired_fnd" in t:
            ci = t["acc1_paired_fnd"]["ci"]
            shown = f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "n/a"
            text += (f"; paired acc1 − fnd {100 * t['acc1_paired_fnd']['mean']:+.1f} pts {shown} "
                     f"{mark(t['acc1_paired_at_least_fnd'])}")
        if "oracle_gap" in t:
            text += (f"; oracle gap {100 * t['oracle_gap']:+.1f} pts (> 1 std of none: "
                     f"{mark(t['oracle_beats_none_by_1_std'])}), half closed {mark(t['closes_half_of_oracle_gap'])}")
        lines.append(text)
    return lines


# -------------------------------------------------------------------------------------------------------- plots
def _runs_of(runs: list[dict[str, Any]], loss: str, variant: str, alpha: float | None = None) -> list[dict[str, Any]]:
    """Runs of (loss, variant) by seed; of the filters that read α, those at `alpha` (any α when None)."""
    return sorted((r for r in runs if r["loss"] == loss and r["variant"] == variant
                   and (alpha is None or r.get("alpha") in (alpha, None))), key=lambda r: r["seed"])


def _figure(panels: int, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure                                   # Agg canvas, no pyplot global state
    return Figure(figsize=(5.5 * panels, height), dpi=100)


def _save(fig: Any, path: Path) -> Path:
    return _common.save_figure(fig, path)


def plot_filtered(path: Path, rows: list[dict[str, Any]], alpha: float, mask_start_epoch: int) -> Path:
    """PNG: fraction of negatives filtered per epoch (mean over seeds) for every filter, against α and ×1.5 of it."""
    from matplotlib.ticker import MaxNLocator
    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in rows)]
    fig = _figure(len(losses))
    for i, loss in enumerate(losses):
        ax = fig.add_subplot(1, len(losses), i + 1)
        for row in (r for r in rows if r["loss"] == loss and r["variant"] != "none"):
            fracs = row["filtered_per_epoch"]
            ax.plot(range(1, len(fracs) + 1), [100 * f for f in fracs], marker="o", color=COLORS[row["variant"]],
                    label=row["variant"])
        ax.axhline(100 * alpha, color="k", lw=1, label=f"α = {alpha:g}")
        ax.axhspan(100 * alpha / 1.5, 150 * alpha, color="k", alpha=0.08, lw=0, label="within ×1.5 of α")
        ax.axvline(mask_start_epoch + 0.5, color="k", ls=":", lw=1, label="masking starts")
        ax.set(title=f"{loss}: negatives filtered per epoch (mean of seeds)", xlabel="epoch", ylabel="filtered %",
               ylim=(0, None))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_lambda(path: Path, runs: list[dict[str, Any]], epochs: int, mask_start_epoch: int) -> Path | None:
    """PNG: median λ of each step's anchors over training, both GloFND starts (first seed; band p10–p90), per loss."""
    losses = [loss for loss in LOSSES if any(_runs_of(runs, loss, v) for v in GLOFND)]
    if not losses:
        return None
    fig = _figure(len(losses))
    for i, loss in enumerate(losses):
        ax = fig.add_subplot(1, len(losses), i + 1)
        for variant in GLOFND:
            mine = _runs_of(runs, loss, variant)
            if not mine:
                continue
            run, color = mine[0], COLORS[variant]
            x = [(step + 1) * epochs / run["steps"] for step in range(run["steps"])]        # epochs done
            for m, style in (("img", "-"), ("txt", "--")):
                ax.plot(x, run["lambda_trace"][f"lam_{m}_p50"], style, color=color, lw=1.2,
                        label=f"{variant}, {m} anchors")
            ax.fill_between(x, run["lambda_trace"]["lam_img_p10"], run["lambda_trace"]["lam_img_p90"], color=color,
                            alpha=0.12, lw=0)
        ax.axvline(mask_start_epoch, color="k", ls=":", label="masking starts")
        ax.set(title=f"{loss}: λ of each step's anchors (median, band p10–p90 image; seed {run['seed']})",
               xlabel="epochs of training", ylabel="threshold λ (cosine)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_fn(path: Path, runs: list[dict[str, Any]]) -> Path | None:
    """PNG: the filters' precision and recall against the labels per epoch (mean ± std over seeds)."""
    from matplotlib.ticker import MaxNLocator
    shown = ("fnd", *GLOFND)
    losses = [loss for loss in LOSSES if any(_runs_of(runs, loss, v) for v in shown)]
    if not losses:
        return None
    fig = _figure(len(losses), height=6.0)
    for col, loss in enumerate(losses):
        for row, metric in enumerate(("precision", "recall")):
            ax = fig.add_subplot(2, len(losses), row * len(losses) + col + 1)
            for variant in shown:
                mine = _runs_of(runs, loss, variant)
                if not mine:
                    continue
                stats = [mean_std(values) for values in zip(*([e[metric] for e in r["fn_per_epoch"]] for r in mine))]
                points = [(e + 1, m, s) for e, (m, s) in enumerate(stats) if m is not None]
                if points:
                    x, means, stds = zip(*points)
                    ax.errorbar(x, means, yerr=stds, color=COLORS[variant], marker="o", capsize=3, label=variant)
            ax.set(title=f"{loss}: false-negative {metric} (same class)", xlabel="epoch", ylabel=metric,
                   ylim=(0, 1.02))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------- main
def _worker_threads(threads: int) -> None:
    """A --jobs worker's torch threads (the cores shared between the runs side by side); its data loaders fork their
    workers as the trainer's do when run from the shell (a spawned process would spawn them, and the evaluation's
    WebDataset pipeline is not picklable)."""
    import multiprocessing

    import torch
    torch.set_num_threads(threads)
    multiprocessing.set_start_method("fork", force=True)


def run_all(ns: argparse.Namespace, bed: Bed, logs: Path) -> list[dict[str, Any]]:
    """The runs of `plan`, in this process one after the other, or --jobs at a time in spawned worker processes
    (cores / jobs torch threads each); results in plan order either way."""
    todo = plan(ns)
    if ns.jobs == 1:
        return [do_run(ns, bed, logs, *item) for item in todo]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    threads = max(1, (os.cpu_count() or 1) // ns.jobs)
    with ProcessPoolExecutor(ns.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_threads,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(do_run, ns, bed, logs, *item) for item in todo]
        return [future.result() for future in futures]


def run_benchmark(ns: argparse.Namespace, bed: Bed, benchmark: str, argv: Sequence[str], logs: Path,
                  settings: dict[str, Any]) -> dict[str, Any]:
    """Every (seed, loss, filter, α) run (`plan`); JSON, PNGs (per α, and the sweep's when several), printed table."""
    import torch
    from benchmarks._sweep import plot_sweep
    machine = _common.machine_info(torch.device("cpu"))
    began = time.perf_counter()
    runs = run_all(ns, bed, logs)
    rows = summarize(runs)
    checks = targets(rows, ns.mask_start_epoch, ns.batch_size)
    stem = str(ns.output.with_suffix(""))
    pngs: list[Path | None] = []
    for alpha in ns.alphas:
        tag = stem if len(ns.alphas) == 1 else f"{stem}_a{alpha:g}"
        mine = [r for r in runs if r["alpha"] in (alpha, None)]
        pngs += [plot_filtered(Path(f"{tag}_filtered.png"), [r for r in rows if r["alpha"] in (alpha, None)], alpha,
                               ns.mask_start_epoch),
                 plot_lambda(Path(f"{tag}_lambda.png"), mine, ns.epochs, ns.mask_start_epoch),
                 plot_fn(Path(f"{tag}_fn.png"), mine)]
    if len(ns.alphas) > 1:
        pngs.append(plot_sweep(Path(f"{stem}_sweep.png"), rows))
    result = {"benchmark": benchmark, "command": _common.command_line(f"benchmarks.{benchmark}", argv),
              "machine": _common.finish_info(machine), "wall_s": time.perf_counter() - began,
              "settings": {"seeds": ns.seeds, "epochs": ns.epochs, "batch_size": ns.batch_size, "lr": ns.lr,
                           "warmup": ns.warmup, "alphas": ns.alphas, "fnd_lr": ns.fnd_lr, "jobs": ns.jobs,
                           "mask_start_epoch": ns.mask_start_epoch, "losses": ns.losses, "variants": ns.variants,
                           "retrieval": ns.retrieval,
                           "train_flags": bed.flags, **settings},
              "summary": rows, "targets": checks, "runs": runs, "plots": [p.name for p in pngs if p is not None]}
    _common.write_json(ns.output, result)
    print(table(rows))
    print("\n".join(target_lines(checks)))
    print(f"wall {result['wall_s']:.0f} s   under load: {result['machine']['under_load']}")
    print(f"wrote {ns.output}" + "".join(f", {p}" for p in pngs if p is not None))
    return result
