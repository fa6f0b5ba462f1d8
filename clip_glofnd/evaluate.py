"""Zero-shot classification and retrieval that give CLIP_benchmark's numbers, cheap enough to run during training.

The definitions are CLIP_benchmark 1.6.2's (clip_benchmark/metrics/zeroshot_classification.py and
zeroshot_retrieval.py), kept to the last bit in fp32:
- classifier: per class, the mean of the L2-normalised text embeddings of its templates, renormalised;
  logits = 100 · image @ W.
- `acc1`, `acc5`: the target is among `torch.topk(logits, 5)` (acc1 = its first column; `topk(1)` and acc5 = NaN
  with fewer than 5 class names); `mean_per_class_recall`: balanced accuracy of `argmax` (scikit-learn's
  `balanced_accuracy_score`: mean recall over the classes present in the targets).
- `image_retrieval_recall@k` (text → image): a caption hits when its image is in `topk(k)` of its row, averaged over
  captions; `text_retrieval_recall@k` (image → text): an image hits when any of its captions is in `topk(k)` of its
  row, averaged over images. Ties are whatever `torch.topk` returns on the same score rows, as in CLIP_benchmark.
Retrieval scores are computed on the CPU in row chunks (memory O(chunk · N), never N_text × N_image) from the same
matrix product CLIP_benchmark uses (texts @ images.T on the CPU), so they are the same numbers on any device.
Samples are read and batched as CLIP_benchmark's loader does (shards in order; with n workers worker i reads shards
i, i + n, ... and batches arrive in turn), so `--batch-size B --workers W` gives its numbers for `--batch_size B
--num_workers W`; the defaults are CLIP_benchmark's (64, 4), so the two agree without flags. Where captions repeat
exactly, ties broken by last-bit differences between batchings can move retrieval numbers slightly when B or W change,
in both tools.

Data: CLIP_benchmark's local `wds/` layout (SPLIT/nshards.txt, SPLIT/{0..n-1}.tar, classnames.txt,
zeroshot_classification_templates.txt, dataset_type.txt) or an ImageNet-style folder of class subfolders with
classnames.txt (1,000 folders without one get the packaged ImageNet-1k names). `clip-glofnd eval` writes one
CLIP_benchmark-shaped JSON per (dataset, task); with `--suite` it runs a whole benchmark suite (clip_glofnd/suite.py).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_glofnd.errors import UsageError
from clip_glofnd.model import PRECISIONS

if TYPE_CHECKING:
    from torch import Tensor, nn

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"
CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
RECALL_K = (1, 5, 10)
BATCH_SIZE, WORKERS = 64, 4   # CLIP_benchmark's --batch_size / --num_workers defaults: the same tie order (see above)
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference within a sample


def read_lines(path: Path) -> list[str]:
    """Lines of a class-name or template file, stripped, as CLIP_benchmark reads them."""
    return [line.strip() for line in path.read_text().splitlines()]


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet-1k class names (open_clip.IMAGENET_CLASSNAMES, written out)."""
    return read_lines(RESOURCES / "imagenet_classnames.txt")


