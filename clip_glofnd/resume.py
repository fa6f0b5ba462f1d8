"""What a resumed run carries over and checks: the lr schedule's position, changed settings, the metrics log.

- The schedule: a run's lr is OpenCLIP's warmup + cosine over `num_batches × epochs` steps. A resume with another
  number of steps per epoch (--batch-size, --train-num-samples, number of processes) or --epochs keeps the position
  the schedule had reached and spreads the rest of it over the steps left, so the lr goes on from where it was
  instead of jumping (back to the peak, or forward).
- Settings that differ from the checkpoint's are listed in a warning; `config.yaml` of the earlier start is kept
  beside the new one (`config.<time>.yaml`).
- metrics.jsonl keeps the records up to the checkpoint's step: the resumed run writes the steps after it again
  (TensorBoard and W&B: report.py).
- A flag that a checkpoint's config lacks (added since) counts at its default; where the run reports (--report-to,
  --wandb-*) is no setting.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clip_glofnd.config import flat_defaults, undump

logger = logging.getLogger(__name__)

# flags whose change on resume is expected (or does not touch the training), not worth a warning
_NOT_SETTINGS = ("resume", "report_to", "tensorboard", "wandb_project_name", "wandb_notes")


def lr_factor(step: float, warmup: int, total: float) -> float:
    """OpenCLIP's cosine schedule as a factor of the base lr: linear warmup (step+1)/warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


@dataclass(frozen=True)
class Schedule:
    """Where the lr schedule stands at step index s = epoch × num_batches + batch: position(s) = start + (s − at) ×
    rate on a warmup + cosine of length `total`. A fresh run has at 0, start 0, rate 1 (position = s)."""

    total: float                   # length of the cosine schedule, in its own steps
    at: int = 0                    # step index where this piece starts
    start: float = 0.0             # schedule position at `at`
    rate: float = 1.0              # schedule steps per training step

    def factor(self, step: int, warmup: int) -> float:
        """lr factor at step index `step`."""
        return lr_factor(self.start + (step - self.at) * self.rate, warmup, self.total)

    def state_dict(self) -> dict[str, float]:
        return asdict(self)


def continue_schedule(saved: dict[str, Any] | None, saved_steps: tuple[int, int] | None, position: tuple[int, int],
                      steps: tuple[int, int]) -> Schedule:
    """The schedule of a run at `position` = (epochs done, batch) with `steps` = (num_batches, epochs), from the one a
    checkpoint saved with its own (num_batches, epochs); the same schedule when those agree (an exact resume)."""
    num_batches, epochs = steps
    if saved is None or saved_steps is None:                      # a fresh run, or a checkpoint without a schedule
        return Schedule(total=num_batches * epochs)
    schedule = Schedule(**saved)
    if tuple(saved_steps) == tuple(steps):
        return schedule
    here = position[0] * num_batches + position[1]
    reached = schedule.start + (position[0] * saved_steps[0] + position[1] - schedule.at) * schedule.rate
    left = num_batches * epochs - here
    rate = (schedule.total - reached) / left if left > 0 else 0.0
    logger.warning("steps per epoch x epochs changed from %d x %d to %d x %d: the lr schedule continues from position "
                   "%.1f of %.0f, spread over the %d steps left", *saved_steps, *steps, reached, schedule.total, left)
    return Schedule(total=schedule.total, at=here, start=reached, rate=rate)


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """"flag old -> new" for every setting (flat config keys) that differs between a checkpoint and this run; a key
    one of them lacks (a flag added or removed since) stands for its default."""
    defaults = flat_defaults()
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in _NOT_SETTINGS]
    old, new = ({k: _plain(values.get(k, defaults.get(k))) for k in keys} for values in (saved, current))
    return [f"--{k.replace('_', '-')} {old[k]!r} -> {new[k]!r}" for k in keys if old[k] != new[k]]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def keep_old_config(path: Path, new_text: str) -> Path | None:
    """Before `path` (config.yaml) is overwritten with other settings (--resume aside): rename it to
    config.<its time>.yaml; returns the new name."""
    if not path.is_file() or _settings(path.read_text()) == _settings(new_text):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    os.replace(path, kept)
    return kept


def _settings(text: str) -> dict[str, Any] | str:
    """The flags of a config.yaml written by config.dump ("key: json" lines), without --resume; the text if it is
    not such a file."""
    try:
        values = undump(text)
    except ValueError:
        return text
    return {key: value for key, value in values.items() if key not in _NOT_SETTINGS}


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of a metrics.jsonl with "step" <= `step` (atomically); returns the number dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def _step_of(line: str) -> float:
    """A record's step; a line that is not a JSON record (a half-written last line) counts as after every step."""
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf
