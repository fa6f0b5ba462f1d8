"""Zero-shot evaluation against independent definitions: brute-force loops, hand-computed cases, scikit-learn.

The reference definitions are CLIP_benchmark 1.6.2's (see clip_glofnd/evaluate.py); parity with the package itself
on the digits held-out sets is checked by hand (not in CI, it needs a second venv).
"""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from clip_glofnd import cli
from clip_glofnd.errors import UsageError
from clip_glofnd.eval_cli import build_parser, main
from clip_glofnd.eval_data import imagenet_classnames, make_loader, open_dataset, openai_templates
from clip_glofnd.evaluate import BATCH_SIZE, WORKERS, ClassificationMeter, build_classifier, retrieval_metrics
from clip_glofnd.evaluate import evaluate as evaluate_with_defaults
from clip_glofnd.model import create_model

COLORS = ["red", "green", "blue", "yellow", "black", "white"]


def evaluate(*args, **kwargs) -> dict[str, float]:
    """`clip_glofnd.evaluate.evaluate` without loader processes (CI has 2 cores) unless a test asks for them."""
    return evaluate_with_defaults(*args, **{"workers": 0, **kwargs})


# ------------------------------------------------------------------------------------------------ fixtures


def _png(color: tuple[int, int, int], seed: int) -> bytes:
    """A small noisy image of one colour (distinct pixels per seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """One wds shard: members KEY.EXT in sample order."""
    with tarfile.open(path, "w") as tar:
        for index, members in enumerate(samples):
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{index:06d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, samples: list[dict[str, bytes]], kind: str, classnames: list[str] | None = None,
              templates: list[str] | None = None, shards: int = 2) -> Path:
    """CLIP_benchmark's local wds layout: test/nshards.txt, test/{0..n-1}.tar, metadata files."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    for shard in range(shards):
        _write_tar(root / "test" / f"{shard}.tar", samples[shard::shards])
    (root / "dataset_type.txt").write_text(kind + "\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def _rgb(index: int) -> tuple[int, int, int]:
    """The RGB colour of COLORS[index]."""
    return [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20), (10, 10, 10), (245, 245, 245)][index]


