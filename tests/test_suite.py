"""Benchmark suites against independent definitions: single-task `clip-glofnd eval` (every suite result must equal
it), DataComp's task list written out by hand, hand-computed means, and the files a rerun must leave alone.

Data: small generated sets in CLIP_benchmark's local wds layout (2, 3 and 5 classes; a retrieval set with 2-3 captions
per image) and the digits sets; model: a 1-layer open_clip config (a few MB), so a suite of four sets runs in seconds.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_glofnd import cli, eval_cli, suite, suite_spec
from clip_glofnd.errors import UsageError
from clip_glofnd.logger import read_jsonl
from clip_glofnd.suite_results import Checkpoint, expand_checkpoints
from clip_glofnd.suite_spec import Located, NotRun, Suite, SuiteTask, candidate_paths, load_suite, packaged_suites
from clip_glofnd.suite_summary import suite_means

MICRO = {"embed_dim": 16,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
COLORS = ["red", "green", "blue", "yellow", "black"]
RGB = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20), (10, 10, 10)]
TINY_SUITE = """
name: tiny
description: generated sets
tasks:
  - {name: wds/vtab/colors, task: zeroshot_classification, main_metric: mean_per_class_recall, groups: [A, B]}
  - {name: wds/three, task: zeroshot_classification, groups: A, path: sets/wds_three}
  - {name: wds/pair, title: Pair, task: zeroshot_classification, official_metric: acc_worst_group,
     note: worst group needs metadata}
  - {name: wds/colors_ret, task: zeroshot_retrieval, groups: [B]}
not_run:
  - {name: misc/game, official_metric: jaccard, groups: [B], reason: not a zero-shot task}
  - {name: misc/faces, reason: no main metric}
"""


# ------------------------------------------------------------------------------------------------ fixtures


def _png(color: tuple[int, int, int], seed: int) -> bytes:
    """A small noisy image of one colour."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.integers(-40, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_wds(root: Path, samples: list[dict[str, bytes]], kind: str, classnames: list[str] | None = None,
              shards: int = 2) -> Path:
    """CLIP_benchmark's local wds layout: test/nshards.txt, test/{0..n-1}.tar (samples dealt round robin)."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    for shard in range(shards):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for index, members in enumerate(samples[shard::shards]):
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{shard}_{index:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "dataset_type.txt").write_text(kind + "\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c} thing.\n{c}\n")
    return root


def _cls(root: Path, classes: int, images: int, shards: int) -> Path:
    samples = [{"png": _png(RGB[i % classes], i), "cls": str(i % classes).encode()} for i in range(images)]
    return write_wds(root, samples, "classification", COLORS[:classes], shards)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sets/wds_{vtab-colors (5 classes), three (3), pair (2), colors_ret (2-3 captions per image)} + tiny.yaml."""
    root = tmp_path_factory.mktemp("suite")
    _cls(root / "sets" / "wds_vtab-colors", 5, 15, 2)
    _cls(root / "sets" / "wds_three", 3, 9, 1)
    _cls(root / "sets" / "wds_pair", 2, 6, 3)
    captions = [b"a red square\nred", b"a green square\ngreen thing\nsomething green", b"blue\na blue square",
                b"a yellow square\nyellow\nyellow", b"black\na black square", b"a red thing\nred again\nred"]
    write_wds(root / "sets" / "wds_colors_ret", [{"png": _png(RGB[[0, 1, 2, 3, 4, 0][i]], 50 + i), "txt": text}
                                                 for i, text in enumerate(captions)], "retrieval")
    (root / "tiny.yaml").write_text(TINY_SUITE)
    (root / "micro.json").write_text(json.dumps(MICRO))
    return root


def _save(path: Path, seed: int, epoch: int, model: str) -> None:
    """A training-style checkpoint (state_dict with DDP prefix, "epoch") of the micro model, seeded weights."""
    from clip_glofnd.model import create_model
    torch.manual_seed(seed)
    net = create_model(model)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": epoch}, path)