def openai_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates with a "{c}" placeholder (open_clip.OPENAI_IMAGENET_TEMPLATES)."""
    return read_lines(RESOURCES / "openai_templates.txt")


# ---------------------------------------------------------------------------------------------------- data sets


@dataclass
class EvalDataset:
    """One zero-shot data set on disk."""

    name: str                    # short name: the folder's basename ("digits_cls")
    benchmark_name: str          # CLIP_benchmark's --dataset ("wds/digits_cls")
    root: Path
    kind: str                    # "classification" | "retrieval"
    shards: list[Path] | None    # wds tar files, in CLIP_benchmark's order; None for a folder of class subfolders
    classnames: list[str] | None = None
    templates: list[str] | None = None


def _wds_shards(root: Path, split: str) -> list[Path]:
    """SPLIT/{0..n-1}.tar named by SPLIT/nshards.txt."""
    nshards_file = root / split / "nshards.txt"
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        raise UsageError(f"{nshards_file}: expected the number of shards, got {nshards_file.read_text()[:40]!r}") \
            from None
    shards = [root / split / f"{index}.tar" for index in range(nshards)]
    if not shards:
        raise UsageError(f"{nshards_file}: the data set is empty ({nshards} shards)")
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise UsageError(f"{nshards_file} says {nshards} shards but {missing[0]} is missing")
    return shards


def _open_wds(root: Path, split: str) -> EvalDataset:
    """CLIP_benchmark's local wds layout (clip_benchmark.datasets.builder.build_wds_dataset)."""
    type_file = root / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise UsageError(f"{type_file}: dataset type {kind!r} is not supported; use classification or retrieval")
    name = root.resolve().name
    dataset = EvalDataset(name, f"wds/{name}", root, kind, _wds_shards(root, split))
    if kind == "classification":
        if not (root / "classnames.txt").is_file():
            raise UsageError(f"{root}: classnames.txt is missing (one class name per line, line i = label i)")
        dataset.classnames = read_lines(root / "classnames.txt")
        dataset.templates = _templates(root)
    return dataset


def _templates(root: Path) -> list[str]:
    """zeroshot_classification_templates.txt beside the data, else the 80 OpenAI templates."""
    path = root / "zeroshot_classification_templates.txt"
    if not path.is_file():
        logger.info("%s: no %s, using the 80 OpenAI ImageNet templates", root, path.name)
        return openai_templates()
    templates = read_lines(path)
    for template in templates:
        try:
            template.format(c="x")
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"{path}: template {template!r} has a placeholder other than {{c}}") from None
    return templates


def _open_folder(root: Path) -> EvalDataset:
    """ImageNet-style folder: one subfolder per class (sorted = label order) and classnames.txt."""
    folders = sorted(path.name for path in root.iterdir() if path.is_dir())
    if (root / "classnames.txt").is_file():
        classnames = read_lines(root / "classnames.txt")
    elif len(folders) == 1000:
        classnames = imagenet_classnames()
    else:
        raise UsageError(f"{root}: {len(folders)} class folders but no classnames.txt; write one class name per line "
                         f"in the sorted order of the folders")
    if len(classnames) != len(folders):
        raise UsageError(f"{root}: {len(classnames)} class names for {len(folders)} class folders; they must match")
    name = root.resolve().name
    return EvalDataset(name, name, root, "classification", None, classnames, _templates(root))


def open_dataset(path: str | Path, split: str = "test") -> EvalDataset:
    """Recognise a data set's layout and read its metadata (the images are read later, by `make_loader`)."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"data set {path} not found (expected a directory)")
    if (root / split / "nshards.txt").is_file():
        return _open_wds(root, split)
    splits = sorted(child.name for child in root.iterdir() if (child / "nshards.txt").is_file())
    if splits:
        raise UsageError(f"{root}: no split {split!r} ({split}/nshards.txt); it has {', '.join(splits)}")
    if any(child.is_dir() for child in root.iterdir()):
        return _open_folder(root)
    raise UsageError(f"{root}: neither CLIP_benchmark's wds layout ({split}/nshards.txt) nor a folder of class "
                     f"subfolders")


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's key/extension split: key = path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one tar, in tar order, grouped by consecutive key as webdataset does."""
    key, members = None, {}
    try:
        with tarfile.open(shard) as tar:
            for info in tar:
                prefix, extension = _split_name(info.name)
                if not info.isreg() or prefix is None or re.search(r"__[^/]*__($|/)", info.name):
                    continue
                if prefix != key and members:
                    yield key, members
                    members = {}
                key = prefix
                members[extension] = tar.extractfile(info).read()
    except tarfile.TarError as error:
        raise UsageError(f"{shard}: not a readable tar file ({error})") from None
    if members:
        yield key, members


