"""`clip-glofnd compare`: each column from hand-written run folders (config.yaml + metrics.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_glofnd import cli
from clip_glofnd.compare import summarize_run


def _run(folder: Path, config: dict, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _step(step: int, epoch: int, filtered: float, true: int, false: int, present: int) -> dict:
    return {"step": step, "epoch": epoch, "loss": 1.0, "filtered_img": filtered, "filtered_txt": filtered,
            **{f"fn_{k}_{m}": v for k, v in (("true", true), ("false", false), ("present", present))
               for m in ("img", "txt")}}


EVAL = {"step": 3, "epoch": 2, "zeroshot/digits_cls/acc1": 0.9, "retrieval/digits_ret/image_retrieval_recall@1": 0.03,
        "retrieval/digits_ret/text_retrieval_recall@1": 0.04}


def test_glofnd_run_counts_only_masking_epochs_and_skips_the_warmup(tmp_path: Path) -> None:
    records = [{"step": 0, "phase": "state_warmup", **_step(0, 0, 0.5, 99, 99, 99)},
               _step(1, 0, 0.0, 0, 0, 10),                                   # before masking: not counted
               _step(2, 1, 0.1, 3, 1, 10), _step(3, 1, 0.2, 1, 3, 10),
               {"step": 3, "epoch": 2, "epoch_loss": 1.0, "lam_img_seen_p50": 0.3, "lam_txt_seen_p50": 0.5}, EVAL]
    row = summarize_run(_run(tmp_path / "g", {"fnd": "glofnd", "fnd_init": "quantile", "fnd_alpha": 0.1,
                                              "fnd_start_epoch": 0, "fnd_mask_start_epoch": 1}, records))
    assert row["filter"] == "glofnd (quantile)" and (row["acc1"], row["R@1 t→i"], row["R@1 i→t"]) == (0.9, 0.03, 0.04)
    assert row["filtered"] == pytest.approx(0.15) and row["FN precision"] == pytest.approx(8 / 16)   # img + txt
    assert row["FN recall"] == pytest.approx(8 / 40) and row["λ median"] == pytest.approx(0.4) and row["α"] == 0.1


def test_table_of_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    none = _run(tmp_path / "none", {"fnd": "none", "fnd_alpha": 0.1, "fnd_start_epoch": 0,
                                    "fnd_mask_start_epoch": None}, [{"step": 1, "epoch": 0, "loss": 2.0}, EVAL])
    oracle = _run(tmp_path / "oracle", {"fnd": "oracle", "fnd_start_epoch": 0, "fnd_mask_start_epoch": None},
                  [_step(1, 0, 0.1, 5, 0, 5), EVAL])
    out = tmp_path / "rows.json"
    assert cli.main(["compare", str(none), str(oracle), "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "filter", "acc1"] and len(lines) == 5
    assert lines[4].startswith("paired acc1 oracle − none, same seed: +0.0 pts over 1 seed(s)")
    rows = json.loads(out.read_text())
    assert rows[0]["filtered"] == 0 and rows[0]["FN precision"] is None and rows[0]["α"] is None
    assert rows[1]["FN precision"] == rows[1]["FN recall"] == 1.0 and lines[3].split()[1] == "oracle"
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2


def test_paired_interval_by_hand() -> None:
    """Differences 1, 2, 3: mean 2, sd 1, t(2, 0.975) = 4.3027 -> 2 ± 4.3027 / √3."""
    from clip_glofnd.compare import paired_differences, paired_interval
    out = paired_interval([1.0, 2.0, 3.0])
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0)
    assert out["ci"] == pytest.approx([2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5], rel=1e-6)
    assert paired_interval([0.5])["ci"] is None and paired_interval([])["mean"] is None
    rows = [{"filter": "none", "seed": s, "acc1": a} for s, a in ((0, 0.90), (1, 0.80), (2, 0.70))]
    rows += [{"filter": "glofnd (one)", "seed": s, "acc1": a} for s, a in ((0, 0.91), (1, 0.82), (3, 0.99))]
    pair = paired_differences(rows)["glofnd (one)"]
    assert pair["seeds"] == [0, 1] and pair["diffs"] == pytest.approx([0.01, 0.02])      # seed 3 has no mate
    against = paired_differences(rows, baseline="glofnd (one)")["none"]                  # another baseline
    assert against["seeds"] == [0, 1] and against["diffs"] == pytest.approx([-0.01, -0.02])
