"""What a run shows: tqdm progress with samples/s, metrics.jsonl (one JSON object per line), a PNG of the λ
distributions at each epoch end, and with --report-to the same records in TensorBoard and / or W&B (report.py).
Everything here is a no-op on ranks other than 0.

metrics.jsonl is appended to (a resumed run continues it, after cutting it back to the checkpoint's step, so every step
appears once); TensorBoard hides the events after that step the same way (SummaryWriter's purge_step), W&B keeps the
steps it holds (report.py says why).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from clip_glofnd import report
from clip_glofnd.report import LambdaPlot

if TYPE_CHECKING:
    from clip_glofnd.config import TrainConfig

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors to python numbers, non-finite floats to None, a λ plot to its file name."""
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, LambdaPlot):
        return value.path.name
    return value


def _is_number(key: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"


class RunLogger:
    """Rank-0 metrics sink: <run_dir>/metrics.jsonl, and the `report_to` sinks (report.py): "tensorboard"
    (<run_dir>/tensorboard/) and "wandb" (`wandb` = {"name", "project", "notes"} for wandb.init)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, report_to: Iterable[str] = (),
                 tensorboard: bool = False, purge_step: int | None = None, config: dict[str, Any] | None = None,
                 wandb: dict[str, Any] | None = None, resumed: bool = False, step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sinks: list[report.TensorBoardSink | report.WandbSink] = []
        reporters = set(report_to) | ({"tensorboard"} if tensorboard else set())
        if not enabled:
            return
        report.check_installed(reporters)
        if "tensorboard" in reporters:
            self.sinks.append(report.TensorBoardSink(Path(run_dir), purge_step=purge_step, config=config, step=step))
        if "wandb" in reporters:
            options = {"name": Path(run_dir).name, "project": "clip-glofnd", "notes": None, **(wandb or {})}
            self.sinks.append(report.WandbSink(Path(run_dir), config=config, resumed=resumed, **options))

    @classmethod
    def for_run(cls, run_dir: str | Path, cfg: TrainConfig, *, enabled: bool, step: int, resumed: bool
                ) -> RunLogger:
        """The trainer's logger: --report-to, --wandb-project-name, --wandb-notes and the flags as config, for a run
        that starts at `step` (`resumed`: from a checkpoint; W&B then continues this folder's run). TensorBoard
        hides events after `step` that an earlier start of the folder wrote."""
        from clip_glofnd.config import to_flat
        run = cfg.run
        return cls(run_dir, enabled=enabled, report_to=run.reporters, purge_step=step + 1, config=to_flat(cfg),
                   wandb={"name": run.name or Path(run_dir).name, "project": run.wandb_project_name,
                          "notes": run.wandb_notes}, resumed=resumed, step=step)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "step"); its numbers (and λ plot) also go to the --report-to sinks under
        their key, at its step."""
        if not self.enabled:
            return
        plots = [value for value in record.values() if isinstance(value, LambdaPlot)]
        record = {key: _plain(value) for key, value in record.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {key: value for key, value in record.items() if _is_number(key, value)}
        for sink in self.sinks:
            sink.log(record["step"], scalars, plots)

    def close(self) -> None:
        """Flush TensorBoard, finish the W&B run."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress(iterable: Iterable, *, total: int, enabled: bool, desc: str) -> Iterator:
    """tqdm over `iterable` on rank 0 (plain iteration elsewhere); postfix set by the caller."""
    if not enabled:
        return iter(iterable)
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, mininterval=1.0)


def lambda_quantiles(lam: Tensor, seen: Tensor, prefix: str, quantiles: Sequence[float] = QUANTILES
                     ) -> dict[str, float]:
    """{f"{prefix}_p10": ..., ...}: quantiles of λ over the rows marked `seen` (bool [n]); empty when none."""
    values = lam[seen].float()
    if values.numel() == 0:
        return {}
    if values.numel() > 1 << 24:                                           # torch.quantile's input limit
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1 << 24]]
    q = torch.quantile(values, torch.tensor(quantiles, dtype=torch.float32, device=values.device)).tolist()
    return {f"{prefix}_p{round(p * 100)}": v for p, v in zip(quantiles, q)}


def plot_lambda(path: str | Path, lam_img: Tensor, seen_img: Tensor, lam_txt: Tensor, seen_txt: Tensor, *,
                title: str) -> LambdaPlot | None:
    """PNG histogram of λ over the samples seen at least once, image and text anchors (and those values); None if
    nothing was seen."""
    from matplotlib.figure import Figure                                   # Agg canvas, no pyplot global state
    series = [(name, lam[seen].float().cpu().numpy()) for name, lam, seen in
              (("image anchors", lam_img, seen_img), ("text anchors", lam_txt, seen_txt))]
    if all(values.size == 0 for _, values in series):
        return None
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    for name, values in series:
        if values.size:
            ax.hist(values, bins=100, range=(-1.0, 1.0), alpha=0.55, label=f"{name} (n={values.size:,}, "
                                                                              f"median {float(np.median(values)):.3f})")
    ax.set(title=title, xlabel="threshold λ (cosine similarity)", ylabel="samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return LambdaPlot(path, series[0][1], series[1][1])