def _decode(shard: Path, key: str, members: dict[str, bytes], kind: str) -> tuple[Any, int | list[str]]:
    """(PIL RGB image, label or captions) of one wds sample; a missing member names the shard and key."""
    from PIL import Image
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    field = "cls" if kind == "classification" else "txt"
    if image is None or field not in members:
        raise UsageError(f"{shard}: sample {key!r} lacks {'an image' if image is None else field!r} "
                         f"(has {', '.join(sorted(members))})")
    try:
        target = int(members[field]) if field == "cls" else members[field].decode("utf-8").splitlines()
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{shard}: sample {key!r} has an unreadable .{field}: {members[field][:40]!r}") from None
    try:
        with io.BytesIO(image) as stream:
            return Image.open(stream).convert("RGB"), target
    except OSError as error:   # PIL.UnidentifiedImageError, truncated file
        raise UsageError(f"{shard}: sample {key!r} has an unreadable image ({error})") from None


def _wds_dataset(shards: list[Path], kind: str, transform: Callable):
    """torch IterableDataset over wds shards; loader worker i takes shards i, i + n, ... as webdataset's splitter."""
    import torch

    class WdsDataset(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[tuple[Tensor, int | list[str]]]:
            worker = torch.utils.data.get_worker_info()
            mine = shards if worker is None else shards[worker.id::worker.num_workers]
            for shard in mine:
                for key, members in _tar_samples(shard):
                    image, target = _decode(shard, key, members, kind)
                    yield transform(image), target

    return WdsDataset()


def _collate(batch: list[tuple[Tensor, Any]]) -> tuple[Tensor, list]:
    """Stack images; keep targets (labels or caption lists) as a list."""
    import torch
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def make_loader(dataset: EvalDataset, transform: Callable, *, batch_size: int, workers: int):
    """DataLoader of (images [b, 3, H, W], targets) in the data set's order (shards split across workers)."""
    import torch
    from torchvision.datasets import ImageFolder
    try:
        source = (ImageFolder(str(dataset.root), transform=transform) if dataset.shards is None
                  else _wds_dataset(dataset.shards, dataset.kind, transform))
    except FileNotFoundError as error:   # ImageFolder: a class folder without images
        raise UsageError(f"{dataset.root}: {error}") from None
    return torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=_collate)


def _batches(loader, desc: str) -> Iterator[tuple[Tensor, list]]:
    """Loader batches under a progress bar; a UsageError raised in a loader worker comes back as one line."""
    from tqdm import tqdm
    try:
        yield from tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    except UsageError as error:
        raise UsageError(str(error).strip().splitlines()[-1].removeprefix("clip_glofnd.errors.UsageError: ")) \
            from None


# ---------------------------------------------------------------------------------------------------- metrics