@pytest.fixture(scope="module")
def run_folder(sets: Path) -> Path:
    """A `clip-glofnd train`-like run folder: checkpoints/epoch_1.pt, epoch_2.pt and epoch_latest.pt (= epoch 2)."""
    run = sets / "run"
    _save(run / "checkpoints" / "epoch_1.pt", 1, 1, str(sets / "micro.json"))
    _save(run / "checkpoints" / "epoch_2.pt", 2, 2, str(sets / "micro.json"))
    shutil.copy(run / "checkpoints" / "epoch_2.pt", run / "checkpoints" / "epoch_latest.pt")
    return run


def _suite_argv(sets: Path, output: Path, *extra: str) -> list[str]:
    return ["eval", "--suite", str(sets / "tiny.yaml"), "--model", str(sets / "micro.json"), "--dataset-root",
            str(sets / "nowhere" / "{dataset}"), str(sets / "sets" / "wds_{dataset_cleaned}"), "--output",
            str(output), "--device", "cpu", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def suite_run(sets: Path, run_folder: Path) -> Path:
    """The tiny suite on both epochs of the run folder (batch 64, no loader processes: CI has 2 cores)."""
    out = sets / "out"
    assert cli.main(_suite_argv(sets, out, "--checkpoint", str(run_folder))) == 0
    return out


def _same(a: dict, b: dict) -> bool:
    """Equal metrics, NaN (single-task JSON) == None (results.jsonl)."""
    def plain(d):
        return {k: None if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in d.items()}
    return plain(a) == plain(b)


# ------------------------------------------------------------------------------------------------ suite files


DATACOMP_MAIN = {  # mlfoundations/datacomp tasklist.yml: name -> main_metric (default acc1), written out by hand
    "Caltech-101": "mean_per_class_recall", "FGVC Aircraft": "mean_per_class_recall",
    "Oxford Flowers-102": "mean_per_class_recall", "Oxford-IIIT Pet": "mean_per_class_recall",
    "Flickr": "mean_recall@1", "MSCOCO": "mean_recall@1", "WinoGAViL": "jaccard_score_10-12",
    "iWildCam": "F1-macro_all", "FMoW": "acc_worst_region", "Dollar Street": "acc_top5_wg", "GeoDE": "acc_wg"}
DATACOMP_ACC1 = ["CIFAR-10", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Country211", "Describable Textures",
                 "EuroSAT", "Food-101", "GTSRB", "ImageNet 1k", "ImageNet Sketch", "ImageNet v2", "ImageNet-A",
                 "ImageNet-O", "ImageNet-R", "KITTI Vehicle Distance", "MNIST", "ObjectNet", "Pascal VOC 2007",
                 "PatchCamelyon", "Rendered SST2", "RESISC45", "Stanford Cars", "STL-10", "SUN397", "SVHN",
                 "Camelyon17"]
DATACOMP_GROUPS = {  # its aggregate_scores.py
    "ImageNet dist. shifts": {"ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R",
                              "ObjectNet"},
    "VTAB": {"Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
             "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN",
             "SUN397"},
    "Retrieval": {"Flickr", "MSCOCO", "WinoGAViL"}}


def test_datacomp_suite_is_datacomps_task_list() -> None:
    """38 tasks with DataComp's main metrics and groups; stand-ins and not-run tasks out of the means, said so."""
    datacomp = load_suite("datacomp")
    official = {t.title: t.official_metric or t.main_metric for t in datacomp.tasks}
    official |= {e.title: e.official_metric for e in datacomp.not_run if e.official_metric}
    assert official == {**dict.fromkeys(DATACOMP_ACC1, "acc1"), **DATACOMP_MAIN}            # the 38 of its Average
    assert {e.title for e in datacomp.not_run} == {"WinoGAViL", "FairFace", "UTKFace"}
    for group, members in DATACOMP_GROUPS.items():
        assert {t.title for t in datacomp.tasks if group in t.groups} | \
               {e.title for e in datacomp.not_run if group in e.groups} == members, group
    stand_ins = {t.title: t.main_metric for t in datacomp.tasks if not t.counted}
    assert stand_ins == {"iWildCam": "mean_per_class_recall", "FMoW": "acc1", "Dollar Street": "acc5",
                         "GeoDE": "acc1"}
    assert all(t.note for t in datacomp.tasks if not t.counted or t.task == "zeroshot_retrieval")
    means = suite_means(datacomp, {t: [0.5] for t in datacomp.tasks}, 1)
    assert [m.shown for m in means] == ["mean: VTAB (13 tasks)", "mean: ImageNet dist. shifts (6 tasks)",
                                        "mean: Retrieval (2 of 3 tasks)", "mean (33 of 38 tasks)"]


def test_packaged_suites_load_and_ship() -> None:
    assert packaged_suites() == ["datacomp", "digits", "imagenet-variants", "retrieval"]
    assert [t.name for t in load_suite("digits").tasks] == ["wds/digits_cls", "wds/digits_ret"]
    variants = load_suite("imagenet-variants")
    assert len(variants.tasks) == 7 and sum("ImageNet dist. shifts" in t.groups for t in variants.tasks) == 6
    assert {t.main_metric for t in load_suite("retrieval").tasks} == {"mean_recall@1"}
    link = Path(__file__).parents[1] / "data" / "suites"
    assert link.is_symlink() and link.resolve() == suite_spec.SUITES_DIR.resolve()
    assert "resources/suites/*.yaml" in (Path(__file__).parents[1] / "setup.cfg").read_text()


@pytest.mark.parametrize("text, message", [
    ("tasks: []", r"non-empty `tasks:` list"),
    ("- a\n- b", r"expected a mapping with a non-empty `tasks:`"),
    ("tasks: [{name: x, task: zeroshot_classification, main_metrik: acc1}]", r"unknown key 'main_metrik'; did you "
                                                                             r"mean 'main_metric'"),
    ("tasks: [{name: x, task: linear_probe}]", r"task 'x': task must be zeroshot_classification or"),
    ("tasks: [{name: x, task: zeroshot_retrieval, main_metric: acc1}]", r"main_metric 'acc1' is not a "
                                                                        r"zeroshot_retrieval metric; choose from "
                                                                        r"mean_recall@1"),
    ("tasks: [{task: zeroshot_classification}]", r"tasks\[0\]: expected a mapping with a `name`"),
    ("tasks: [{name: x, task: zeroshot_classification}, {name: x, task: zeroshot_classification}]", r"listed twice"),
    ("tasks: [{name: x, task: zeroshot_classification, groups: [1]}]", r"groups must be a list of names"),
    ("tasks: [{name: x, task: zeroshot_classification}]\nnot_run: [{name: y}]", r"`reason` is required"),
    ("tasks: [{name: x, task: zeroshot_classification}]\nsuite: y", r"unknown key 'suite'"),
    ("tasks: [{name: x, task: [", r"not valid YAML"),
])
def test_bad_suite_files_name_file_and_key(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as error:
        load_suite(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_suite_names_the_packaged_ones() -> None:
    with pytest.raises(UsageError, match=r"--suite nosuch: neither a file nor a packaged suite \(datacomp, digits"):
        load_suite("nosuch")


def test_dataset_paths_follow_clip_benchmark_placeholders(tmp_path: Path) -> None:
    task = SuiteTask("wds/vtab/caltech101", "zeroshot_classification", "acc1")
    assert candidate_paths(task, ["/d/wds_{dataset_cleaned}_test", "/e/{dataset}", "/f"]) == [
        Path("/d/wds_vtab-caltech101_test"), Path("/e/vtab/caltech101"), Path("/f/vtab/caltech101")]
    assert candidate_paths(SuiteTask("x", "zeroshot_classification", "acc1", path=tmp_path / "y"), ["/d"]) == [
        tmp_path / "y"]
    with pytest.raises(UsageError, match=r"--dataset-root '/d/\{name\}': the placeholders are \{dataset\}"):
        candidate_paths(task, ["/d/{name}"])
    (tmp_path / "s.yaml").write_text("tasks: [{name: x, task: zeroshot_classification, path: sub/x}]")
    assert load_suite(tmp_path / "s.yaml").tasks[0].path == tmp_path / "sub" / "x"     # relative to the suite file


# ------------------------------------------------------------------------------------------------ running suites


def test_suite_results_equal_single_task_eval(sets: Path, run_folder: Path, suite_run: Path, tmp_path: Path) -> None:
    """Every (checkpoint, task) of the suite == `clip-glofnd eval --zeroshot-data/--retrieval-data` on that set."""
    records = read_jsonl(suite_run / "results.jsonl")
    assert len(records) == 8 and len({(r["checkpoint"], r["dataset"], r["task"]) for r in records}) == 8
    data = sets / "sets"
    for epoch in (1, 2):
        ckpt = run_folder / "checkpoints" / f"epoch_{epoch}.pt"
        single = tmp_path / f"single{epoch}"
        assert eval_cli.main(["--model", str(sets / "micro.json"), "--checkpoint", str(ckpt), "--zeroshot-data",
                              str(data / "wds_vtab-colors"), str(data / "wds_three"), str(data / "wds_pair"),
                              "--retrieval-data", str(data / "wds_colors_ret"), "--output", str(single),
                              "--device", "cpu", "--workers", "0"]) == 0
        for folder, name, dataset in [("wds_vtab-colors", "vtab_colors", "wds/vtab/colors"),
                                      ("wds_three", "three", "wds/three"), ("wds_pair", "pair", "wds/pair"),
                                      ("wds_colors_ret", "colors_ret", "wds/colors_ret")]:
            reference = json.loads(next(single.glob(f"{folder}_*.json")).read_text())
            ours = json.loads(next(suite_run.glob(f"{name}_epoch_{epoch}.pt_micro_en_*.json")).read_text())
            assert ours["metrics"].keys() == reference["metrics"].keys(), name
            assert _same(ours["metrics"], reference["metrics"]), name
            assert (ours["dataset"], ours["pretrained"], ours["task"], ours["model"]) == (
                dataset, str(ckpt), reference["task"], reference["model"])
            record = next(r for r in records if r["epoch"] == epoch and r["dataset"] == dataset)
            assert _same({k: v for k, v in record["metrics"].items() if k != "mean_recall@1"}, reference["metrics"])
            assert record["checkpoint"] == str(ckpt.resolve()) and record["label"] == f"epoch_{epoch}.pt"


def test_summaries_have_a_column_per_checkpoint_and_hand_computed_means(suite_run: Path) -> None:
    records = {(r["epoch"], r["dataset"]): r["metrics"] for r in read_jsonl(suite_run / "results.jsonl")}
    rows = list(csv.DictReader((suite_run / "summary.csv").open()))
    assert [k for k in rows[0] if k.startswith("epoch")] == ["epoch_1.pt", "epoch_2.pt"]
    by_name = {(r["row"], r["dataset"]): r for r in rows}
    for epoch in (1, 2):
        m = {name: records[(epoch, name)] for name in ("wds/vtab/colors", "wds/three", "wds/pair", "wds/colors_ret")}
        ret = m["wds/colors_ret"]
        mean_r1 = (ret["image_retrieval_recall@1"] + ret["text_retrieval_recall@1"]) / 2
        assert ret["mean_recall@1"] == pytest.approx(mean_r1, abs=1e-15)
        colors, three = m["wds/vtab/colors"]["mean_per_class_recall"], m["wds/three"]["acc1"]
        expected = {("group_mean", "A"): (colors + three) / 2, ("group_mean", "B"): (colors + mean_r1) / 2,
                    ("mean", ""): (colors + three + mean_r1) / 3}                   # wds/pair is a stand-in: out
        for key, value in expected.items():
            assert float(by_name[key][f"epoch_{epoch}.pt"]) == pytest.approx(value, abs=1e-12), key
        assert float(by_name[("task", "wds/pair")][f"epoch_{epoch}.pt"]) == m["wds/pair"]["acc1"]
    assert by_name[("mean", "")]["status"] == "3 of 5 tasks" and by_name[("group_mean", "B")]["status"] == \
        "2 of 3 tasks"
    assert by_name[("task", "wds/pair")]["in_means"] == "0" and by_name[("not_run", "misc/game")]["in_means"] == "0"
    markdown = (suite_run / "summary.md").read_text()
    assert "| task | main metric | groups | epoch_1.pt | epoch_2.pt |" in markdown
    assert "acc1 (stand-in for acc_worst_group)" in markdown and "**mean (3 of 5 tasks)**" in markdown
    assert "misc/game: not run (not a zero-shot task)" in markdown and "worst group needs metadata" in markdown
    assert (suite_run / "summary_per_epoch.png").read_bytes()[:4] == b"\x89PNG"


def _copy(output: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(output, tmp_path / "out"))


def test_rerun_skips_what_results_hold_and_overwrite_recomputes(sets: Path, run_folder: Path, suite_run: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = _copy(suite_run, tmp_path)
    before = (out / "results.jsonl").read_text()
    argv = _suite_argv(sets, out, "--checkpoint", str(run_folder))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built although every result is there")

    monkeypatch.setattr("clip_glofnd.model.create_model", no_model)
    assert cli.main(argv) == 0
    assert (out / "results.jsonl").read_text() == before and "0 of 8 (checkpoint, task)" in capsys.readouterr().out
    monkeypatch.undo()
    lines = before.splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:5] + lines[6:7] + [lines[7][:40]]))   # one lost, one cut
    calls = []
    real = suite.evaluate_dataset
    monkeypatch.setattr(suite, "evaluate_dataset", lambda *a, **k: calls.append(a[3].name) or real(*a, **k))
    assert cli.main(argv) == 0
    old = [json.loads(line) for line in lines]
    new = read_jsonl(out / "results.jsonl")
    assert calls == [old[5]["path"].split("/")[-1], old[7]["path"].split("/")[-1]]
    assert [suite.result_key(r) for r in new] == [suite.result_key(old[i]) for i in (0, 1, 2, 3, 4, 6, 5, 7)]
    timeless = [sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rs) for rs in (new, old)]
    assert timeless[0] == timeless[1]                                           # recomputed: the same numbers
    fake = {"acc1": 0.25, "acc5": 0.5, "mean_per_class_recall": 0.75}
    monkeypatch.setattr(suite, "evaluate_dataset", lambda *a, **k: calls.append(a[3].name) or (
        fake if a[3].kind == "classification" else {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 1.0}))
    assert cli.main(argv + ["--overwrite"]) == 0
    records = read_jsonl(out / "results.jsonl")
    assert len(calls) == 2 + 8 and len(records) == 8 and {r["main"] for r in records} == {0.25, 0.75}
    assert all(r["main"] == 0.75 for r in records if r["dataset"] in ("wds/vtab/colors", "wds/colors_ret"))


