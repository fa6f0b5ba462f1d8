"""`--report-to tensorboard,wandb`, offline: what TensorBoard's event files and W&B's offline run hold, read back with
TensorBoard's own EventAccumulator and by decoding W&B's run file (LevelDB log format of wandb.proto Records), against
the records logged and metrics.jsonl."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clip_glofnd import cli
from clip_glofnd.errors import UsageError
from clip_glofnd.logger import RunLogger, plot_lambda, read_jsonl

wandb = pytest.importorskip("wandb")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

MICRO = {"embed_dim": 16,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and nothing outside tmp_path: W&B offline and quiet, its settings and caches in tmp_path."""
    for key in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    for key in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{key}_DIR", str(tmp_path / "wandb-home" / key.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


# ------------------------------------------------------------------------------------------------ readers (oracles)
def wandb_records(path: Path) -> list[Any]:
    """The wandb.proto Records of a run-*.wandb file: a ":W&B" header (magic 0xBEE1, version), then LevelDB's log
    format: 32 KiB blocks of chunks (crc32c u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, parts, records = 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:                                       # block trailer: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wandb_runs(folder: Path) -> list[dict[str, Any]]:
    """Every offline run under `folder`/wandb, in the order they started: id, project, name, notes, config and the
    history rows {key: value} (media as dicts: histograms {"_type", "bins", "values"}, images {"_type", "path",
    ...})."""
    runs = []
    for path in (folder / "wandb").glob("offline-run-*/run-*.wandb"):
        run: dict[str, Any] = {"config": {}, "history": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info = record.run
                run.update(id=info.run_id, project=info.project, name=info.display_name, notes=info.notes,
                           start=info.start_time.ToNanoseconds())
                run["config"].update({item.key: json.loads(item.value_json) for item in info.config.update})
            elif kind == "config":
                run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                run["history"].append(_history_row(record.history.item))
        runs.append(run)
    return sorted(runs, key=lambda run: run["start"])


def _history_row(items: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for item in items:
        *parents, leaf = [item.key] if item.key else item.nested_key
        value = json.loads(item.value_json)
        if parents:                                                        # media: {"_type", ...} per field
            row.setdefault("/".join(parents), {})[leaf] = value
        else:
            row[leaf] = value
    return row


def tensorboard_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0,
                                                                          "images": 0, "tensors": 0})
    events.Reload()
    return events


def tb_scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}


def per_step(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """What --report-to must show of metrics.jsonl records: per step, the numbers (but the step), a later record's
    value over an earlier one's (a step record's "epoch" counts the epochs done before it, the epoch-end record at
    the same step one more)."""
    out: dict[int, dict[str, float]] = {}
    for record in records:
        out.setdefault(record["step"], {}).update({k: v for k, v in record.items()
                                                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and k != "step"})
    return out


def lambda_plot(path: Path, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(500, generator=g) * 2 - 1
    seen = torch.rand(500, generator=g) < 0.4
    return plot_lambda(path, lam, seen, lam.flip(0), ~seen, title="λ")


# -------------------------------------------------------------------------------------------------------- units
def test_tensorboard_gets_scalars_lambda_and_config(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, report_to=["tensorboard"], config={"lr": 0.001, "fnd": "glofnd"})
    log.log({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-3, "note": "text", "nonfinite": 0, "tau": float("nan")})
    plot = lambda_plot(tmp_path / "lambda_epoch_1.png")
    log.log({"step": 2, "epoch": 1, "epoch_loss": 2.0, "lambda_png": plot})
    log.close()
    events = tensorboard_events(tmp_path)
    assert tb_scalars(events, "loss") == {1: 2.5} and tb_scalars(events, "lr") == {1: pytest.approx(1e-3)}
    assert tb_scalars(events, "nonfinite") == {1: 0.0} and tb_scalars(events, "epoch_loss") == {2: 2.0}
    assert "tau" not in events.Tags()["scalars"] and "note" not in events.Tags()["scalars"]   # null / text: jsonl only
    for name, values in (("img", plot.img), ("txt", plot.txt)):
        (histogram,) = events.Histograms(f"lambda/{name}")
        assert histogram.step == 2 and histogram.histogram_value.num == values.size
        assert histogram.histogram_value.sum == pytest.approx(float(values.astype(np.float64).sum()), rel=1e-5)
    (image,) = events.Images("lambda/plot")
    assert image.step == 2 and (image.width, image.height) == (600, 360)
    (text,) = events.Tensors("config/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| --lr | 0.001 |" in table and '| --fnd | "glofnd" |' in table
    assert read_jsonl(tmp_path / "metrics.jsonl")[1]["lambda_png"] == "lambda_epoch_1.png"


def test_wandb_offline_history_config_and_resume(tmp_path: Path) -> None:
    """Steps at their step, only the numbers, λ as histograms + image; a resume continues the same run id and sends
    only the steps W&B does not hold; wandb.json names the last step W&B surely holds (during the run: the one before
    the current, whose row W&B completes only when a later step comes or the run finishes)."""
    options = {"project": "proj", "notes": "first try"}
    log = RunLogger(tmp_path, report_to=["wandb"], config={"lr": 0.001}, wandb=options)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step, "note": "text"})
    log.log({"step": 3, "epoch": 1, "lambda_png": lambda_plot(tmp_path / "l.png")})    # joins step 3's row
    log.close()
    info = json.loads((tmp_path / "wandb.json").read_text())
    assert info["step"] == 3

    log = RunLogger(tmp_path, report_to=["wandb"], config={"lr": 0.002}, wandb=options, resumed=True)
    for step in (2, 3, 4, 5):                                              # resumed from step 1's checkpoint
        log.log({"step": step, "loss": 10.0 * step})
    assert json.loads((tmp_path / "wandb.json").read_text()) == {"id": info["id"], "step": 4}   # if killed now
    log.close()
    assert json.loads((tmp_path / "wandb.json").read_text()) == {"id": info["id"], "step": 5}
    log = RunLogger(tmp_path, report_to=["wandb"], wandb=options)         # a fresh start: a new W&B run
    log.close()

    first, second, fresh = wandb_runs(tmp_path)
    assert first["id"] == second["id"] == info["id"] != fresh["id"]
    assert (first["project"], first["name"], first["notes"]) == ("proj", tmp_path.name, "first try")
    assert first["config"]["lr"] == 0.001 and second["config"]["lr"] == 0.002
    assert [row["_step"] for row in first["history"]] == [1, 2, 3]
    assert [row["loss"] for row in first["history"]] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert not any("note" in row for row in first["history"])
    last = first["history"][-1]
    assert last["epoch"] == 1 and last["lambda/plot"]["_type"] == "image-file"
    assert sum(last["lambda/img"]["values"]) + sum(last["lambda/txt"]["values"]) == 500
    assert [(row["_step"], row["loss"]) for row in second["history"]] == [(4, 40.0), (5, 50.0)]


def test_missing_package_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)                        # as if not installed
    with pytest.raises(UsageError, match=r"--report-to wandb needs the wandb package: pip install -e '\.\[wandb\]'"):
        RunLogger(tmp_path, report_to=["wandb"])
    assert cli.main(["train", "--train-data", str(tmp_path / "x.tar"), "--report-to", "all", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[wandb]'" in err[0] and "wandb extra" in err[0]
    RunLogger(tmp_path, report_to=["wandb"], enabled=False).log({"step": 1})   # other ranks need nothing


# -------------------------------------------------------------------------------------------------- end to end
def test_train_reports_to_both_and_resume_sends_no_step_twice(digits_dir: Path, tmp_path: Path) -> None:
    """2 epochs × 2 steps with GloFND, --log-every-n-steps 3; then the last checkpoints are lost, --resume latest
    starts again from step 2 with --epochs 3 (steps 3..6): TensorBoard and metrics.jsonl hold each step once, the
    second start's values after step 2; W&B holds the first start's steps 2..4 and the second's step 6 in the same
    run; nothing logged on the steps in between (1, 5)."""
    model = tmp_path / "micro.json"
    model.write_text(json.dumps(MICRO))
    logs, run = tmp_path / "logs", tmp_path / "logs" / "run"
    args = ["train", "--train-data", str(digits_dir / "train" / "{00000..00011}.tar"), "--train-num-samples", "64",
            "--model", str(model), "--batch-size", "32", "--lr", "1e-3", "--warmup", "1", "--workers", "0",
            "--logs", str(logs), "--name", "run", "--fnd", "glofnd", "--fnd-alpha", "0.05", "--log-every-n-steps", "3",
            "--report-to", "all", "--wandb-project-name", "glofnd-tests", "--wandb-notes", "offline test"]
    assert cli.main([*args, "--epochs", "2"]) == 0
    first = read_jsonl(run / "metrics.jsonl")
    for lost in ("epoch_latest.pt", "epoch_2.pt"):
        (run / "checkpoints" / lost).unlink()
    assert cli.main([*args, "--epochs", "3", "--resume", "latest"]) == 0
    final = read_jsonl(run / "metrics.jsonl")
    assert sorted({r["step"] for r in first}) == [2, 3, 4] and sorted({r["step"] for r in final}) == [2, 3, 4, 6]

    events = tensorboard_events(run)
    for step, values in per_step(final).items():
        assert {key: tb_scalars(events, key)[step] for key in values} == pytest.approx(values, rel=1e-6), step
    assert sorted(tb_scalars(events, "loss")) == [2, 3, 4, 6]              # every 3rd step and each epoch's last
    assert sorted(tb_scalars(events, "epoch_loss")) == [2, 4, 6]
    assert [e.step for e in events.Images("lambda/plot")] == [2, 4, 6]

    one, two = wandb_runs(run)
    info = json.loads((run / "wandb.json").read_text())
    assert one["id"] == two["id"] == info["id"] and info["step"] == 6
    assert (one["project"], one["name"], one["notes"]) == ("glofnd-tests", "run", "offline test")
    assert one["config"]["report_to"] == "all" and one["config"]["fnd"] == "glofnd" and two["config"]["epochs"] == 3
    for segment, records in ((one, first), (two, [r for r in final if r["step"] > 4])):
        rows = {row["_step"]: row for row in segment["history"]}
        want = per_step(records)
        assert sorted(rows) == sorted(want)
        for step, values in want.items():
            assert {k: rows[step][k] for k in values} == pytest.approx(values, rel=1e-6), step
            if "epoch_time" in values:
                assert rows[step]["lambda/plot"]["_type"] == "image-file" and "values" in rows[step]["lambda/img"]