class ClassificationMeter:
    """Running counts for acc1, acc5 and mean_per_class_recall (CLIP_benchmark's definitions, see module doc)."""

    def __init__(self, num_classes: int) -> None:
        import torch
        self.num_classes = num_classes
        self.topk = 5 if num_classes >= 5 else 1
        self.correct = torch.zeros(self.topk, dtype=torch.long)    # [topk] hits at rank ≤ r
        self.per_class = torch.zeros(2, num_classes, dtype=torch.long)   # [2, C] (argmax hits, samples) per class
        self.count = 0

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add a batch: logits [b, C] float32 on CPU, targets [b] int64."""
        import torch
        if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < self.num_classes:
            bad = int(targets.max() if targets.max() >= self.num_classes else targets.min())
            raise UsageError(f"label {bad} does not match the {self.num_classes} class names (labels must be in "
                             f"[0, {self.num_classes}))")
        pred = logits.topk(self.topk, 1, True, True).indices                       # [b, topk] CLIP_benchmark's call
        ranks = (pred == targets[:, None]).long().cumsum(1).clamp(max=1)           # [b, topk] hit within first r+1
        self.correct += ranks.sum(0)
        hits = logits.argmax(1) == targets                                         # [b] argmax, as for balanced acc
        self.per_class[0] += torch.bincount(targets[hits], minlength=self.num_classes)
        self.per_class[1] += torch.bincount(targets, minlength=self.num_classes)
        self.count += len(targets)

    def compute(self) -> dict[str, float]:
        """acc1, acc5 (NaN with < 5 classes), mean_per_class_recall, bit-equal to CLIP_benchmark's."""
        import numpy as np
        hits, samples = self.per_class.numpy()
        present = samples > 0
        return {"acc1": int(self.correct[0]) / self.count,
                "acc5": int(self.correct[4]) / self.count if self.topk == 5 else math.nan,
                "mean_per_class_recall": float(np.mean(hits[present] / samples[present]))}


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_image: Tensor, *, recall_k: Sequence[int] = RECALL_K,
                      chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k both ways from L2-normalised embeddings; text_image[t] = index of caption t's image.

    Scores are `text_emb @ image_emb.T` sliced in chunks of `chunk_size` rows (text → image) or columns
    (image → text), never the whole [N_text, N_image] matrix. A k above the number of candidates counts all of them.
    """
    import torch
    n_text, n_image = len(text_emb), len(image_emb)
    text_hits = {k: [] for k in recall_k}
    image_hits = {k: [] for k in recall_k}
    for start in range(0, n_text, chunk_size):
        scores = text_emb[start:start + chunk_size] @ image_emb.T                 # [c, N_image] rows = captions
        positive = text_image[start:start + chunk_size, None]                     # [c, 1]
        for k in recall_k:
            top = scores.topk(min(k, n_image), dim=1).indices                     # [c, k]
            text_hits[k].append((top == positive).any(1).cpu())
    for start in range(0, n_image, chunk_size):
        scores = (text_emb @ image_emb[start:start + chunk_size].T).T             # [c, N_text] view, rows = images
        own = torch.arange(start, start + len(scores), device=scores.device)[:, None]   # [c, 1]
        for k in recall_k:
            top = scores.topk(min(k, n_text), dim=1).indices                      # [c, k] caption indices
            image_hits[k].append((text_image[top] == own).any(1).cpu())
    metrics = {}
    for k in recall_k:   # float32 mean, as CLIP_benchmark's `.float().mean().item()`
        metrics[f"image_retrieval_recall@{k}"] = torch.cat(text_hits[k]).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = torch.cat(image_hits[k]).float().mean().item()
    return metrics


def main_metric_names(task: str) -> tuple[str, ...]:
    """Metrics a suite may average for `task`: CLIP_benchmark's, plus DataComp's `mean_recall@1` for retrieval."""
    if task == CLASSIFICATION:
        return "acc1", "acc5", "mean_per_class_recall"
    return ("mean_recall@1", *(f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in RECALL_K))


def with_mean_recall(metrics: dict[str, float]) -> dict[str, float]:
    """Retrieval metrics plus DataComp's `mean_recall@1` = (image R@1 + text R@1) / 2 (its eval_utils/retr_eval.py);
    classification metrics unchanged."""
    if "image_retrieval_recall@1" not in metrics:
        return dict(metrics)
    mean = 0.5 * (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"])
    return {**metrics, "mean_recall@1": mean}


# ---------------------------------------------------------------------------------------------------- model side


def _precision(precision: str, device: str) -> tuple[Callable, Any]:
    """(autocast context factory, input dtype) from OpenCLIP's own helpers, as its trainer uses them."""
    import torch
    from open_clip import get_input_dtype
    from open_clip_train.precision import get_autocast
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return get_autocast(precision, device_type=torch.device(device).type), get_input_dtype(precision)


