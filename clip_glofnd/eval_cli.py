"""`clip-glofnd eval`: its flags, and the dispatch between one or more data sets (clip_glofnd/evaluate.py) and a
whole benchmark suite (`--suite`, clip_glofnd/suite.py).

Parsing and `--help` import nothing heavy; torch and open_clip come in only when a model is built.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from clip_glofnd.errors import UsageError
from clip_glofnd.evaluate import (BATCH_SIZE, CLASSIFICATION, RETRIEVAL, WORKERS, evaluate_dataset, open_datasets,
                                  pretrained_slug, result_file_name, result_record)
from clip_glofnd.model import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    """Flags of `clip-glofnd eval` (names as CLIP_benchmark / OpenCLIP users type them)."""
    parser = argparse.ArgumentParser(prog="clip-glofnd eval", description="Zero-shot classification and retrieval "
                                     "of a checkpoint, with CLIP_benchmark's metrics and result files; --suite runs a "
                                     "whole benchmark suite (DataComp's 38 tasks, ImageNet and variants, ...) with "
                                     "group means, resumably, for one or several checkpoints.")
    parser.add_argument("--model", required=True, help="open_clip architecture, clip_glofnd config (clip-tiny) or "
                        "path to a JSON config")
    parser.add_argument("--checkpoint", "--pretrained", dest="checkpoint", nargs="+", default=None, metavar="CKPT",
                        help="checkpoint file (ours or any OpenCLIP file) or an OpenCLIP pretrained tag; default: "
                        "random init. With --suite: several files, or a run folder of `clip-glofnd train` (its "
                        "checkpoints/epoch_N.pt), one summary column each")
    parser.add_argument("--zeroshot-data", nargs="+", default=[], metavar="DIR",
                        help="classification sets: CLIP_benchmark wds/ layout or a folder of class subfolders")
    parser.add_argument("--retrieval-data", nargs="+", default=[], metavar="DIR",
                        help="retrieval sets: CLIP_benchmark wds/ layout with dataset_type.txt = retrieval")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the result files")
    parser.add_argument("--split", default="test", help="wds split folder to read")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per batch (and score rows per "
                        "chunk); with --workers it sets the order in which tied retrieval scores break (default: "
                        f"{BATCH_SIZE}, CLIP_benchmark's)")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"data loader processes (default: {WORKERS}, "
                        "CLIP_benchmark's)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 gives CLIP_benchmark's --no_amp numbers; amp = fp16 autocast")
    suite = parser.add_argument_group("benchmark suites", "results.jsonl, summary.md / .csv (main metric per task, "
                                      "group means, overall mean; one column per checkpoint) in --output")
    suite.add_argument("--suite", metavar="SUITE", help="packaged suite (datacomp, imagenet-variants, retrieval, "
                       "digits) or a YAML file with `tasks:`")
    suite.add_argument("--dataset-root", nargs="+", default=[], metavar="PATTERN",
                       help="where a suite's data sets are: a folder holding them by name (ROOT/vtab/caltech101) or "
                       "a pattern with CLIP_benchmark's {dataset} / {dataset_cleaned} placeholders, e.g. "
                       "'/data/wds_{dataset_cleaned}'; several patterns: the first that exists wins")
    suite.add_argument("--overwrite", action="store_true", help="recompute tasks that results.jsonl already holds "
                       "(default: skip them, so a rerun resumes)")
    suite.add_argument("--skip-missing", action="store_true", help="run the data sets that are there and mark the "
                       "missing ones in the summary (default: list them all and stop)")
    return parser


def _summary(dataset: str, metrics: dict[str, float], seconds: float) -> str:
    """One line per data set."""
    shown = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
    return f"{dataset}: {shown} ({seconds:.1f} s)"


def main(argv: Sequence[str]) -> int:
    """`clip-glofnd eval`: evaluate, write one CLIP_benchmark-shaped JSON per (dataset, task), print summaries."""
    args = build_parser().parse_args(list(argv))
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be ≥ 1 and --workers ≥ 0")
    if args.suite:
        if args.zeroshot_data or args.retrieval_data:
            raise UsageError("--suite names its own data sets; drop --zeroshot-data / --retrieval-data (or write "
                             "them into a suite file)")
        from clip_glofnd.suite import suite_main
        return suite_main(args)
    if not args.zeroshot_data and not args.retrieval_data:
        raise UsageError("nothing to evaluate: pass --zeroshot-data and/or --retrieval-data, or --suite")
    if args.checkpoint and len(args.checkpoint) > 1:
        raise UsageError("several checkpoints (or a run folder) need --suite; evaluate one --checkpoint at a time "
                         "otherwise")
    checkpoint = args.checkpoint[0] if args.checkpoint else None
    datasets = open_datasets(args.zeroshot_data, args.retrieval_data, split=args.split)
    import torch
    from clip_glofnd.model import create_model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _, preprocess, tokenizer = create_model(args.model, checkpoint, device=device, precision=args.precision)
    model.eval()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        start = time.perf_counter()
        metrics = evaluate_dataset(model, preprocess, tokenizer, dataset, device=device, precision=args.precision,
                                   batch_size=args.batch_size, workers=args.workers)
        task = CLASSIFICATION if dataset.kind == "classification" else RETRIEVAL
        result = result_record(dataset.benchmark_name, args.model, checkpoint, task, metrics)
        name = result_file_name(dataset.name, pretrained_slug(checkpoint), args.model, task)
        (output / name).write_text(json.dumps(result) + "\n")
        print(_summary(dataset.benchmark_name, metrics, time.perf_counter() - start))
    return 0
