"""Zero-shot benchmark suites: many data sets, the means papers report, resumable, several checkpoints, curves.

A suite is a YAML file (its format, and how its data sets are found: clip_glofnd/suite_spec.py); packaged ones
live in clip_glofnd/resources/suites/ (datacomp, imagenet-variants, retrieval, digits) and are named by their stem.

`clip-glofnd eval --suite SUITE --output DIR` evaluates each (checkpoint, task) with clip_glofnd.evaluate, the one
place where metrics are computed, and writes in DIR: the per-task JSON of `clip-glofnd eval`; results.jsonl, one
object per (checkpoint, dataset, task), appended as each task finishes so that a rerun skips what it holds
(DataComp's evaluator does the same; --overwrite recomputes); summary.md and summary.csv (main metric per task, group
means, overall mean; one column per checkpoint); summary_per_epoch.png (each group's mean per epoch) when the
checkpoints carry two or more epochs. The checkpoint columns and results.jsonl are clip_glofnd/suite_results.py's,
the summaries clip_glofnd/suite_summary.py's; this module runs the evaluations.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clip_glofnd.errors import UsageError
from clip_glofnd.evaluate import (BATCH_SIZE, WORKERS, evaluate_dataset, result_file_name, result_record,
                                  with_mean_recall)
from clip_glofnd.suite_results import (RESULTS, Checkpoint, Settings, expand_checkpoints, finite, make_record,
                                       read_results, result_key, write_results)
from clip_glofnd.suite_spec import Located, Suite, SuiteTask, load_suite, locate, missing_message, placeholders
from clip_glofnd.suite_summary import CURVES, SUMMARY_CSV, SUMMARY_MD, format_cell, suite_means, write_summaries

if TYPE_CHECKING:
    from torch import nn


# ---------------------------------------------------------------------------------------------------- running


def _check_resumable(records: dict, keys: list[tuple[str, str, str]], settings: Settings, path: Path) -> None:
    """Results about to be reused must come from the same model, split and precision."""
    for key in keys:
        record = records[key]
        for name in ("model", "split", "precision"):
            if record.get(name) != getattr(settings, name):
                raise UsageError(f"{path} holds {key[1]} for {key[0]} evaluated with {name} {record.get(name)!r}, "
                                 f"not {getattr(settings, name)!r}; pass --overwrite or another --output")


def _evaluate_checkpoint(checkpoint: Checkpoint, tasks: list[SuiteTask], located: Located, settings: Settings,
                         output: Path, records: dict) -> None:
    """Evaluate one checkpoint on `tasks`: per-task JSON, one results.jsonl line each as it finishes."""
    from clip_glofnd.model import create_model
    model, _, preprocess, tokenizer = create_model(settings.model, checkpoint.spec, device=settings.device,
                                                   precision=settings.precision)
    model.eval()
    for task in tasks:
        dataset, start = located.found[task], time.perf_counter()
        metrics = evaluate_dataset(model, preprocess, tokenizer, dataset, device=settings.device,
                                   precision=settings.precision, batch_size=settings.batch_size,
                                   workers=settings.workers)
        name = result_file_name(placeholders(task.name)["dataset"].replace("/", "_"),
                                checkpoint.label.replace("/", "_"), settings.model, task.task)
        result = result_record(task.name, settings.model, checkpoint.spec, task.task, metrics)
        (output / name).write_text(json.dumps(result) + "\n")
        record = make_record(checkpoint, task, dataset, settings, metrics, time.perf_counter() - start)
        with open(output / RESULTS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        records[result_key(record)] = record
        print(f"{checkpoint.label} {task.name}: {task.main_metric} {format_cell(record['main'])} "
              f"({record['seconds']:.1f} s)", flush=True)


def run_suite(located: Located, checkpoints: list[Checkpoint], settings: Settings, output: Path, *,
              overwrite: bool = False) -> dict[tuple[str, str, str], dict]:
    """Evaluate what results.jsonl in `output` does not hold yet (everything with `overwrite`); all results."""
    output.mkdir(parents=True, exist_ok=True)
    records = read_results(output / RESULTS)
    pairs = [(checkpoint, task) for checkpoint in checkpoints for task in located.found]
    done = [(c, t) for c, t in pairs if not overwrite and (c.key, t.name, t.task) in records]
    _check_resumable(records, [(c.key, t.name, t.task) for c, t in done], settings, output / RESULTS)
    print(f"{len(pairs) - len(done)} of {len(pairs)} (checkpoint, task) evaluations to run; {len(done)} already in "
          f"{output / RESULTS}" + (" (pass --overwrite to recompute them)" if done else ""), flush=True)
    for checkpoint in checkpoints:
        todo = [task for c, task in pairs if c is checkpoint and (c, task) not in done]
        if todo:
            _evaluate_checkpoint(checkpoint, todo, located, settings, output, records)
    write_results(output / RESULTS, records)
    return records


# ---------------------------------------------------------------------------------------------------- entry points


def suite_main(args: argparse.Namespace) -> int:
    """`clip-glofnd eval --suite`: locate every data set and checkpoint first, evaluate what is new, summarise."""
    suite = load_suite(args.suite)
    located = locate(suite, args.dataset_root, args.split)
    if located.missing and not args.skip_missing:
        raise UsageError(missing_message(suite, located.missing))
    for task, paths in located.missing.items():
        print(f"missing, left out (--skip-missing): {task.name} (expected {' or '.join(map(str, paths))})")
    checkpoints = expand_checkpoints(args.checkpoint)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(args.model, device, args.precision, args.split, args.batch_size, args.workers)
    output = Path(args.output)
    records = run_suite(located, checkpoints, settings, output, overwrite=args.overwrite)
    print(write_summaries(suite, located, checkpoints, records, output, args.model))
    print(f"wrote {output / RESULTS}, {output / SUMMARY_MD}, {output / SUMMARY_CSV}"
          + (f", {output / CURVES}" if (output / CURVES).is_file() else ""))
    return 0


def check_suite(suite: str, roots: Sequence[str], split: str = "test") -> tuple[Suite, Located]:
    """The suite and its data sets, all found (run before training starts); UsageError listing the missing ones."""
    loaded = load_suite(suite)
    located = locate(loaded, roots, split)
    if located.missing:
        raise UsageError(missing_message(loaded, located.missing))
    return loaded, located


def suite_metrics(model: nn.Module, preprocess: Callable, tokenizer: Callable, suite: str, roots: Sequence[str], *,
                  device: str = "cpu", precision: str = "fp32", split: str = "test", batch_size: int = BATCH_SIZE,
                  workers: int = WORKERS) -> dict[str, float]:
    """Flat metrics of a model in memory (during training): "suite/mean", "suite/group/<group>" and each task's main
    metric "suite/<dataset>/<metric>"; eval mode inside, the previous mode restored."""
    loaded, located = check_suite(suite, roots, split)
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    values: dict[SuiteTask, list[float | None]] = {}
    try:
        for task, dataset in located.found.items():
            metrics = with_mean_recall(evaluate_dataset(model, preprocess, tokenizer, dataset, device=device,
                                                        precision=precision, batch_size=batch_size, workers=workers))
            values[task] = [finite(metrics[task.main_metric])]
    finally:
        model.train(was_training)
    flat = {f"suite/{task.name}/{task.main_metric}": value[0] for task, value in values.items()
            if value[0] is not None}
    for mean in suite_means(loaded, values, 1):
        if mean.values[0] is not None:
            flat["suite/mean" if mean.overall else f"suite/group/{mean.label}"] = mean.values[0]
    return flat