def build_classifier(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], *,
                     device: str = "cpu", autocast: Callable = nullcontext) -> Tensor:
    """Zero-shot weights [d, C]: per class, mean of normalised template embeddings, renormalised (one batch/class)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    weights = []
    with torch.no_grad(), autocast():
        for classname in tqdm(classnames, desc="classifier", unit="class", leave=False, disable=None):
            tokens = tokenizer([template.format(c=classname) for template in templates]).to(device)   # [T, ctx]
            embedding = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)                   # [d]
            embedding /= embedding.norm()
            weights.append(embedding)
    return torch.stack(weights, dim=1)                                                               # [d, C]


def zeroshot_classification(model: nn.Module, loader, tokenizer: Callable, dataset: EvalDataset, *,
                            device: str = "cpu", precision: str = "fp32") -> dict[str, float]:
    """acc1, acc5, mean_per_class_recall of one classification data set."""
    import torch
    import torch.nn.functional as F
    autocast, input_dtype = _precision(precision, device)
    classifier = build_classifier(model, tokenizer, dataset.classnames, dataset.templates, device=device,
                                  autocast=autocast)                                                 # [d, C]
    meter = ClassificationMeter(len(dataset.classnames))
    with torch.no_grad():
        for images, labels in _batches(loader, dataset.name):
            with autocast():
                features = F.normalize(model.encode_image(images.to(device, dtype=input_dtype)), dim=-1)   # [b, d]
                logits = 100.0 * features @ classifier                                             # [b, C]
            try:
                meter.update(logits.float().cpu(), torch.as_tensor(labels, dtype=torch.long))
            except UsageError as error:
                raise UsageError(f"{dataset.root}: {error}") from None
    if not meter.count:
        raise UsageError(f"{dataset.root}: the data set is empty")
    return meter.compute()


def zeroshot_retrieval(model: nn.Module, loader, tokenizer: Callable, dataset: EvalDataset, *, device: str = "cpu",
                       precision: str = "fp32", chunk_size: int = 1024) -> dict[str, float]:
    """image_retrieval_recall@k and text_retrieval_recall@k, k = 1, 5, 10, of one retrieval data set."""
    import torch
    import torch.nn.functional as F
    autocast, input_dtype = _precision(precision, device)
    image_emb, text_emb, text_image = [], [], []
    with torch.no_grad():
        for images, captions in _batches(loader, dataset.name):
            first = sum(len(batch) for batch in image_emb)
            texts = [text for caps in captions for text in caps]
            text_image += [first + i for i, caps in enumerate(captions) for _ in caps]
            with autocast():   # embeddings kept on the CPU and scored there, as CLIP_benchmark does
                image_emb.append(F.normalize(model.encode_image(images.to(device, dtype=input_dtype)), dim=-1).cpu())
                if texts:
                    text_emb.append(F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1).cpu())
    if not image_emb or not text_emb:
        raise UsageError(f"{dataset.root}: the data set is empty (no {'images' if not image_emb else 'captions'})")
    return retrieval_metrics(torch.cat(image_emb), torch.cat(text_emb), torch.tensor(text_image), chunk_size=chunk_size)


def evaluate_dataset(model: nn.Module, preprocess: Callable, tokenizer: Callable, dataset: EvalDataset, *,
                     device: str = "cpu", precision: str = "fp32", batch_size: int = BATCH_SIZE,
                     workers: int = WORKERS) -> dict[str, float]:
    """CLIP_benchmark's metrics of one data set (classification or retrieval, by its kind)."""
    loader = make_loader(dataset, preprocess, batch_size=batch_size, workers=workers)
    if dataset.kind == "classification":
        return zeroshot_classification(model, loader, tokenizer, dataset, device=device, precision=precision)
    return zeroshot_retrieval(model, loader, tokenizer, dataset, device=device, precision=precision,
                              chunk_size=batch_size)


