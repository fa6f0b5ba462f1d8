"""Run logging: JSONL records, λ quantiles of the samples seen, the λ histogram PNG, rank-0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_glofnd.logger import RunLogger, lambda_quantiles, plot_lambda, progress, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_jsonl_one_object_per_line_appended(tmp_path: Path) -> None:
    log = RunLogger(tmp_path)
    log.log({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-3, "note": "x"})
    log.log({"step": 2, "loss": math.nan, "tau": math.inf})
    RunLogger(tmp_path).log({"step": 3})                                       # a resumed run appends
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == read_jsonl(tmp_path / "metrics.jsonl")
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5, "lr": 1e-3, "note": "x"},
                                                      {"step": 2, "loss": None, "tau": None}, {"step": 3}]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    RunLogger(tmp_path, enabled=False, tensorboard=True).log({"step": 1})
    assert not any(tmp_path.iterdir())
    assert list(progress(range(3), total=3, enabled=False, desc="x")) == [0, 1, 2]


def test_lambda_quantiles_only_over_seen_samples() -> None:
    lam = torch.linspace(-1, 1, 101)
    seen = torch.zeros(101, dtype=torch.bool)
    seen[50:] = True
    got = lambda_quantiles(lam, seen, "lam_img_seen")
    want = np.quantile(lam[50:].numpy(), [0.1, 0.5, 0.9])
    assert list(got) == ["lam_img_seen_p10", "lam_img_seen_p50", "lam_img_seen_p90"]
    assert list(got.values()) == pytest.approx(want.tolist(), abs=1e-6)
    assert lambda_quantiles(lam, torch.zeros(101, dtype=torch.bool), "x") == {}


def test_lambda_png_written_for_seen_samples(tmp_path: Path) -> None:
    lam = torch.rand(1000) * 2 - 1
    seen = torch.rand(1000) < 0.3
    plot = plot_lambda(tmp_path / "lambda_epoch_1.png", lam, seen, lam.flip(0), ~seen, title="run: λ after epoch 1")
    assert plot is not None and plot.path.read_bytes()[:8] == PNG_MAGIC and plot.path.stat().st_size > 5000
    assert np.array_equal(plot.img, lam[seen].numpy()) and np.array_equal(plot.txt, lam.flip(0)[~seen].numpy())
    assert set(plot.series()) == {"img", "txt"}
    none = torch.zeros(1000, dtype=torch.bool)
    assert plot_lambda(tmp_path / "empty.png", lam, none, lam, none, title="t") is None
    assert not (tmp_path / "empty.png").exists()


def test_tensorboard_needs_its_package_or_writes_events(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        from clip_glofnd.errors import UsageError
        with pytest.raises(UsageError, match="tensorboard"):
            RunLogger(tmp_path, tensorboard=True)
        return
    log = RunLogger(tmp_path, tensorboard=True)
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.*"))
