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

Data: CLIP_benchmark's local `wds/` layout or an ImageNet-style folder of class subfolders, read by
clip_glofnd/eval_data.py. Results take CLIP_benchmark's JSON shape (`result_record`, one file per (dataset, task));
the `clip-glofnd eval` command that writes them is clip_glofnd/eval_cli.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_glofnd.errors import UsageError
from clip_glofnd.eval_data import EvalDataset, make_loader, open_dataset
from clip_glofnd.model import PRECISIONS

if TYPE_CHECKING:
    from torch import Tensor, nn

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
RECALL_K = (1, 5, 10)
BATCH_SIZE, WORKERS = 64, 4   # CLIP_benchmark's --batch_size / --num_workers defaults: the same tie order (see above)


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


# ---------------------------------------------------------------------------------------------------- result files


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