def open_datasets(zeroshot_data: Sequence[str | Path] = (), retrieval_data: Sequence[str | Path] = (), *,
                  split: str = "test") -> list[EvalDataset]:
    """Open and check every data set up front, so a bad path fails before any model work."""
    datasets = []
    for paths, kind, flag in ((zeroshot_data, "classification", "--zeroshot-data"),
                              (retrieval_data, "retrieval", "--retrieval-data")):
        for path in paths:
            dataset = open_dataset(path, split)
            if dataset.kind != kind:
                raise UsageError(f"{path} is a {dataset.kind} data set, not a {kind} one; check {flag}")
            datasets.append(dataset)
    names = [dataset.name for dataset in datasets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"two data sets are named {duplicates[0]!r} (the folder name); rename one folder")
    return datasets


def evaluate(model: nn.Module, preprocess: Callable, tokenizer: Callable, *, zeroshot_data: Sequence[str] = (),
             retrieval_data: Sequence[str] = (), device: str = "cpu", precision: str = "fp32",
             batch_size: int = BATCH_SIZE, workers: int = WORKERS, split: str = "test") -> dict[str, float]:
    """Flat metrics "zeroshot/<name>/acc1", ..., "retrieval/<name>/image_retrieval_recall@1", ... of a model.

    Works on the model in memory during training (eval mode inside, its previous mode restored) or on one made by
    `clip_glofnd.model.create_model`.
    """
    model = getattr(model, "module", model)    # DDP-wrapped during training
    datasets = open_datasets(zeroshot_data, retrieval_data, split=split)
    was_training = model.training
    model.eval()
    metrics = {}
    try:
        for dataset in datasets:
            prefix = "zeroshot" if dataset.kind == "classification" else "retrieval"
            result = evaluate_dataset(model, preprocess, tokenizer, dataset, device=device, precision=precision,
                                      batch_size=batch_size, workers=workers)
            metrics.update({f"{prefix}/{dataset.name}/{key}": value for key, value in result.items()})
    finally:
        model.train(was_training)
    return metrics


# ---------------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """Flags of `clip-glofnd eval` (names as CLIP_benchmark / OpenCLIP users type them)."""
    parser = argparse.ArgumentParser(prog="clip-glofnd eval", description="Zero-shot classification and retrieval "
                                     "of a checkpoint, with CLIP_benchmark's metrics and result files; --suite runs a "
                                     "whole benchmark suite (DataComp's 38 tasks, ImageNet and variants, ...) with "
                                     "group means, resumably, for one or several checkpoints.")
    parser.add_argument("--model", required=True, help="open_clip architecture, clip_glofnd config (clip-tiny) or "
                        "path to a JSON config")
    parser.add_argument("--checkpoint", "--pretrained", dest="checkpoint", nargs="+", default=None, metavar="CKPT",
                        help="checkpoint file (ours or any OpenCLIP file) or an OpenCLIP pretrained tag; default: "
                        "random init. With --suite: several files, or a run folder of `clip-glofnd train` (its "
                        "checkpoints/epoch_N.pt), one summary column each")
    parser.add_argument("--zeroshot-data", nargs="+", default=[], metavar="DIR",
                        help="classification sets: CLIP_benchmark wds/ layout or a folder of class subfolders")
    parser.add_argument("--retrieval-data", nargs="+", default=[], metavar="DIR",
                        help="retrieval sets: CLIP_benchmark wds/ layout with dataset_type.txt = retrieval")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the result files")
    parser.add_argument("--split", default="test", help="wds split folder to read")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per batch (and score rows per "
                        "chunk); with --workers it sets the order in which tied retrieval scores break (default: "
                        f"{BATCH_SIZE}, CLIP_benchmark's)")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"data loader processes (default: {WORKERS}, "
                        "CLIP_benchmark's)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 gives CLIP_benchmark's --no_amp numbers; amp = fp16 autocast")
    suite = parser.add_argument_group("benchmark suites", "results.jsonl, summary.md / .csv (main metric per task, "
                                      "group means, overall mean; one column per checkpoint) in --output")
    suite.add_argument("--suite", metavar="SUITE", help="packaged suite (datacomp, imagenet-variants, retrieval, "
                       "digits) or a YAML file with `tasks:`")
    suite.add_argument("--dataset-root", nargs="+", default=[], metavar="PATTERN",
                       help="where a suite's data sets are: a folder holding them by name (ROOT/vtab/caltech101) or "
                       "a pattern with CLIP_benchmark's {dataset} / {dataset_cleaned} placeholders, e.g. "
                       "'/data/wds_{dataset_cleaned}'; several patterns: the first that exists wins")
    suite.add_argument("--overwrite", action="store_true", help="recompute tasks that results.jsonl already holds "
                       "(default: skip them, so a rerun resumes)")
    suite.add_argument("--skip-missing", action="store_true", help="run the data sets that are there and mark the "
                       "missing ones in the summary (default: list them all and stop)")
    return parser


