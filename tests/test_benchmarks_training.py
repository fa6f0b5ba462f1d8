"""The training benchmarks (throughput vs OpenCLIP, reproduce_digits) run in their --quick form and write JSON with
the documented structure and sane values; their parsers and scorers agree with hand-computed cases."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                          # `benchmarks` lives at the repository root, not in the package
    sys.path.insert(0, str(ROOT))

from benchmarks import reproduce_digits, throughput  # noqa: E402

MACHINE_KEYS = {"cpu_count", "torch_threads", "torch_version", "loadavg_1min_start", "loadavg_1min_end", "under_load"}


# ------------------------------------------------------------------------------------------------ throughput
OPENCLIP_LINE = ("2026-11-25,14:52:32 | INFO | Train Epoch: {epoch} [{seen:>3}/640 ({pct}%)] Data (t): 0.010 "
                 "Batch (t): {t}, {rate}/s, {rate}/s/gpu LR: 0.000020 Logit Scale: 14.286 Contrastive_loss: 4.3045 "
                 "(4.3045) Loss: 4.3045 (4.3045)")
OPENCLIP_LOG = "\n".join([                          # OpenCLIP 3.3.0's line format, --log-every-n-steps 1
    OPENCLIP_LINE.format(epoch=0, seen=64, pct=10, t="2.382", rate="26.8712"),
    OPENCLIP_LINE.format(epoch=0, seen=128, pct=20, t="1.456", rate="43.9653"),
    OPENCLIP_LINE.format(epoch=1, seen=512, pct=80, t="0.595", rate="107.494"),
    "2026-11-25,14:52:42 | INFO | Start epoch 2"])


def test_openclip_log_parser_reads_each_step_rate() -> None:
    steps = throughput.openclip_steps(OPENCLIP_LOG, batch_size=64)
    assert [n for n, _ in steps] == [64, 64, 64]
    assert [s for _, s in steps] == pytest.approx([64 / 26.8712, 64 / 43.9653, 64 / 107.494])
    assert [s for _, s in steps] == pytest.approx([2.382, 1.456, 0.595], abs=1e-3)   # the 3-decimal "Batch (t)"


def test_ours_step_parser_uses_data_plus_step_time(tmp_path: Path) -> None:
    records = [{"step": 1, "epoch": 0, "loss": 4.1, "step_time": 0.5, "data_time": 0.1, "samples_per_s": 64 / 0.6},
               {"step": 2, "epoch": 0, "loss": 4.0, "step_time": 0.2, "data_time": 0.05, "samples_per_s": 28 / 0.25},
               {"step": 2, "epoch": 1, "epoch_time": 3.0, "epoch_loss": 4.05}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert throughput.ours_steps(path) == [(64, pytest.approx(0.6)), (28, pytest.approx(0.25))]


def test_run_order_alternates() -> None:
    assert throughput.run_order(0) == throughput.TRAINERS
    assert throughput.run_order(1) == throughput.TRAINERS[::-1]


@pytest.fixture(scope="module")
def throughput_result(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    assert throughput.main(["--quick", "--data", str(digits_dir), "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_quick_structure_and_values(throughput_result: dict) -> None:
    r = throughput_result
    assert r["benchmark"] == "throughput" and MACHINE_KEYS <= set(r["machine"])
    assert shlex.split(r["command"])[:3] == ["python", "-m", "benchmarks.throughput"] and "--quick" in r["command"]
    assert [run["trainer"] for run in r["runs"]] == list(throughput.TRAINERS)          # 1 repeat, forward order
    settings = r["settings"]
    for run in r["runs"]:
        assert "--precision fp32" in run["command"] and f"--batch-size {settings['batch_size']}" in run["command"]
        assert "--device cpu" in run["command"] and "--model clip-tiny" in run["command"]
        assert run["steps_logged"] == settings["train_num_samples"] // settings["batch_size"]   # 256 / 32 = 8
        assert run["steps_counted"] == run["steps_logged"] - settings["skip_steps"]
        assert run["samples_counted"] == run["steps_counted"] * settings["batch_size"]
        assert 0 < run["samples_per_s"] < 1e5 and 0 < run["step_seconds_counted"] < run["wall_s"]
        assert run["samples_per_s"] == pytest.approx(run["samples_counted"] / run["step_seconds_counted"])
    assert "open_clip_train.main" in r["runs"][0]["command"] and "--fnd glofnd" in r["runs"][2]["command"]
    summary, ratios = r["summary"], r["ratios"]
    assert ratios["ours_glofnd_vs_openclip"] == pytest.approx(summary["ours_glofnd"]["samples_per_s"]
                                                              / summary["openclip"]["samples_per_s"])
    assert r["targets"]["met"] == (ratios["ours_glofnd_vs_openclip"] >= 1.0)


# ------------------------------------------------------------------------------------------ reproduce_digits
def _step(epoch: int, true: int, false: int, present: int) -> dict:
    return {"epoch": epoch, **{f"fn_true_{m}": true for m in "img txt".split()},
            **{f"fn_false_{m}": false for m in "img txt".split()},
            **{f"fn_present_{m}": present for m in "img txt".split()}}


def test_fn_scores_pool_counts_before_dividing() -> None:
    steps = [_step(0, 3, 1, 6), _step(1, 0, 0, 4)]              # pooled: true 6, false 2, present 20 (img + txt)
    scores = reproduce_digits.fn_scores(steps)
    assert scores["precision"] == pytest.approx(6 / 8) and scores["recall"] == pytest.approx(6 / 20)
    assert scores["f1"] == pytest.approx(2 * 0.75 * 0.3 / (0.75 + 0.3))
    nothing = reproduce_digits.fn_scores([_step(0, 0, 0, 5)])              # filtered nothing: found none of 10
    assert nothing["precision"] is None and nothing["recall"] == 0 and nothing["f1"] == 0
    assert reproduce_digits.fn_scores([_step(0, 0, 3, 0)])["f1"] is None       # nothing to find: undefined


def test_mean_std_skips_undefined_values() -> None:
    assert reproduce_digits.mean_std([0.2, None, 0.4]) == (pytest.approx(0.3), pytest.approx(2 ** 0.5 * 0.1))
    assert reproduce_digits.mean_std([None]) == (None, None)
    assert reproduce_digits.mean_std([0.5]) == (0.5, 0.0)


@pytest.fixture(scope="module")
def reproduce_result(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("reproduce") / "reproduce_digits.json"
    assert reproduce_digits.main(["--quick", "--data", str(digits_dir), "--output", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_reproduce_quick_structure(reproduce_result: tuple[dict, Path]) -> None:
    r, out = reproduce_result
    assert r["benchmark"] == "reproduce_digits" and MACHINE_KEYS <= set(r["machine"])
    assert shlex.split(r["command"])[:3] == ["python", "-m", "benchmarks.reproduce_digits"]
    expected = [(loss, variant) for loss in reproduce_digits.LOSSES for variant in reproduce_digits.VARIANTS]
    assert sorted((run["loss"], run["variant"]) for run in r["runs"]) == sorted(expected)
    assert [(row["loss"], row["variant"]) for row in r["summary"]] == expected
    assert r["alpha"]["chosen"] == {"clip": 0.1, "sogclr": 0.1} and r["alpha"]["sweep"] == []    # one α: no sweep
    assert sorted(r["plots"]) == ["reproduce_digits_fn.png", "reproduce_digits_lambda.png"]
    for name in r["plots"]:
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from clip_glofnd import train
    assert train.filter_negatives.__name__ == "filter_negatives"                 # the counting wrapper is gone


def test_reproduce_quick_values(reproduce_result: tuple[dict, Path]) -> None:
    r, _ = reproduce_result
    steps = r["settings"]["train_num_samples"] // r["settings"]["batch_size"]
    for run in r["runs"]:
        assert run["steps"] == steps and 0 < run["wall_s"] < 600
        assert 0 <= run["zeroshot_acc1"] <= 1 and 0 <= run["r1_t2i"] <= 1 and 0 <= run["r1_i2t"] <= 1
        fn = run["fn"]
        assert fn["present"] > 0                                            # 10 classes, batch 32: same-class pairs
        if run["variant"] == "oracle":                                      # the labels' own filter: exact
            assert fn["precision"] == fn["recall"] == 1.0 and fn["false"] == 0
        if run["variant"] == "none":
            assert fn["true"] == fn["false"] == 0 and fn["recall"] == fn["f1"] == 0 and run["filtered_frac"] == 0
        if run["variant"] == "fnd":                                         # batch quantile: ~α of the negatives
            assert fn["true"] + fn["false"] > 0 and 0 < run["filtered_frac"] < 0.5
        assert ("lambda_trace" in run) == (run["variant"] == "glofnd")
    row = next(row for row in r["summary"] if row["variant"] == "oracle")
    assert row["fn_precision_mean"] == 1.0 and row["fn_precision_std"] == 0.0
