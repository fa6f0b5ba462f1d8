"""Zero-shot benchmark suites: many data sets, the means papers report, resumable, several checkpoints, curves.

A suite is a YAML file; packaged ones live in clip_glofnd/resources/suites/ (datacomp, imagenet-variants, retrieval,
digits) and are named by their stem::

    name: my-suite
    tasks:
      - name: wds/vtab/caltech101           # the data set: CLIP_benchmark's name, or a short one
        task: zeroshot_classification       # or zeroshot_retrieval
        main_metric: mean_per_class_recall  # what the means average (default: acc1 / mean_recall@1)
        groups: [VTAB]                      # optional: labels of group means
        path: caltech101                    # optional: the data set's folder, relative to this file
        title: Caltech-101                  # optional: display name
        official_metric: F1-macro_all       # optional: the benchmark's own metric when this tool cannot compute it;
                                            #   the task is then shown under main_metric, out of every mean
        note: ...                           # optional: shown in the summary
    not_run:                                # optional: tasks of the benchmark this tool cannot run at all
      - {name: misc/winogavil, official_metric: jaccard_score_10-12, groups: [Retrieval], reason: ...}

Data sets without `path` are found with `--dataset-root` patterns and CLIP_benchmark's placeholders: {dataset} is the
name without "wds/" (vtab/caltech101), {dataset_cleaned} the same with "/" -> "-" (vtab-caltech101); a pattern
without placeholders is a folder that holds the data sets by {dataset}. With several patterns the first that exists
wins. Every data set is located and opened before any model work, and all missing ones are reported together.

`clip-glofnd eval --suite SUITE --output DIR` evaluates each (checkpoint, task) with clip_glofnd.evaluate, the one
place where metrics are computed, and writes in DIR: the per-task JSON of `clip-glofnd eval`; results.jsonl, one
object per (checkpoint, dataset, task), appended as each task finishes so that a rerun skips what it holds
(DataComp's evaluator does the same; --overwrite recomputes); summary.md and summary.csv (main metric per task, group
means, overall mean; one column per checkpoint); summary_per_epoch.png (each group's mean per epoch) when the
checkpoints carry two or more epochs.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_glofnd.errors import UsageError
from clip_glofnd.evaluate import (BATCH_SIZE, CLASSIFICATION, RETRIEVAL, WORKERS, EvalDataset, evaluate_dataset,
                                  main_metric_names, open_dataset, pretrained_slug, result_file_name, result_record,
                                  with_mean_recall)

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).parent / "resources" / "suites"
RESULTS, SUMMARY_MD, SUMMARY_CSV, CURVES = "results.jsonl", "summary.md", "summary.csv", "summary_per_epoch.png"
DEFAULT_MAIN = {CLASSIFICATION: "acc1", RETRIEVAL: "mean_recall@1"}
_SUITE_KEYS = ("name", "description", "tasks", "not_run")
_TASK_KEYS = ("name", "task", "main_metric", "groups", "path", "title", "official_metric", "note")
_NOT_RUN_KEYS = ("name", "title", "official_metric", "groups", "reason")
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


# ---------------------------------------------------------------------------------------------------- suite files


@dataclass(frozen=True)
class SuiteTask:
    """One (data set, task) of a suite."""

    name: str
    task: str
    main_metric: str
    groups: tuple[str, ...] = ()
    path: Path | None = None
    title: str | None = None
    official_metric: str | None = None
    note: str | None = None

    @property
    def counted(self) -> bool:
        """In the means: the metric computed is the benchmark's own."""
        return self.official_metric in (None, self.main_metric)

    @property
    def shown(self) -> str:
        """Display name: "Title (name)" or the name."""
        return f"{self.title} ({self.name})" if self.title else self.name