def result_record(dataset: str, model: str, checkpoint: str | None, task: str, metrics: dict[str, float]) -> dict:
    """One result in CLIP_benchmark's JSON shape (what `clip_benchmark build` merges)."""
    return {"dataset": dataset, "model": model, "pretrained": checkpoint, "task": task, "metrics": metrics,
            "language": "en"}


def result_file_name(dataset: str, pretrained: str, model: str, task: str) -> str:
    """CLIP_benchmark's default name: {dataset}_{pretrained}_{model}_{language}_{task}.json."""
    return f"{dataset}_{pretrained}_{Path(model).stem}_en_{task}.json"


def pretrained_slug(checkpoint: str | None) -> str:
    """The {pretrained} part of a result name: a checkpoint file's name, else the tag, else "random-init"."""
    return Path(checkpoint).name if checkpoint and Path(checkpoint).is_file() else checkpoint or "random-init"


def _summary(dataset: str, metrics: dict[str, float], seconds: float) -> str:
    """One line per data set."""
    shown = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
    return f"{dataset}: {shown} ({seconds:.1f} s)"


def main(argv: Sequence[str]) -> int:
    """`clip-glofnd eval`: evaluate, write one CLIP_benchmark-shaped JSON per (dataset, task), print summaries."""
    args = build_parser().parse_args(list(argv))
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be ≥ 1 and --workers ≥ 0")
    if args.suite:
        if args.zeroshot_data or args.retrieval_data:
            raise UsageError("--suite names its own data sets; drop --zeroshot-data / --retrieval-data (or write "
                             "them into a suite file)")
        from clip_glofnd.suite import suite_main
        return suite_main(args)
    if not args.zeroshot_data and not args.retrieval_data:
        raise UsageError("nothing to evaluate: pass --zeroshot-data and/or --retrieval-data, or --suite")
    if args.checkpoint and len(args.checkpoint) > 1:
        raise UsageError("several checkpoints (or a run folder) need --suite; evaluate one --checkpoint at a time "
                         "otherwise")
    checkpoint = args.checkpoint[0] if args.checkpoint else None
    datasets = open_datasets(args.zeroshot_data, args.retrieval_data, split=args.split)
    import torch
    from clip_glofnd.model import create_model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _, preprocess, tokenizer = create_model(args.model, checkpoint, device=device, precision=args.precision)
    model.eval()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        start = time.perf_counter()
        metrics = evaluate_dataset(model, preprocess, tokenizer, dataset, device=device, precision=args.precision,
                                   batch_size=args.batch_size, workers=args.workers)
        task = CLASSIFICATION if dataset.kind == "classification" else RETRIEVAL
        result = result_record(dataset.benchmark_name, args.model, checkpoint, task, metrics)
        name = result_file_name(dataset.name, pretrained_slug(checkpoint), args.model, task)
        (output / name).write_text(json.dumps(result) + "\n")
        print(_summary(dataset.benchmark_name, metrics, time.perf_counter() - start))
    return 0
