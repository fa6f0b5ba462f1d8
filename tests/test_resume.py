"""clip_glofnd.resume: the lr schedule across a resume, changed settings, the kept config, metrics.jsonl cut back.

Oracles: OpenCLIP's cosine_lr for an unchanged run, hand-computed positions for a stretched one, files written here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clip_glofnd.resume import changed_settings, continue_schedule, keep_old_config, lr_factor, truncate_metrics


def factors(schedule, steps: range, warmup: int) -> list[float]:
    return [schedule.factor(s, warmup) for s in steps]


def test_fresh_and_unchanged_schedules_are_open_clips() -> None:
    """Fresh: position = step, as open_clip_train.scheduler.cosine_lr; resumed with the same steps: the same."""
    from open_clip_train.scheduler import cosine_lr
    import torch
    reference = cosine_lr(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 1.0, 5, 40)
    fresh = continue_schedule(None, None, (0, 0), (10, 4))
    assert factors(fresh, range(40), 5) == [reference(s) for s in range(40)]
    resumed = continue_schedule(fresh.state_dict(), (10, 4), (2, 3), (10, 4))
    assert resumed == fresh


@pytest.mark.parametrize("new_batches", [5, 20])          # batch size doubled / halved on resume after 2 of 4 epochs
def test_changed_steps_per_epoch_continue_from_the_same_lr(new_batches: int) -> None:
    """10 steps per epoch, 4 epochs, warmup 5; resumed after epoch 2 with another num_batches: the first resumed step
    has the lr the old run had next (position 20 of 40), the last ends the cosine, no jump in between."""
    old = continue_schedule(None, None, (0, 0), (10, 4))
    new = continue_schedule(old.state_dict(), (10, 4), (2, 0), (new_batches, 4))
    steps = range(2 * new_batches, 4 * new_batches)
    got = factors(new, steps, 5)
    expected = [lr_factor(20 + 20 * k / len(steps), 5, 40) for k in range(len(steps))]   # positions 20 .. 40
    assert got == pytest.approx(expected, abs=1e-12) and got[0] == pytest.approx(old.factor(20, 5), abs=1e-12)
    assert all(a >= b for a, b in zip(got, got[1:])) and got[0] < 1.0
    again = continue_schedule(new.state_dict(), (new_batches, 4), (3, 0), (new_batches, 4))  # a later plain resume
    assert factors(again, steps, 5) == got


def test_more_epochs_stretch_the_rest() -> None:
    old = continue_schedule(None, None, (0, 0), (10, 4))
    new = continue_schedule(old.state_dict(), (10, 4), (3, 0), (10, 6))                   # --epochs 4 -> 6
    assert new.factor(30, 0) == pytest.approx(old.factor(30, 0)) and new.factor(60, 0) == pytest.approx(0.0)


def test_changed_settings_lists_flags() -> None:
    saved = {"batch_size": 64, "lr": 1e-3, "resume": None, "zeroshot_data": ["a"]}
    now = {"batch_size": 32, "lr": 1e-3, "resume": "latest", "zeroshot_data": ("a",)}
    assert changed_settings(saved, now) == ["--batch-size 64 -> 32"]


def test_changed_settings_a_missing_key_is_its_default_and_reporting_is_no_setting() -> None:
    """A checkpoint from before a flag existed lacks its key: at the default that is no change; where the run reports
    (--report-to, W&B project and notes, --tensorboard) does not touch the training."""
    saved = {"batch_size": 64, "tensorboard": True}                      # an old run: no report_to, no fnd_init
    now = {"batch_size": 64, "fnd_init": "one", "report_to": "wandb", "wandb_notes": "x", "fnd_alpha": 0.5}
    assert changed_settings(saved, now) == ["--fnd-alpha 0.001 -> 0.5"]


def test_keep_old_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    assert keep_old_config(path, "a: 1\n") is None                                        # nothing there yet
    path.write_text("a: 1\n")
    assert keep_old_config(path, "a: 1\n") is None and path.read_text() == "a: 1\n"        # same settings
    assert keep_old_config(path, 'a: 1\nresume: "latest"\n') is None                     # --resume is no setting
    kept = keep_old_config(path, "a: 2\n")
    assert kept is not None and kept.read_text() == "a: 1\n" and not path.exists()
    assert kept.name.startswith("config.") and kept.suffix == ".yaml"


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": s} for s in range(1, 7)] + [{"step": 4, "epoch": 1, "epoch_loss": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lo')   # a half-written last line
    assert truncate_metrics(path, 4) == 3                                                   # steps 5, 6, half 7
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in records if r["step"] <= 4]
    assert truncate_metrics(path, 4) == 0 and truncate_metrics(tmp_path / "none.jsonl", 3) == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