@dataclass(frozen=True)
class NotRun:
    """A task of the benchmark this tool cannot run; with an official metric it is part of the benchmark's mean."""

    name: str
    reason: str
    title: str | None = None
    official_metric: str | None = None
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    name: str
    source: Path
    tasks: tuple[SuiteTask, ...]
    not_run: tuple[NotRun, ...] = ()
    description: str = ""

    def groups(self) -> list[str]:
        """Group labels in order of first appearance."""
        return list(dict.fromkeys(g for entry in (*self.tasks, *self.not_run) for g in entry.groups))


def packaged_suites() -> list[str]:
    """Names of the suites shipped in clip_glofnd/resources/suites."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def suite_path(spec: str | Path) -> Path:
    """A suite file: `spec` itself when it is a file, else the packaged suite of that name."""
    if Path(spec).is_file():
        return Path(spec)
    if str(spec) in packaged_suites():
        return SUITES_DIR / f"{spec}.yaml"
    raise UsageError(f"--suite {spec}: neither a file nor a packaged suite ({', '.join(packaged_suites())})")


def _check_keys(entry: dict, allowed: Sequence[str], where: str) -> None:
    """Unknown keys fail, with the closest known one."""
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(allowed)})"
            raise UsageError(f"{where}: unknown key {key!r}{hint}")


def _text(entry: dict, key: str, where: str) -> str | None:
    """An optional non-empty string value."""
    value = entry.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UsageError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _groups(entry: dict, where: str) -> tuple[str, ...]:
    """`groups`: a string or a list of strings."""
    groups = entry.get("groups") or []
    groups = [groups] if isinstance(groups, str) else groups
    if not isinstance(groups, list) or not all(isinstance(g, str) and g.strip() for g in groups):
        raise UsageError(f"{where}: groups must be a list of names, got {entry.get('groups')!r}")
    return tuple(groups)


def _parse_task(entry: Any, source: Path, index: int) -> SuiteTask:
    """One `tasks:` entry, checked."""
    where = f"{source}: tasks[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise UsageError(f"{where}: expected a mapping with a `name` (the data set, e.g. wds/imagenet1k) and a `task`")
    _check_keys(entry, _TASK_KEYS, where)
    where = f"{source}: task {entry['name']!r}"
    task = entry.get("task")
    if task not in (CLASSIFICATION, RETRIEVAL):
        raise UsageError(f"{where}: task must be {CLASSIFICATION} or {RETRIEVAL}, got {task!r}")
    main = entry.get("main_metric", DEFAULT_MAIN[task])
    if main not in main_metric_names(task):
        raise UsageError(f"{where}: main_metric {main!r} is not a {task} metric; choose from "
                         f"{', '.join(main_metric_names(task))}")
    path = _text(entry, "path", where)
    return SuiteTask(entry["name"], task, main, _groups(entry, where), source.parent / path if path else None,
                     _text(entry, "title", where), _text(entry, "official_metric", where), _text(entry, "note", where))


def _parse_not_run(entry: Any, source: Path, index: int) -> NotRun:
    """One `not_run:` entry, checked."""
    where = f"{source}: not_run[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise UsageError(f"{where}: expected a mapping with `name` and `reason`")
    _check_keys(entry, _NOT_RUN_KEYS, where)
    reason = _text(entry, "reason", where)
    if reason is None:
        raise UsageError(f"{where}: `reason` is required (why this tool cannot run {entry['name']!r})")
    return NotRun(entry["name"], reason, _text(entry, "title", where), _text(entry, "official_metric", where),
                  _groups(entry, where))


def load_suite(spec: str | Path) -> Suite:
    """Read and check a suite: a packaged name or a YAML file with `tasks:`."""
    import yaml
    source = suite_path(spec)
    try:
        data = yaml.safe_load(source.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{source}: not valid YAML ({' '.join(str(error).split())[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise UsageError(f"{source}: expected a mapping with a non-empty `tasks:` list of "
                         f"{{name, task, main_metric, groups, path}}")
    _check_keys(data, _SUITE_KEYS, str(source))
    tasks = tuple(_parse_task(entry, source, index) for index, entry in enumerate(data["tasks"]))
    seen: set[tuple[str, str]] = set()
    for task in tasks:
        if (task.name, task.task) in seen:
            raise UsageError(f"{source}: task {task.name!r} ({task.task}) is listed twice")
        seen.add((task.name, task.task))
    not_run = tuple(_parse_not_run(entry, source, index) for index, entry in enumerate(data.get("not_run") or []))
    return Suite(str(data.get("name") or source.stem), source, tasks, not_run, str(data.get("description") or ""))


# ---------------------------------------------------------------------------------------------------- data sets


def placeholders(name: str) -> dict[str, str]:
    """CLIP_benchmark's --dataset_root placeholders for a data set name."""
    dataset = name.removeprefix("wds/")
    return {"dataset": dataset, "dataset_cleaned": dataset.replace("/", "-")}


