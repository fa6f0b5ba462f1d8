"""Benchmark suites as files: what a suite is (its YAML), and where its data sets are on disk.

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
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_glofnd.errors import UsageError
from clip_glofnd.eval_data import EvalDataset, open_dataset
from clip_glofnd.evaluate import CLASSIFICATION, RETRIEVAL, main_metric_names

SUITES_DIR = Path(__file__).parent / "resources" / "suites"
DEFAULT_MAIN = {CLASSIFICATION: "acc1", RETRIEVAL: "mean_recall@1"}
_SUITE_KEYS = ("name", "description", "tasks", "not_run")
_TASK_KEYS = ("name", "task", "main_metric", "groups", "path", "title", "official_metric", "note")
_NOT_RUN_KEYS = ("name", "title", "official_metric", "groups", "reason")


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