def test_resume_refuses_other_settings(sets: Path, run_folder: Path, suite_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    out = _copy(suite_run, tmp_path)
    assert cli.main(_suite_argv(sets, out, "--checkpoint", str(run_folder), "--precision", "amp_bf16")) == 2
    assert "evaluated with precision 'fp32', not 'amp_bf16'; pass --overwrite" in capsys.readouterr().err


def test_missing_sets_are_listed_before_any_work(sets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "s.yaml").write_text("tasks:\n- {name: wds/three, task: zeroshot_classification, groups: [G]}\n"
                                     "- {name: wds/vtab/gone, task: zeroshot_classification, groups: [G]}\n"
                                     "- {name: wds/lost, task: zeroshot_retrieval}\n")
    argv = ["eval", "--suite", str(tmp_path / "s.yaml"), "--model", str(sets / "micro.json"), "--dataset-root",
            str(sets / "sets" / "wds_{dataset_cleaned}"), "--output", str(tmp_path / "out"), "--device", "cpu"]

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the missing data sets were reported")

    monkeypatch.setattr("clip_glofnd.model.create_model", no_work)
    monkeypatch.setattr(suite, "evaluate_dataset", no_work)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 of 3 data sets of suite s are missing" in err and "--skip-missing" in err
    assert f"wds/vtab/gone: expected {sets / 'sets' / 'wds_vtab-gone'}" in err
    assert f"wds/lost: expected {sets / 'sets' / 'wds_lost'}" in err and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert cli.main(argv + ["--skip-missing", "--workers", "0"]) == 0
    three = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["dataset"] for r in three] == ["wds/three"]
    rows = {(r["row"], r["dataset"]): r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert rows[("task", "wds/vtab/gone")]["status"] == "missing" and rows[("task", "wds/lost")]["random-init"] == ""
    assert float(rows[("group_mean", "G")]["random-init"]) == three[0]["main"]
    assert rows[("mean", "")]["status"] == "1 of 3 tasks"
    assert "wds/vtab/gone: missing (expected" in (tmp_path / "out" / "summary.md").read_text()


def test_task_kind_must_match_the_data(sets: Path, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(f"tasks: [{{name: x, task: zeroshot_retrieval, path: {sets}/sets/wds_three}}]")
    with pytest.raises(UsageError, match=r"task 'x' is zeroshot_retrieval but .*wds_three is a classification"):
        suite_spec.locate(load_suite(tmp_path / "s.yaml"), [])
    (tmp_path / "t.yaml").write_text("tasks: [{name: x, task: zeroshot_classification}]")
    with pytest.raises(UsageError, match=r"--dataset-root is needed: 1 tasks of .*t.yaml have no `path`"):
        suite_spec.locate(load_suite(tmp_path / "t.yaml"), [])


# ------------------------------------------------------------------------------------------------ pieces


def test_means_hand_computed() -> None:
    """Groups and overall mean over counted tasks with a value; totals include not-run tasks with a metric."""
    a, b, c = (SuiteTask(n, "zeroshot_classification", "acc1", groups=g) for n, g in
               (("a", ("G",)), ("b", ("G", "H")), ("c", ("H",))))
    d = SuiteTask("d", "zeroshot_classification", "acc1", groups=("G",), official_metric="acc_wg")   # stand-in
    e = SuiteTask("e", "zeroshot_retrieval", "mean_recall@1", groups=("H",))
    s = Suite("s", Path("s.yaml"), (a, b, c, d, e), (NotRun("w", "why", official_metric="j", groups=("H",)),
                                                   NotRun("f", "no metric")))
    values = {a: [0.2, 0.3], b: [0.4, None], c: [0.9, 0.6], d: [1.0, 1.0], e: [None, 0.1]}
    means = {m.shown: m.values for m in suite_means(s, values, 2)}
    assert means == {"mean: G (2 of 3 tasks)": [pytest.approx(0.3), 0.3],
                     "mean: H (2 of 4 tasks)": [pytest.approx(0.65), pytest.approx(0.35)],
                     "mean (3 of 6 tasks)": [pytest.approx(0.5), pytest.approx(1.0 / 3)]}


def test_checkpoints_from_files_folders_and_tags(run_folder: Path, tmp_path: Path) -> None:
    cols = expand_checkpoints([str(run_folder)])
    assert [(c.label, c.epoch) for c in cols] == [("epoch_1.pt", 1), ("epoch_2.pt", 2)]    # epoch_latest.pt left out
    other = tmp_path / "b" / "checkpoints" / "epoch_1.pt"
    other.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, other)                                   # no "epoch" key: from the name
    cols = expand_checkpoints([str(run_folder / "checkpoints" / "epoch_1.pt"), str(other), "laion2b_s34b_b79k"])
    assert cols[0].label != cols[1].label and not Path(cols[0].label).is_absolute()        # same names: paths
    assert cols[0].label.endswith("run/checkpoints/epoch_1.pt") and cols[1].label.endswith("b/checkpoints/epoch_1.pt")
    assert (cols[0].epoch, cols[1].epoch) == (1, 1)
    assert (cols[2].label, cols[2].key, cols[2].epoch) == ("laion2b_s34b_b79k", "laion2b_s34b_b79k", None)
    assert expand_checkpoints(None) == [Checkpoint(None, "random-init")]
    with pytest.raises(UsageError, match=r"--checkpoint .*nothing.pt: no such file"):
        expand_checkpoints([str(tmp_path / "nothing.pt")])
    with pytest.raises(UsageError, match=r"a folder without checkpoints/epoch_N.pt"):
        expand_checkpoints([str(tmp_path)])


def test_several_checkpoints_need_suite_and_suite_excludes_data_flags(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["eval", "--model", "m", "--checkpoint", "a.pt", "b.pt", "--zeroshot-data", "x", "--output",
                     "o"]) == 2
    assert "several checkpoints (or a run folder) need --suite" in capsys.readouterr().err
    assert cli.main(["eval", "--model", "m", "--suite", "digits", "--zeroshot-data", "x", "--output", "o"]) == 2
    assert "--suite names its own data sets" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ training


def test_training_logs_digits_suite_means_equal_to_offline_suite(digits_dir: Path, sets: Path, tmp_path: Path) -> None:
    """--eval-suite digits during training == `eval --suite digits` on the saved checkpoint == single-task eval."""
    model, root = str(sets / "micro.json"), str(digits_dir / "wds")
    base = ["train", "--train-data", str(digits_dir / "train" / "{00000..00011}.tar"), "--train-num-samples", "64",
            "--model", model, "--batch-size", "32", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers",
            "0", "--logs", str(tmp_path), "--eval-suite", "digits"]
    assert cli.main([*base, "--name", "gone", "--eval-dataset-root", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "gone").exists()                                  # refused before any training
    assert cli.main([*base, "--name", "run", "--eval-dataset-root", root]) == 0
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "suite/mean" in r]
    assert len(logged) == 1 and {"suite/group/classification", "suite/group/retrieval"} <= logged[0].keys()
    out = tmp_path / "eval"
    assert cli.main(["eval", "--suite", "digits", "--model", model, "--checkpoint", str(tmp_path / "run"),
                     "--dataset-root", root, "--output", str(out), "--workers", "0", "--device", "cpu"]) == 0
    rows = {(r["row"], r["dataset"]): r["epoch_1.pt"] for r in csv.DictReader((out / "summary.csv").open())}
    assert float(rows[("mean", "")]) == logged[0]["suite/mean"]
    assert float(rows[("task", "wds/digits_ret")]) == logged[0]["suite/wds/digits_ret/mean_recall@1"]
    single = eval_cli.main(["--model", model, "--checkpoint", str(tmp_path / "run" / "checkpoints" / "epoch_1.pt"),
                            "--zeroshot-data", f"{root}/digits_cls", "--output", str(tmp_path / "single"),
                            "--workers", "0", "--device", "cpu"])
    reference = json.loads(next((tmp_path / "single").glob("*.json")).read_text())["metrics"]
    assert single == 0 and reference["acc1"] == logged[0]["suite/wds/digits_cls/acc1"] == float(
        rows[("task", "wds/digits_cls")])