def candidate_paths(task: SuiteTask, roots: Sequence[str]) -> list[Path]:
    """Where `task`'s data set may be: its `path`, else one path per --dataset-root pattern."""
    if task.path is not None:
        return [task.path]
    paths = []
    for root in roots:
        if "{" not in root:
            paths.append(Path(root) / placeholders(task.name)["dataset"])
            continue
        try:
            paths.append(Path(root.format(**placeholders(task.name))))
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"--dataset-root {root!r}: the placeholders are {{dataset}} and {{dataset_cleaned}} "
                             f"(CLIP_benchmark's)") from None
    return paths


@dataclass
class Located:
    """The suite's data sets: opened ones in suite order, and the missing ones with the paths that were tried."""

    found: dict[SuiteTask, EvalDataset] = field(default_factory=dict)
    missing: dict[SuiteTask, list[Path]] = field(default_factory=dict)


def locate(suite: Suite, roots: Sequence[str], split: str = "test") -> Located:
    """Find and open every data set of `suite` (metadata only; nothing is evaluated)."""
    unplaced = [task.name for task in suite.tasks if task.path is None]
    if unplaced and not roots:
        raise UsageError(f"--dataset-root is needed: {len(unplaced)} tasks of {suite.source} have no `path` (e.g. "
                         f"{unplaced[0]}); e.g. --dataset-root '/data/wds_{{dataset_cleaned}}'")
    located = Located()
    for task in suite.tasks:
        paths = candidate_paths(task, roots)
        path = next((path for path in paths if path.exists()), None)
        if path is None:
            located.missing[task] = paths
            continue
        try:
            dataset = open_dataset(path, split)
        except UsageError as error:
            raise UsageError(f"suite {suite.name}, task {task.name}: {error}") from None
        if (dataset.kind == "classification") != (task.task == CLASSIFICATION):
            raise UsageError(f"{suite.source}: task {task.name!r} is {task.task} but {path} is a {dataset.kind} data "
                             f"set (its dataset_type.txt, missing = classification)")
        located.found[task] = dataset
    return located


