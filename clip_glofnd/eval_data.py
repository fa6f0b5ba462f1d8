"""Zero-shot data sets on disk, read as CLIP_benchmark reads them (for clip_glofnd/evaluate.py).

Layouts: CLIP_benchmark's local `wds/` layout (SPLIT/nshards.txt, SPLIT/{0..n-1}.tar, classnames.txt,
zeroshot_classification_templates.txt, dataset_type.txt) or an ImageNet-style folder of class subfolders with
classnames.txt (1,000 folders without one get the packaged ImageNet-1k names).

Samples are read and batched as CLIP_benchmark's loader does (shards in order; with n workers worker i reads shards
i, i + n, ... and batches arrive in turn), so `--batch-size B --workers W` gives its numbers for `--batch_size B
--num_workers W` (clip_glofnd/evaluate.py says why the order matters).
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_glofnd.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"
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
