"""`--report-to tensorboard,wandb`: the run's records in TensorBoard and Weights & Biases, as OpenCLIP's trainer has
them, beside metrics.jsonl (logger.RunLogger calls these sinks on rank 0, on the steps it logs).

Both get the numbers of every record under the record's own keys (metrics.jsonl's names), at its "step"; the λ
histograms of image and text anchors and the λ plot at each epoch's end; the flat config (the flags).

Resuming (`--resume latest`, or a checkpoint of the same run folder) continues the same W&B run: its id is kept in
<run_dir>/wandb.json, with the last step W&B surely holds (a row is complete once a later step is logged). A run
killed at step K and resumed from the checkpoint at step S < K writes steps S+1..K again; metrics.jsonl is cut back
to S first and TensorBoard hides its events after S (purge_step), but W&B's steps must increase, so those steps are
not sent again: W&B keeps the killed run's points for them (the same numbers, as a resume continues bit for bit on
the CPU) and gets new points from K+1 on. W&B's rewind (wandb.init(resume_from="ID?_step=S")), which would cut the
run back, is a private preview that servers refuse unless enabled, so it is not used.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_glofnd.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}         # reporter -> its package (and our extra's name)
LAMBDA = "lambda"                  # λ charts: lambda/img and lambda/txt (histograms), lambda/plot (the PNG)


@dataclass(frozen=True)
class LambdaPlot:
    """A λ histogram PNG (plot_lambda) and the λ values it shows: in a log record, metrics.jsonl gets the file name,
    TensorBoard and W&B the image and the histograms."""

    path: Path
    img: np.ndarray                        # λ of the image anchors seen at least once
    txt: np.ndarray                        # ... of the text anchors

    def series(self) -> dict[str, np.ndarray]:
        """{"img": ..., "txt": ...}, the modalities with values."""
        return {name: values for name, values in (("img", self.img), ("txt", self.txt)) if values.size}


def check_installed(reporters: Iterable[str]) -> None:
    """UsageError naming the extra to install for the first reporter whose package is missing (no import)."""
    for name in sorted(reporters):
        if importlib.util.find_spec(EXTRAS[name]) is None:
            raise UsageError(f"--report-to {name} needs the {EXTRAS[name]} package: pip install -e '.[{EXTRAS[name]}]' "
                             f"in the clip_glofnd checkout (its {EXTRAS[name]} extra)")


def _png_pixels(path: Path) -> np.ndarray:
    """The RGB pixels [H, W, 3] (uint8) of a PNG file."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardSink:
    """<run_dir>/tensorboard/: scalars, λ histograms and plot, the config as a text table."""

    def __init__(self, run_dir: Path, *, purge_step: int | None, config: dict[str, Any] | None, step: int) -> None:
        check_installed(["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        if config:
            rows = "\n".join(f"| --{key.replace('_', '-')} | {json.dumps(value)} |" for key, value in config.items())
            self.writer.add_text("config", f"| flag | value |\n|---|---|\n{rows}", step)

    def log(self, step: int, scalars: dict[str, float], plots: list[LambdaPlot]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for plot in plots:
            for name, values in plot.series().items():
                self.writer.add_histogram(f"{LAMBDA}/{name}", values, step)
            self.writer.add_image(f"{LAMBDA}/plot", _png_pixels(plot.path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run folder: wandb.init as OpenCLIP calls it (project, name, notes, config = the flags), its id
    and the last step W&B holds in <run_dir>/wandb.json; W&B's own files go to <run_dir>/wandb/ unless WANDB_DIR
    says otherwise."""

    def __init__(self, run_dir: Path, *, name: str, project: str, notes: str | None, config: dict[str, Any] | None,
                 resumed: bool) -> None:
        check_installed(["wandb"])
        import wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.info = run_dir / "wandb.json"
        earlier = _read_info(self.info) if resumed else None
        self.id = earlier["id"] if earlier else _new_id()
        self.run = wandb.init(project=project, name=name, id=self.id, notes=notes, tags=[], resume="allow",
                              config=config, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                              reinit="finish_previous")
        # steps W&B holds already (from the runs before this resume): not sent again
        self.held = max(earlier["step"] if earlier else -1, self.run.step - 1)
        self.pending = self.held
        self._save(self.held)

    def log(self, step: int, scalars: dict[str, float], plots: list[LambdaPlot]) -> None:
        if step <= self.held:
            return
        import wandb
        media: dict[str, Any] = {}
        for plot in plots:
            media[f"{LAMBDA}/plot"] = wandb.Image(str(plot.path))
            media.update({f"{LAMBDA}/{name}": wandb.Histogram(values) for name, values in plot.series().items()})
        if step > self.pending:                          # W&B completes the row of the step before
            self._save(self.pending)
            self.pending = step
        self.run.log({**scalars, **media}, step=step)

    def close(self) -> None:
        self.run.finish()
        self._save(self.pending)

    def _save(self, step: int) -> None:
        tmp = self.info.with_name(f".{self.info.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"id": self.id, "step": step}) + "\n")
        os.replace(tmp, self.info)


def _new_id() -> str:
    """A W&B run id as wandb makes them: 8 random lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_info(path: Path) -> dict[str, Any] | None:
    """{"id", "step"} of an earlier W&B run of this folder, None if there is none (or the file is unreadable)."""
    try:
        info = json.loads(path.read_text())
        return {"id": str(info["id"]), "step": int(info["step"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
