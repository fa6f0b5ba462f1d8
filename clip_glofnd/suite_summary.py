"""Suite summaries: the main metric per task and checkpoint, group means and the overall mean, as summary.md,
summary.csv and (two or more epochs) summary_per_epoch.png; what the means leave out, and why, is said in them.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from clip_glofnd.suite_results import Checkpoint
from clip_glofnd.suite_spec import Located, Suite, SuiteTask

SUMMARY_MD, SUMMARY_CSV, CURVES = "summary.md", "summary.csv", "summary_per_epoch.png"


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


def format_cell(value: float | None) -> str:
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
                     f"{' | '.join(format_cell(v) for v in values[task])} |")
    for entry in suite.not_run:
        title = f"{entry.title} ({entry.name})" if entry.title else entry.name
        lines.append(f"| {title} | not run | {', '.join(entry.groups)} | {' | '.join('–' for _ in checkpoints)} |")
    for mean in means:
        lines.append(f"| **{mean.shown}** | | | {' | '.join(format_cell(v) for v in mean.values)} |")
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