@pytest.fixture(scope="module")
def tiny() -> tuple:
    """(model, preprocess_val, tokenizer) of the packaged clip-tiny config, random init (seeded)."""
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("clip-tiny")
    return model.eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny classification (6 classes, 18 images), 3-class, and retrieval (7 images, 0-3 captions) data sets."""
    root = tmp_path_factory.mktemp("evaldata")
    labels = [i % 6 for i in range(18)]
    cls_samples = [{"png": _png(_rgb(label), i), "cls": str(label).encode()} for i, label in enumerate(labels)]
    templates = ["a photo of a {c} thing.", "{c}", "something {c}."]
    write_wds(root / "colors_cls", cls_samples, "classification", COLORS, templates)
    three = [sample for sample, label in zip(cls_samples, labels) if label < 3]
    write_wds(root / "three_cls", three, "classification", COLORS[:3])
    ret_samples = [{"png": _png(_rgb(i % 6), 100 + i),
                    "txt": "\n".join(f"a {COLORS[i % 6]} square number {j}" for j in range(i % 4)).encode()}
                   for i in range(7)]
    ret_samples[0]["txt"] = b"a red square\nred"
    write_wds(root / "colors_ret", ret_samples, "retrieval", shards=3)
    return {"cls": root / "colors_cls", "three": root / "three_cls", "ret": root / "colors_ret", "root": root}


# ------------------------------------------------------------------------------------------------ oracles


def brute_force_classification(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """CLIP_benchmark's definitions, one sample at a time on the whole logit matrix."""
    topk = 5 if num_classes >= 5 else 1
    top = [torch.topk(row, topk).indices.tolist() for row in logits]
    acc1 = sum(t in row[:1] for t, row in zip(targets.tolist(), top)) / len(targets)
    acc5 = sum(t in row[:5] for t, row in zip(targets.tolist(), top)) / len(targets) if topk == 5 else math.nan
    recall = balanced_accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def brute_force_retrieval(image_emb, text_emb, text_image, ks=(1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark's definitions, one row at a time on the full score matrix (float32 means)."""
    scores = text_emb @ image_emb.T                                 # [N_text, N_image]
    metrics = {}
    for k in ks:
        text_hits = [int(text_image[t]) in torch.topk(scores[t], min(k, scores.shape[1])).indices.tolist()
                     for t in range(len(scores))]
        image_hits = [any(int(text_image[t]) == i for t in torch.topk(scores[:, i], min(k, len(scores))).indices)
                      for i in range(scores.shape[1])]
        metrics[f"image_retrieval_recall@{k}"] = torch.tensor(text_hits).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = torch.tensor(image_hits).float().mean().item()
    return metrics


def _assert_same(ours: dict[str, float], reference: dict[str, float]) -> None:
    """Exactly the same numbers (NaN equals NaN)."""
    assert ours.keys() == reference.keys()
    for key in ours:
        assert ours[key] == reference[key] or (math.isnan(ours[key]) and math.isnan(reference[key])), key


# ------------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("num_classes, ties", [(7, False), (7, True), (3, False), (5, True)])
def test_classification_meter_equals_brute_force(num_classes: int, ties: bool) -> None:
    logits = torch.randint(0, 3, (53, num_classes)).float() if ties else torch.randn(53, num_classes)
    targets = torch.randint(0, num_classes, (53,))
    meter = ClassificationMeter(num_classes)
    for start in range(0, 53, 10):                                  # batches, like a loader
        meter.update(logits[start:start + 10], targets[start:start + 10])
    _assert_same(meter.compute(), brute_force_classification(logits, targets, num_classes))


def test_classification_hand_computed() -> None:
    """6 classes, 4 images; classes 4 and 5 never occur (they do not count in mean_per_class_recall)."""
    logits = torch.tensor([[9., 1, 2, 3, 4, 5],     # target 0: rank 1
                           [9., 1, 2, 3, 4, 5],     # target 1: rank 6 -> miss at 5
                           [3., 4, 1, 9, 8, 7],     # target 2: rank 6
                           [1., 2, 9, 3, 4, 5]])    # target 2: rank 1
    meter = ClassificationMeter(6)
    meter.update(logits, torch.tensor([0, 1, 2, 2]))
    # recall: class 0 1/1, class 1 0/1, class 2 1/2 -> mean 0.5
    assert meter.compute() == {"acc1": 0.5, "acc5": 0.5, "mean_per_class_recall": 0.5}


def test_label_outside_class_names_is_usage_error() -> None:
    with pytest.raises(UsageError, match="label 6 does not match the 6 class names"):
        ClassificationMeter(6).update(torch.randn(2, 6), torch.tensor([1, 6]))


def test_retrieval_hand_computed() -> None:
    """4 images, 8 captions (2 each); the scores are the text embeddings themselves (image_emb = identity)."""
    scores = torch.tensor([[.9, .1, .0, .0], [.2, .8, .0, .0],      # captions of image 0: hit@1, miss@1 (rank 2)
                           [.0, .7, .3, .0], [.0, .5, .6, .0],      # image 1: rank 1, rank 2
                           [.0, .0, .1, .0], [.3, .2, .1, .0],      # image 2: rank 1, rank 3
                           [.1, .2, .3, .4], [.0, .0, .0, .1]])     # image 3: rank 1, rank 1
    text_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    metrics = retrieval_metrics(torch.eye(4), scores, text_image, recall_k=(1, 2, 10))
    # text -> image: hits@1 = captions 0, 2, 4, 6, 7 -> 5/8; @2 adds captions 1, 3 -> 7/8; @10 (> 4 images) all
    # image -> text, top captions per column: img0 [0(.9), 5(.3)], img1 [1(.8), 2(.7)], img2 [3(.6), 2(.3)],
    # img3 [6(.4), 7(.1)] -> @1: img0 yes, img1 no (caption 1 is image 0's), img2 no, img3 yes = 2/4;
    # @2: img1 yes (caption 2), img2 no (3 is image 1's; .3 ties captions 2 and 6, neither its own) -> 3/4
    assert metrics["image_retrieval_recall@1"] == torch.tensor(5 / 8).item()
    assert metrics["image_retrieval_recall@2"] == 0.875 and metrics["image_retrieval_recall@10"] == 1.0
    assert metrics["text_retrieval_recall@1"] == 0.5 and metrics["text_retrieval_recall@2"] == 0.75


def _multi_caption(ties: bool, n_image: int = 23) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings with 0-4 captions per image; `ties`: small integer vectors, so many scores are exactly equal."""
    counts = torch.randint(0, 5, (n_image,))
    text_image = torch.repeat_interleave(torch.arange(n_image), counts)
    if ties:
        return (torch.randint(-1, 2, (n_image, 3)).float(), torch.randint(-1, 2, (len(text_image), 3)).float(),
                text_image)
    image_emb, text_emb = torch.randn(n_image, 8), torch.randn(len(text_image), 8)
    return F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), text_image


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_equals_brute_force(ties: bool) -> None:
    image_emb, text_emb, text_image = _multi_caption(ties)
    _assert_same(retrieval_metrics(image_emb, text_emb, text_image, chunk_size=10 ** 6),
                 brute_force_retrieval(image_emb, text_emb, text_image))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunked_retrieval_equals_unchunked(ties: bool, chunk_size: int) -> None:
    image_emb, text_emb, text_image = _multi_caption(ties, n_image=31)
    _assert_same(retrieval_metrics(image_emb, text_emb, text_image, chunk_size=chunk_size),
                 retrieval_metrics(image_emb, text_emb, text_image, chunk_size=10 ** 6))


def test_retrieval_without_ties_is_the_rank_definition() -> None:
    """Math oracle (no topk): a caption hits at k when fewer than k images score strictly higher than its own."""
    image_emb, text_emb, text_image = _multi_caption(ties=False)
    scores = text_emb @ image_emb.T
    own = scores[torch.arange(len(scores)), text_image]
    rank_text = (scores > own[:, None]).sum(1)                                          # [N_text]
    metrics = retrieval_metrics(image_emb, text_emb, text_image)
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx((rank_text < k).float().mean().item(), abs=1e-7)
        best = [min([(scores[:, i] > scores[t, i]).sum().item() for t in range(len(scores)) if text_image[t] == i],
                    default=10 ** 9) for i in range(len(image_emb))]                  # best caption rank per image
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(np.mean(np.array(best) < k), abs=1e-7)


# ------------------------------------------------------------------------------------------------ resources


def test_packaged_names_and_templates_are_open_clips() -> None:
    import open_clip
    assert imagenet_classnames() == list(open_clip.IMAGENET_CLASSNAMES)
    assert openai_templates() == [template("{c}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert len(openai_templates()) == 80
    for name in ("imagenet_classnames.txt", "openai_templates.txt"):
        link = Path(__file__).parents[1] / "data" / name
        assert link.is_symlink() and link.read_text() == (Path(__file__).parents[1] / "clip_glofnd" / "resources"
                                                           / name).read_text()


# ------------------------------------------------------------------------------------------------ model side


def test_build_classifier_equals_template_by_template(tiny) -> None:
    """Oracle: each template encoded on its own, normalised, averaged, renormalised (CLIP's recipe)."""
    model, _, tokenizer = tiny
    classnames, templates = ["red", "blue", "dark green"], ["a {c} photo.", "{c}", "it is {c}"]
    weights = build_classifier(model, tokenizer, classnames, templates)
    with torch.no_grad():
        for column, name in enumerate(classnames):
            embeddings = [F.normalize(model.encode_text(tokenizer([t.format(c=name)]))[0], dim=-1) for t in templates]
            mean = torch.stack(embeddings).mean(0)
            torch.testing.assert_close(weights[:, column], mean / mean.norm(), atol=1e-6, rtol=0)
    assert weights.shape == (64, 3)


def _embed(model, preprocess, tokenizer, dataset_dir: Path):
    """Independent pipeline: PIL-decode every tar member in shard order, preprocess, encode."""
    images, targets = [], []
    for shard in sorted((dataset_dir / "test").glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(shard) as tar:
            members = {}
            for info in tar:
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for sample in members.values():
            images.append(preprocess(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
            targets.append(int(sample["cls"]) if "cls" in sample else sample["txt"].decode().splitlines())
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.stack(images)), dim=-1), targets


def test_evaluate_equals_independent_pipeline(tiny, data) -> None:
    model, preprocess, tokenizer = tiny
    model.train()
    metrics = evaluate(model, preprocess, tokenizer, zeroshot_data=[str(data["cls"])], retrieval_data=[data["ret"]],
                       batch_size=4)
    assert model.training                                                   # mode restored
    model.eval()
    features, labels = _embed(model, preprocess, tokenizer, data["cls"])
    classifier = build_classifier(model, tokenizer, COLORS, ["a photo of a {c} thing.", "{c}", "something {c}."])
    expected = brute_force_classification((100 * features @ classifier), torch.tensor(labels), 6)
    for key, value in expected.items():
        assert metrics[f"zeroshot/colors_cls/{key}"] == pytest.approx(value, abs=1e-12), key
    image_emb, captions = _embed(model, preprocess, tokenizer, data["ret"])
    with torch.no_grad():
        text_emb = F.normalize(model.encode_text(tokenizer([c for caps in captions for c in caps])), dim=-1)
    text_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    for key, value in brute_force_retrieval(image_emb, text_emb, text_image).items():
        assert metrics[f"retrieval/colors_ret/{key}"] == pytest.approx(value, abs=1e-6), key


def test_fewer_than_five_classes_gives_nan_acc5(tiny, data) -> None:
    metrics = evaluate(*tiny, zeroshot_data=[data["three"]])
    assert math.isnan(metrics["zeroshot/three_cls/acc5"]) and 0 <= metrics["zeroshot/three_cls/acc1"] <= 1


@pytest.mark.parametrize("precision", ["amp_bf16", "amp"])
def test_autocast_precisions_run(tiny, data, precision: str) -> None:
    """AMP is an option, not the reference (fp32 is): it runs on CPU autocast and reports the same metric set."""
    fp32 = evaluate(*tiny, zeroshot_data=[data["cls"]], retrieval_data=[data["ret"]])
    amp = evaluate(*tiny, zeroshot_data=[data["cls"]], retrieval_data=[data["ret"]], precision=precision)
    assert amp.keys() == fp32.keys()
    assert all(0.0 <= value <= 1.0 for value in amp.values() if not math.isnan(value))


def test_folder_layout_equals_wds_layout(tiny, data, tmp_path: Path) -> None:
    """The same images as class subfolders + classnames.txt give the same numbers as the wds copy."""
    root = tmp_path / "colors_folder"
    for index, name in enumerate(COLORS):
        (root / f"c{index}").mkdir(parents=True)
    for i in range(18):
        (root / f"c{i % 6}" / f"{i:03d}.png").write_bytes(_png(_rgb(i % 6), i))
    (root / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c} thing.\n{c}\nsomething {c}.\n")
    folder = evaluate(*tiny, zeroshot_data=[root])
    wds = evaluate(*tiny, zeroshot_data=[data["cls"]])
    assert {k.split("/")[-1]: v for k, v in folder.items()} == pytest.approx({k.split("/")[-1]: v for k, v in
                                                                              wds.items()}, abs=1e-12)


def test_default_loader_order_is_clip_benchmarks(data, tmp_path: Path) -> None:
    """Defaults batch 64 / 4 workers, as CLIP_benchmark; order oracle: worker i batches shards i, i + 4, ... on its
    own and the DataLoader takes one batch from each live worker in turn (webdataset's `.batched` under a DataLoader
    with batch_size=None, which CLIP_benchmark uses) — the order tied retrieval scores break by."""
    assert (BATCH_SIZE, WORKERS) == (64, 4)
    args = build_parser().parse_args(["--model", "m", "--output", "o"])
    assert (args.batch_size, args.workers) == (BATCH_SIZE, WORKERS)
    labels = [i % 6 for i in range(83)]
    samples = [{"png": _png(_rgb(label), i), "cls": str(label).encode()} for i, label in enumerate(labels)]
    root = write_wds(tmp_path / "ordered", samples, "classification", COLORS, shards=6)
    shards = [labels[shard::6] for shard in range(6)]                         # write_wds deals samples round robin
    per_worker = [[x for shard in shards[w::4] for x in shard] for w in range(4)]
    batches = [[stream[i:i + 5] for i in range(0, len(stream), 5)] for stream in per_worker]
    expected = [batch for turn in range(max(map(len, batches))) for worker in batches if turn < len(worker)
                for batch in [worker[turn]]]
    loader = make_loader(open_dataset(root), lambda image: torch.zeros(1), batch_size=5, workers=4)
    assert [targets for _, targets in loader] == expected


# ------------------------------------------------------------------------------------------------ bad input


def _cls_set(root: Path, labels: list[int], classnames: list[str]) -> Path:
    samples = [{"png": _png(_rgb(0), i), "cls": str(label).encode()} for i, label in enumerate(labels)]
    return write_wds(root, samples, "classification", classnames, ["{c}"], shards=1)


def test_bad_inputs_raise_one_line_usage_errors(tiny, data, tmp_path: Path) -> None:
    cases = [
        (dict(zeroshot_data=[_cls_set(tmp_path / "a", [0, 1, 4], ["x", "y", "z"])]), r"label 4 does not match the 3"),
        (dict(zeroshot_data=[_cls_set(tmp_path / "b", [], ["x", "y"])]), r"empty"),
        (dict(zeroshot_data=[tmp_path / "nowhere"]), r"not found"),
        (dict(zeroshot_data=[data["ret"]]), r"is a retrieval data set.*--zeroshot-data"),
        (dict(retrieval_data=[data["cls"]]), r"is a classification data set"),
        (dict(zeroshot_data=[data["cls"], data["cls"]]), r"two data sets are named 'colors_cls'"),
        (dict(zeroshot_data=[data["cls"]], split="train"), r"no split 'train'.*it has test"),
        (dict(zeroshot_data=[data["cls"]], precision="fp8"), r"unknown precision 'fp8'"),
    ]
    (tmp_path / "f" / "c0").mkdir(parents=True)
    (tmp_path / "f" / "c1").mkdir()
    (tmp_path / "f" / "classnames.txt").write_text("one\n")
    cases.append((dict(zeroshot_data=[tmp_path / "f"]), r"1 class names for 2 class folders"))
    write_wds(tmp_path / "g", [{"png": _png(_rgb(0), 0)}], "classification", ["x"], shards=1)
    cases.append((dict(zeroshot_data=[tmp_path / "g"], workers=1), r"sample '000000' lacks 'cls'"))
    write_wds(tmp_path / "h", [{"png": b"not a png", "cls": b"0"}], "classification", ["x"], ["a {} photo"], shards=1)
    cases.append((dict(zeroshot_data=[tmp_path / "h"]), r"template 'a \{\} photo' has a placeholder other than \{c\}"))
    write_wds(tmp_path / "h2", [{"png": b"not a png", "cls": b"0"}], "classification", ["x"], shards=1)
    cases.append((dict(zeroshot_data=[tmp_path / "h2"]), r"0\.tar: sample '000000' has an unreadable image"))
    write_wds(tmp_path / "i", [], "classification", ["x"], shards=0)
    cases.append((dict(zeroshot_data=[tmp_path / "i"]), r"nshards\.txt: the data set is empty \(0 shards\)"))
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message) as error:
            evaluate(*tiny, **kwargs)
        assert "\n" not in str(error.value), str(error.value)


def test_open_dataset_reads_clip_benchmark_metadata(data) -> None:
    dataset = open_dataset(data["cls"])
    assert (dataset.name, dataset.benchmark_name, dataset.kind) == ("colors_cls", "wds/colors_cls", "classification")
    assert dataset.classnames == COLORS and dataset.templates[0] == "a photo of a {c} thing."
    assert [p.name for p in dataset.shards] == ["0.tar", "1.tar"]
    assert open_dataset(data["three"]).templates == openai_templates()       # no template file -> OpenAI's 80


# ------------------------------------------------------------------------------------------------ command line


def test_cli_end_to_end(tiny, data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, preprocess, tokenizer = tiny
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, checkpoint)
    out = tmp_path / "results"
    code = main(["--model", "clip-tiny", "--checkpoint", str(checkpoint), "--zeroshot-data", str(data["cls"]),
                 "--retrieval-data", str(data["ret"]), "--output", str(out), "--batch-size", "5", "--device", "cpu",
                 "--workers", "0"])
    assert code == 0
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == ["colors_cls_epoch_1.pt_clip-tiny_en_zeroshot_classification.json",
                                       "colors_ret_epoch_1.pt_clip-tiny_en_zeroshot_retrieval.json"]
    results = [json.loads(f.read_text()) for f in files]
    assert results[0]["dataset"] == "wds/colors_cls" and results[1]["task"] == "zeroshot_retrieval"
    assert {k for r in results for k in r} == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    expected = evaluate(model, preprocess, tokenizer, zeroshot_data=[data["cls"]], retrieval_data=[data["ret"]])
    assert results[0]["metrics"] == pytest.approx({k.split("/")[-1]: v for k, v in expected.items()
                                                   if k.startswith("zeroshot/")}, abs=1e-12)
    assert results[1]["metrics"] == pytest.approx({k.split("/")[-1]: v for k, v in expected.items()
                                                   if k.startswith("retrieval/")}, abs=1e-6)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("wds/colors_cls: acc1 ")


def test_cli_bad_input_exits_2_with_one_line(data, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["eval", "--model", "clip-tiny", "--zeroshot-data", str(tmp_path / "missing"),
                     "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    bad = tmp_path / "other.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, bad)
    assert cli.main(["eval", "--model", "clip-tiny", "--checkpoint", str(bad), "--zeroshot-data", str(data["cls"]),
                     "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clip-glofnd eval: error: checkpoint") and "\n" not in error


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom clip_glofnd import eval_cli, model\n"
            "try:\n    eval_cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--zeroshot-data" in result.stdout