def missing_message(suite: Suite, missing: dict[SuiteTask, list[Path]]) -> str:
    """All missing data sets with the paths that were expected (several lines)."""
    lines = [f"{len(missing)} of {len(suite.tasks)} data sets of suite {suite.name} are missing; get them (README, "
             f"Evaluate), point --dataset-root at them, or pass --skip-missing to run the rest:"]
    lines += [f"  {task.name}: expected {' or '.join(map(str, paths))}" for task, paths in missing.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One column of the summary: what create_model loads, its label and its epoch (when known)."""

    spec: str | None      # checkpoint file, OpenCLIP pretrained tag, or None = random init
    label: str
    epoch: int | None = None

    @property
    def key(self) -> str:
        """Identity in results.jsonl: the absolute file path, else the tag or "random-init"."""
        if self.spec and Path(self.spec).is_file():
            return str(Path(self.spec).resolve())
        return self.spec or "random-init"


def _run_checkpoints(folder: Path) -> list[str]:
    """A run folder's checkpoints/epoch_N.pt by N (epoch_latest.pt only when there is no numbered one)."""
    inner = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    numbered = sorted((int(match.group(1)), path) for path in inner.glob("epoch_*.pt")
                      if (match := _EPOCH_FILE.fullmatch(path.name)))
    if numbered:
        return [str(path) for _, path in numbered]
    if (inner / "epoch_latest.pt").is_file():
        return [str(inner / "epoch_latest.pt")]
    raise UsageError(f"--checkpoint {folder}: a folder without checkpoints/epoch_N.pt (a run folder of "
                     f"`clip-glofnd train` holds them)")


def checkpoint_epoch(spec: str) -> int | None:
    """The "epoch" a training checkpoint stores (ours, OpenCLIP's), else N of an epoch_N.pt name, else None."""
    try:
        import torch
        ckpt = torch.load(spec, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(ckpt, dict) and isinstance(ckpt.get("epoch"), int):
            return ckpt["epoch"]
    except Exception:                                                # not a zip checkpoint: fall back to the name
        logger.debug("%s: no readable epoch key", spec)
    match = _EPOCH_FILE.fullmatch(Path(spec).name)
    return int(match.group(1)) if match else None


def _labels(specs: list[str]) -> list[str]:
    """Column labels: file names (or tags); paths relative to their common folder when names repeat."""
    names = [pretrained_slug(spec) for spec in specs]
    if len(set(names)) == len(names):
        return names
    files = {spec: Path(spec).resolve() for spec in specs if Path(spec).is_file()}
    common = Path(os.path.commonpath([path.parent for path in files.values()]))
    return [str(files[spec].relative_to(common)) if spec in files else name for spec, name in zip(specs, names)]


def expand_checkpoints(specs: Sequence[str] | None) -> list[Checkpoint]:
    """--checkpoint values -> columns: files and tags as given, run folders as their epoch_N.pt files."""
    if not specs:
        return [Checkpoint(None, "random-init")]
    files: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files += _run_checkpoints(path)
        elif not path.is_file() and (path.suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in spec):
            raise UsageError(f"--checkpoint {spec}: no such file or run folder")
        else:
            files.append(spec)
    files = list(dict.fromkeys(files))
    return [Checkpoint(spec, label, checkpoint_epoch(spec) if Path(spec).is_file() else None)
            for spec, label in zip(files, _labels(files))]


# ---------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Settings:
    """How a suite is evaluated (stored with each result; a resumed run must use the same model, split, precision)."""

    model: str
    device: str = "cpu"
    precision: str = "fp32"
    split: str = "test"
    batch_size: int = BATCH_SIZE
    workers: int = WORKERS


def _finite(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None (acc5 of a set with fewer than 5 classes is NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def result_key(record: dict) -> tuple[str, str, str]:
    """(checkpoint, dataset, task) of a results.jsonl object."""
    return record["checkpoint"], record["dataset"], record["task"]


def read_results(path: Path) -> dict[tuple[str, str, str], dict]:
    """results.jsonl by (checkpoint, dataset, task), the last line winning; unreadable lines are skipped, said so."""
    records: dict[tuple[str, str, str], dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[result_key(record)] = record
        except (json.JSONDecodeError, KeyError, TypeError):   # e.g. a line cut short by a crash
            logger.warning("%s:%d: not a result line, ignored (its task is evaluated again)", path, number)
    return records


def write_results(path: Path, records: dict[tuple[str, str, str], dict]) -> None:
    """Rewrite results.jsonl with one line per key (atomic: temporary file, then os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records.values()))
    os.replace(tmp, path)


def make_record(checkpoint: Checkpoint, task: SuiteTask, dataset: EvalDataset, settings: Settings,
                metrics: dict[str, float], seconds: float) -> dict:
    """One results.jsonl object."""
    metrics = {key: _finite(value) for key, value in with_mean_recall(metrics).items()}
    return {"checkpoint": checkpoint.key, "label": checkpoint.label, "epoch": checkpoint.epoch,
            "dataset": task.name, "task": task.task, "metrics": metrics, "main_metric": task.main_metric,
            "main": metrics[task.main_metric], "model": settings.model, "path": str(dataset.root),
            "split": settings.split, "precision": settings.precision, "batch_size": settings.batch_size,
            "workers": settings.workers, "seconds": round(seconds, 2)}


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
        print(f"{checkpoint.label} {task.name}: {task.main_metric} {_cell(record['main'])} "
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


# ---------------------------------------------------------------------------------------------------- summaries


@dataclass
class Mean:
    """A group's (or the suite's) mean per checkpoint, over `counted` of the benchmark's `total` tasks."""

    label: str                      # the group, or "mean" for the overall mean
    values: list[float | None]
    counted: int
    total: int
    overall: bool = False

    @property
    def shown(self) -> str:
        """"mean: VTAB (13 tasks)", "mean (33 of 38 tasks)"."""
        of = f"{self.counted} of {self.total}" if self.counted != self.total else f"{self.total}"
        return f"{'mean' if self.overall else 'mean: ' + self.label} ({of} task{'s' if self.total != 1 else ''})"


def task_value(records: dict, checkpoint: Checkpoint, task: SuiteTask) -> float | None:
    """`task`'s main metric for `checkpoint` from the results (None when absent or not a number)."""
    record = records.get((checkpoint.key, task.name, task.task))
    value = None if record is None else record["metrics"].get(task.main_metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mean(values: list[float]) -> float | None:
    """Plain mean (DataComp's np.mean of the main metrics); None for no values."""
    return sum(values) / len(values) if values else None


def suite_means(suite: Suite, values: dict[SuiteTask, list[float | None]], n_columns: int) -> list[Mean]:
    """Mean per group, then overall: counted tasks with a value only (stand-ins, missing and not-run tasks out)."""
    means = []
    for label in [*suite.groups(), None]:
        members = [task for task in suite.tasks if label is None or label in task.groups]
        others = [entry for entry in suite.not_run if entry.official_metric and (label is None or label in
                                                                                 entry.groups)]
        columns = [[values[task][column] for task in members if task.counted and values[task][column] is not None]
                   for column in range(n_columns)]
        means.append(Mean(label or "mean", [_mean(column) for column in columns],
                          max(map(len, columns), default=0), len(members) + len(others), overall=label is None))
    return means


def _cell(value: float | None) -> str:
    """Four decimals, or "–" for no value."""
    return "–" if value is None else f"{value:.4f}"


def _status(task: SuiteTask, located: Located) -> str:
    """Why a task is out of the means, if it is."""
    if task in located.missing:
        return "missing"
    return "" if task.counted else f"stand-in for {task.official_metric}"


def summary_markdown(suite: Suite, located: Located, checkpoints: list[Checkpoint],
                     values: dict[SuiteTask, list[float | None]], means: list[Mean], model: str) -> str:
    """summary.md: a table of main metrics and means, then what is left out of the means and why."""
    head = f"| task | main metric | groups | {' | '.join(c.label for c in checkpoints)} |"
    lines = [f"# Suite {suite.name}: {model}", "", suite.description.strip(), "", head,
             "|" + "---|" * (3 + len(checkpoints))]
    for task in suite.tasks:
        status = _status(task, located)
        metric = task.main_metric + (f" ({status})" if status else "")
        lines.append(f"| {task.shown} | {metric} | {', '.join(task.groups)} | "
                     f"{' | '.join(_cell(v) for v in values[task])} |")
    for entry in suite.not_run:
        title = f"{entry.title} ({entry.name})" if entry.title else entry.name
        lines.append(f"| {title} | not run | {', '.join(entry.groups)} | {' | '.join('–' for _ in checkpoints)} |")
    for mean in means:
        lines.append(f"| **{mean.shown}** | | | {' | '.join(_cell(v) for v in mean.values)} |")
    return "\n".join(lines + [""] + _footnotes(suite, located)) + "\n"


def _footnotes(suite: Suite, located: Located) -> list[str]:
    """Markdown bullets: what the means leave out and why, and the suite's notes."""
    lines = ["Means average the main metric of the tasks that have one; they leave out:"]
    lines += [f"- {task.shown}: missing (expected {' or '.join(map(str, paths))})"
              for task, paths in located.missing.items()]
    lines += [f"- {task.shown}: the benchmark's metric is {task.official_metric}, which this tool does not compute "
              f"(see the notes); shown is {task.main_metric}, under its own name" for task in suite.tasks
              if not task.counted]
    lines += [f"- {entry.title or entry.name}: not run ({entry.reason})" for entry in suite.not_run]
    if len(lines) == 1:
        lines[0] = "Means average the main metric of every task."
    notes = [f"- {task.shown}: {task.note.strip()}" for task in suite.tasks if task.note]
    return lines + (["", "Notes:", *notes] if notes else [])


def summary_csv(suite: Suite, located: Located, checkpoints: list[Checkpoint],
                values: dict[SuiteTask, list[float | None]], means: list[Mean]) -> str:
    """summary.csv: one row per task, not-run task, group mean and the overall mean; one column per checkpoint."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "dataset", "title", "task", "main_metric", "groups", "in_means", "status",
                     *(c.label for c in checkpoints)])
    for task in suite.tasks:
        status = _status(task, located)
        writer.writerow(["task", task.name, task.title or "", task.task, task.main_metric, ";".join(task.groups),
                         int(not status), status, *("" if v is None else repr(v) for v in values[task])])
    for entry in suite.not_run:
        writer.writerow(["not_run", entry.name, entry.title or "", "", entry.official_metric or "",
                         ";".join(entry.groups), 0, f"not run: {entry.reason}", *("" for _ in checkpoints)])
    for mean in means:
        writer.writerow(["mean" if mean.overall else "group_mean", "" if mean.overall else mean.label, "", "", "", "",
                         "", f"{mean.counted} of {mean.total} tasks", *("" if v is None else repr(v) for v in
                                                                         mean.values)])
    return buffer.getvalue()


def plot_means(path: Path, checkpoints: list[Checkpoint], means: list[Mean], title: str) -> Path | None:
    """PNG of each group's mean (and the overall mean) per epoch; None unless two or more epochs are known."""
    points = [(c.epoch, column) for column, c in enumerate(checkpoints) if c.epoch is not None]
    if len({epoch for epoch, _ in points}) < 2:
        return None
    from matplotlib.figure import Figure                                   # Agg canvas, no pyplot global state
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    for mean in means:
        xy = sorted((epoch, mean.values[column]) for epoch, column in points if mean.values[column] is not None)
        if xy:
            ax.plot(*zip(*xy), marker="o", linewidth=2.5 if mean.overall else 1.5, label=mean.shown)
    ax.set(title=title, xlabel="epoch", ylabel="mean of main metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_summaries(suite: Suite, located: Located, checkpoints: list[Checkpoint], records: dict, output: Path,
                    model: str) -> str:
    """summary.md, summary.csv and (several epochs) summary_per_epoch.png in `output`; returns the markdown."""
    values = {task: [task_value(records, c, task) for c in checkpoints] for task in suite.tasks}
    means = suite_means(suite, values, len(checkpoints))
    markdown = summary_markdown(suite, located, checkpoints, values, means, model)
    (output / SUMMARY_MD).write_text(markdown)
    (output / SUMMARY_CSV).write_text(summary_csv(suite, located, checkpoints, values, means))
    plot_means(output / CURVES, checkpoints, means, f"suite {suite.name}: {model}")
    return markdown


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
            values[task] = [_finite(metrics[task.main_metric])]
    finally:
        model.train(was_training)
    flat = {f"suite/{task.name}/{task.main_metric}": value[0] for task, value in values.items()
            if value[0] is not None}
    for mean in suite_means(loaded, values, 1):
        if mean.values[0] is not None:
            flat["suite/mean" if mean.overall else f"suite/group/{mean.label}"] = mean.values[0]
    return flat
