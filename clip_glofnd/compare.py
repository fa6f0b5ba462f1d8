"""`clip-glofnd compare RUN_DIR ...`: one table of finished runs, side by side, read from their metrics.jsonl.

Per run: the filter (--fnd, and --fnd-init for GloFND), the last evaluation's zero-shot acc1 and retrieval R@1 (text →
image, image → text), and over the epochs in which masks were on: the fraction of negatives filtered, and — when
the shards carry class labels — the filter's precision and recall against them (same class = true false negative,
from the trainer's per-step counts fn_true / fn_false / fn_present, both anchor modalities pooled). For GloFND, the
median λ of the samples seen after the last epoch, and α. Runs that share a seed with a run without filter (the same
initialisation and data order) also get their paired acc1 difference to it, with a 95% t interval over the seeds
where there are several. Torch-free: it reads JSON lines and config.yaml.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clip_glofnd.config import undump
from clip_glofnd.errors import UsageError

MODALITIES = ("img", "txt")
COLUMNS = (("run", "{}"), ("filter", "{}"), ("acc1", "{:.3f}"), ("R@1 t→i", "{:.3f}"), ("R@1 i→t", "{:.3f}"),
           ("filtered", "{:.1%}"), ("FN precision", "{:.2f}"), ("FN recall", "{:.2f}"), ("λ median", "{:.3f}"),
           ("α", "{:g}"))


def _read(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(flat config, metrics records) of a run folder; UsageError naming the missing file."""
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for path in (config_file, metrics_file):
        if not path.is_file():
            raise UsageError(f"{path}: not found; pass run folders written by clip-glofnd train (<logs>/<name>)")
    config = undump(config_file.read_text())
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return config, [r for r in records if "phase" not in r]  # training only (not the state warm-up)


def _last(records: list[dict[str, Any]], suffix: str, prefix: str) -> float | None:
    """The last logged value of a metric named prefix…suffix."""
    for record in reversed(records):
        for key, value in record.items():
            if key.startswith(prefix) and key.endswith(suffix):
                return value
    return None


def _ratio(num: float, den: float) -> float | None:
    """num / den, None when den is 0 (precision of a filter that dropped nothing)."""
    return num / den if den else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    """Harmonic mean; 0 when nothing true was found (recall 0, even if nothing was filtered: precision undefined);
    None when there was nothing to find."""
    if recall is None:
        return None
    if recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def fn_scores(steps: Sequence[dict[str, Any]], modalities: Sequence[str] = MODALITIES) -> dict[str, Any]:
    """Precision, recall, F1 of the filter against the labels from the trainer's summed per-step counts fn_true /
    fn_false / fn_present (the given modalities pooled); a step without counts (no filter, no labels) counts 0, so
    an unmeasured value is None."""
    true = sum(r.get(f"fn_true_{m}", 0) for r in steps for m in modalities)
    false = sum(r.get(f"fn_false_{m}", 0) for r in steps for m in modalities)
    present = sum(r.get(f"fn_present_{m}", 0) for r in steps for m in modalities)
    precision, recall = _ratio(true, true + false), _ratio(true, present)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "true": true, "false": false,
            "present": present}


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences (a filter's run minus no filter's on the same seed: same initialisation and data
    order) and its two-sided Student-t interval: mean ± t(n−1) · sd / √n; the interval is None below 2 pairs. Pairing
    removes the seed-to-seed spread both runs share, which unpaired mean ± std keep."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "ci": None, "confidence": confidence}
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "ci": None, "confidence": confidence}
    from scipy.stats import t                                              # scikit-learn's dependency
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / n ** 0.5
    return {"n": n, "mean": mean, "ci": [mean - half, mean + half], "confidence": confidence}


def same_seed_differences(rows: Sequence[dict[str, Any]], key: str = "acc1", group: str = "filter",
                          baseline: str = "none") -> list[float | None]:
    """Per row, its `key` minus that of the baseline row (row[group] == baseline: no filter by default) of the same
    seed; None for baseline rows, rows without a value, or without such a seed-mate."""
    base = {row["seed"]: row[key] for row in rows if row[group] == baseline and row.get(key) is not None}
    return [None if row[group] == baseline or row.get(key) is None or row.get("seed") not in base
            else row[key] - base[row["seed"]] for row in rows]


