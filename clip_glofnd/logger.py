"""What a run shows: tqdm progress with samples/s, metrics.jsonl (one JSON object per line), optional TensorBoard
scalars, and a PNG of the λ distributions at each epoch end. Everything here is a no-op on ranks other than 0.

metrics.jsonl is appended to (a resumed run continues it, after cutting it back to the checkpoint's step, so every step
appears once); TensorBoard hides the events after that step the same way (SummaryWriter's purge_step).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from clip_glofnd.errors import UsageError

logger = logging.getLogger(__name__)

QUANTILES = (0.1, 0.5, 0.9)


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors to python numbers, non-finite floats to None."""
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Rank-0 metrics sink: <run_dir>/metrics.jsonl and, with `tensorboard`, <run_dir>/tensorboard/."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False,
                 purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "step"); numbers also go to TensorBoard under their key."""
        if not self.enabled:
            return
        record = {key: _plain(value) for key, value in record.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


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
                title: str) -> Path | None:
    """PNG histogram of λ over the samples seen at least once, image and text anchors; None if nothing seen."""
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
    return path
