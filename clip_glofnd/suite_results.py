"""What a suite run records: the checkpoints it evaluates (one summary column each) and results.jsonl.

results.jsonl holds one object per (checkpoint, dataset, task), appended as each task finishes, so that a rerun skips
what it holds (DataComp's evaluator does the same); a line cut short by a crash is skipped and its task run again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_glofnd.errors import UsageError
from clip_glofnd.eval_data import EvalDataset
from clip_glofnd.evaluate import BATCH_SIZE, WORKERS, pretrained_slug, with_mean_recall
from clip_glofnd.suite_spec import SuiteTask

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


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


def finite(value: Any) -> Any:
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
    metrics = {key: finite(value) for key, value in with_mean_recall(metrics).items()}
    return {"checkpoint": checkpoint.key, "label": checkpoint.label, "epoch": checkpoint.epoch,
            "dataset": task.name, "task": task.task, "metrics": metrics, "main_metric": task.main_metric,
            "main": metrics[task.main_metric], "model": settings.model, "path": str(dataset.root),
            "split": settings.split, "precision": settings.precision, "batch_size": settings.batch_size,
            "workers": settings.workers, "seconds": round(seconds, 2)}