def paired_differences(rows: Sequence[dict[str, Any]], key: str = "acc1", group: str = "filter",
                       baseline: str = "none") -> dict[str, dict[str, Any]]:
    """Per label (rows' `group`), the paired differences of `key` to the baseline row (no filter by default) of the
    same seed and their `paired_interval`; rows without a baseline seed-mate are left out."""
    out: dict[str, dict[str, Any]] = {}
    for row, diff in zip(rows, same_seed_differences(rows, key, group, baseline)):
        if diff is not None:
            pairs = out.setdefault(row[group], {"seeds": [], "diffs": []})
            pairs["seeds"].append(row["seed"])
            pairs["diffs"].append(diff)
    return {name: {**pairs, **paired_interval(pairs["diffs"])} for name, pairs in out.items()}


def filtered_fraction(step: dict[str, Any]) -> float:
    """Fraction of negatives filtered in one step, both anchor modalities averaged (0 without a filter)."""
    return (step.get("filtered_img", 0.0) + step.get("filtered_txt", 0.0)) / 2


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """The table's row of one run folder (None where not measured)."""
    config, records = _read(Path(run_dir))
    variant = config.get("fnd", "none")
    mask_start = config.get("fnd_mask_start_epoch")
    mask_start = config.get("fnd_start_epoch", 0) if mask_start is None else mask_start
    steps = list({r["step"]: r for r in records if "loss" in r and "epoch" in r}.values())   # last line per step
    masked = [r for r in steps if r["epoch"] >= mask_start] if variant != "none" else []
    scores = fn_scores(masked)
    filtered = [filtered_fraction(r) for r in masked]
    lam = [_last(records, "_p50", f"lam_{m}_seen") for m in MODALITIES]
    return {
        "run": Path(run_dir).name,
        "seed": config.get("seed", 0),
        "filter": f"{variant} ({config.get('fnd_init', 'one')})" if variant == "glofnd" else variant,
        "acc1": _last(records, "/acc1", "zeroshot/"),
        "R@1 t→i": _last(records, "/image_retrieval_recall@1", "retrieval/"),
        "R@1 i→t": _last(records, "/text_retrieval_recall@1", "retrieval/"),
        "filtered": sum(filtered) / len(filtered) if filtered else (0.0 if variant == "none" else None),
        "FN precision": scores["precision"],
        "FN recall": scores["recall"],
        "λ median": sum(lam) / 2 if variant == "glofnd" and None not in lam else None,
        "α": config.get("fnd_alpha") if variant in ("glofnd", "fnd") else None,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Aligned plain-text table; '—' where a value was not measured."""
    cells = [[name for name, _ in COLUMNS]]
    cells += [["—" if row[name] is None else spec.format(row[name]) for name, spec in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: Sequence[str]) -> int:
    """`clip-glofnd compare RUN_DIR [RUN_DIR ...] [--json FILE]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (<logs>/<name>) of clip-glofnd train")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ns = parser.parse_args(list(argv))
    rows = [summarize_run(Path(run)) for run in ns.runs]
    print(format_table(rows))
    for name, pair in paired_differences(rows).items():
        print(paired_line(name, pair))
    if ns.json:
        for row, diff in zip(rows, same_seed_differences(rows)):          # the paired difference of each run
            row["acc1_minus_none_same_seed"] = diff
        Path(ns.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def paired_line(name: str, pair: dict[str, Any]) -> str:
    """One line: a filter's acc1 minus no filter's on the same seeds, in points, with its interval where defined."""
    diffs = ", ".join(f"{100 * d:+.1f}" for d in pair["diffs"])
    ci = pair["ci"]
    interval = (f", {100 * pair['confidence']:.0f}% interval [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci
                else " (one seed: no interval)")
    return (f"paired acc1 {name} − none, same seed: {100 * pair['mean']:+.1f} pts over {pair['n']} seed(s) "
            f"(seed {', '.join(map(str, pair['seeds']))}: {diffs}){interval}")
