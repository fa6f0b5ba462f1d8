"""Write and check WebDataset shards with global sample ids (the data contract of DESIGN.md §2).

Three commands live here, each `main(argv) -> int` parses its flags before importing anything heavy:

- `clip-glofnd make-digits OUT_DIR`: scikit-learn's 1,797 handwritten digits as training shards with captions,
  plus a held-out split in CLIP_benchmark's local `wds/` layout (zero-shot classification and retrieval);
- `clip-glofnd make-shards IMAGES_DIR CAPTIONS OUT_DIR`: a folder of images + a CSV/TSV (path, caption) as shards;
- `clip-glofnd check-shards PATTERN [--deep]`: count, id range, holes, duplicates and per-shard counts of a shard
  pattern; `--deep` also decodes every image and caption as training does.

Shards follow img2dataset's layout: per sample `KEY.{png|jpg}`, `KEY.txt` (caption), `KEY.json` with the integer
`key` (the global id), optional `KEY.cls`. A `sizes.json` beside the shards maps shard file name -> sample count
(OpenCLIP reads that) and holds `num_samples` = size of the id space (max id + 1). Shards written here are
byte-identical for the same inputs and seed (fixed tar metadata, sorted members).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import tarfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clip_glofnd.errors import UsageError

logger = logging.getLogger(__name__)

SIZES_JSON = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ARCHIVE_EXTS = ("tar", "tgz", "tar.gz", "zip")      # a member with one of these: an archive of shards
DIGITS_IMAGE_SIZE = 64
DIGITS_TRAIN_SHARDS = 12
DIGITS_HELDOUT = 297
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# caption templates for the digits: {d} = "7", {w} = "seven"; several wordings so captions of one class differ
DIGIT_CAPTIONS = (
    "a handwritten {d}", "the digit {w}", "a photo of the number {d}", "a scanned handwritten digit {w}",
    "the number {w}, written by hand", "a low-resolution image of a {d}", "{w}", "a black and white picture of a {w}",
    "a hand-drawn numeral {d}", "a blurry {w} drawn with a pen", "digit: {d}", "someone wrote the number {w}",
)
DIGIT_ZEROSHOT_TEMPLATES = ("a handwritten {c}.", "the digit {c}.", "a photo of the number {c}.",
                            "a blurry image of the number {c}.", "{c}")
RETRIEVAL_CAPTIONS_PER_IMAGE = 5


# ----------------------------------------------------------------------------------------------------------------------
# reading: sources, id spaces, samples, ids

@dataclass(frozen=True)
class Shard:
    """One tar shard and the id range of its source."""

    url: str
    offset: int          # added to the shard's ids (start of its source's id range)
    size: int            # ids must lie in [0, size) before the offset
    count: int | None    # samples in the shard per sizes.json, None if unknown


class BadSample(Exception):
    """A sample (or shard) that breaks the data contract; `kind` names the problem (a key of the skip counts)."""

    def __init__(self, kind: str, shard: str, key: str | None, message: str) -> None:
        where = f"{shard}: sample {key!r}" if key is not None else shard
        super().__init__(f"{where}: {message}")
        self.kind = kind


def _local_path(url: str) -> str | None:
    """The file path of a local shard (plain path or file: URL), None for a remote URL or pipe:."""
    path = url[len("file:"):] if url.startswith("file:") else url
    return None if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path) and not re.match(r"^[a-zA-Z]:[\\/]", path) else path


def _sizes_path(url: str) -> Path | None:
    """The sizes.json beside a local shard, if it exists."""
    path = _local_path(url)
    candidate = Path(path).parent / SIZES_JSON if path else None
    return candidate.resolve() if candidate is not None and candidate.is_file() else None


def missing_local_shards(shards: Sequence[Shard]) -> list[str]:
    """URLs of local shards whose file does not exist (remote ones are not checked)."""
    return [s.url for s in shards if (path := _local_path(s.url)) is not None and not Path(path).exists()]


def read_sizes(path: str | Path) -> dict:
    """A sizes.json: {shard file name: sample count, ..., "num_samples": max id + 1}."""
    try:
        sizes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: cannot read {SIZES_JSON} ({error}); expected {{\"00000.tar\": count, ..., "
                         f"\"num_samples\": max id + 1}}") from error
    if not isinstance(sizes, dict):
        raise UsageError(f"{path}: {SIZES_JSON} must hold an object {{\"00000.tar\": count, ..., \"num_samples\": n}}")
    return sizes


def expand_sources(pattern: str) -> list[list[str]]:
    """Shard URLs of each `::`-separated source of `pattern`, brace patterns expanded."""
    import braceexpand
    sources = [list(braceexpand.braceexpand(part.strip())) for part in pattern.split("::") if part.strip()]
    if not sources:
        raise UsageError(f"empty shard pattern {pattern!r}; expected e.g. /data/cc3m/{{00000..00331}}.tar")
    return sources


def _id_spaces(sources: list[list[str]], num_samples: int | None) -> tuple[dict, dict]:
    """Offset and size of each id space, keyed by its sizes.json path (None: sources without one)."""
    sizes = {}
    for urls in sources:
        path = _sizes_path(urls[0])
        if path not in sizes:
            sizes[path] = None if path is None else read_sizes(path).get("num_samples")
    if len(sizes) == 1:
        path = next(iter(sizes))
        size = num_samples if num_samples is not None else sizes[path]
        if size is None:
            where = f"{path} has no \"num_samples\"" if path else f"no {SIZES_JSON} beside {sources[0][0]}"
            raise UsageError(f"{where}: pass --num-samples (max id + 1) or write {SIZES_JSON} with \"num_samples\" "
                             f"(clip-glofnd check-shards PATTERN prints the id range)")
        return {path: 0}, {path: int(size)}
    missing = [str(p) for p, n in sizes.items() if n is None]
    if missing:
        raise UsageError(f"{len(sizes)} sources with different id spaces need \"num_samples\" in each {SIZES_JSON}; "
                         f"missing for {missing}")
    offsets, total = {}, 0
    for path, size in sizes.items():
        offsets[path], total = total, total + int(size)
    if num_samples is not None and num_samples != total:
        raise UsageError(f"num_samples={num_samples} but the sources' {SIZES_JSON} files add up to {total} ids")
    return offsets, {p: int(n) for p, n in sizes.items()}


def resolve_shards(pattern: str, num_samples: int | None = None) -> tuple[list[Shard], int]:
    """All shards of `pattern` with their id offsets, and the total id-space size.

    Sources (`::`-separated) that share one sizes.json share one id space; sources with different sizes.json files
    get consecutive id ranges in the order they appear. `num_samples`, when given, overrides a single id space.
    """
    sources = expand_sources(pattern)
    offsets, sizes = _id_spaces(sources, num_samples)
    if min(sizes.values()) < 1:
        raise UsageError(f"num_samples must be >= 1 for {pattern!r}, got {sizes}")
    shards = []
    for urls in sources:
        path = _sizes_path(urls[0])
        counts = read_sizes(path) if path else {}
        for url in urls:
            count = counts.get(url.rsplit("/", 1)[-1])
            shards.append(Shard(url, offsets[path], sizes[path], None if count is None else int(count)))
    return shards, sum(sizes.values())


def _open(url: str):
    """A binary stream of a shard: local files directly (seekable), anything else through webdataset's gopen."""
    path = _local_path(url)
    if path is not None:
        return open(path, "rb")
    import webdataset as wds
    return wds.gopen(url, "rb")


def _not_a_tar(shard: Shard, error: Exception) -> BadSample:
    """One line for a file that tarfile cannot open (tarfile's own message spans lines, one per compression)."""
    path = _local_path(shard.url)
    if path is not None:
        with open(path, "rb") as f:
            head = f.read(16)
        what = "an empty file" if not head else f"{Path(path).stat().st_size} bytes starting {head!r}"
    else:
        what = str(error).splitlines()[0]
    return BadSample("unreadable_shard", shard.url, None, f"not a tar archive: {what}; shards must be WebDataset "
                     f".tar files (or .tar.gz): re-download or rebuild it")


def tar_members(shard: Shard, wanted: Collection[str] | None = None) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each regular file of a shard in tar order; a broken tar raises BadSample.

    Only extensions in `wanted` (all if None) are read; the others come with b"" (local shards skip them by seeking).
    A missing file or one that is not a tar is an `unreadable_shard`; a tar that breaks off is a `truncated_shard`;
    a tar of tars (an archive of shards, e.g. a .tgz of the shard folder) is an `unreadable_shard`.
    """
    key = None
    try:
        stream = _open(shard.url)
    except Exception as error:
        hint = "; check the shard pattern" if isinstance(error, FileNotFoundError) else ""
        raise BadSample("unreadable_shard", shard.url, None, f"cannot open shard ({error}){hint}") from error
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:*" if stream.seekable() else "r|*")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise _not_a_tar(shard, error) from error
        with tar:
            for info in tar:
                match = re.match(r"^((?:.*/|)[^./]+)[.]([^/]*)$", info.name)   # webdataset's base_plus_ext
                if info.isreg() and match:
                    key, ext = match.group(1), match.group(2).lower()
                    if ext in ARCHIVE_EXTS:
                        raise BadSample("unreadable_shard", shard.url, None, f"holds the archive {info.name!r}, not "
                                        f"samples: is it an archive of shards? Unpack it and name the .tar files "
                                        f"inside in the pattern")
                    yield key, ext, tar.extractfile(info).read() if wanted is None or ext in wanted else b""
                tar.members = []                                               # do not keep every header
    except (tarfile.TarError, OSError, EOFError) as error:
        raise BadSample("truncated_shard", shard.url, key, f"truncated or corrupt tar after this sample "
                        f"({' '.join(str(error).split())}); re-download the shard (or skip bad samples)") from error
    finally:
        stream.close()


def iter_samples(shard: Shard, wanted: Collection[str] | None = None) -> Iterator[dict]:
    """Raw samples {"__key__", ext: bytes} of one shard; grouping restarts at every shard, unlike webdataset 0.2.86."""
    sample: dict = {}
    for key, ext, data in tar_members(shard, wanted):
        if sample and (key != sample["__key__"] or ext in sample):
            yield sample
            sample = {}
        sample.setdefault("__key__", key)
        sample[ext] = data
    if sample:
        yield sample


def read_caption(sample: dict, caption_key: str, shard: Shard) -> str:
    """Caption from the `txt` member (or another member), or from a json field with caption_key='json:FIELD'.

    The bytes must be UTF-8 (as in json members): anything else is a `non_utf8_caption`, not a caption with U+FFFD.
    """
    key = sample["__key__"]
    if caption_key.startswith("json:"):
        field_name = caption_key[len("json:"):]
        try:
            value = json.loads(sample["json"]).get(field_name) if "json" in sample else None
        except (ValueError, AttributeError):
            value = None
    else:
        value = sample.get(caption_key)
        try:
            value = value.decode("utf-8") if isinstance(value, bytes) else None
        except UnicodeDecodeError as error:
            raise BadSample("non_utf8_caption", shard.url, key, f"{caption_key} member is not UTF-8 ({error}); "
                            f"re-encode the captions as UTF-8 or pass --skip-bad-samples") from error
    if not isinstance(value, str) or not value.strip():
        raise BadSample("missing_caption", shard.url, key, f"no caption under {caption_key!r} (or it is empty); set "
                        f"caption_key (e.g. 'txt' or 'json:caption') or pass --skip-bad-samples")
    return value.strip()


def read_label(sample: dict, shard: Shard) -> int:
    """The sample's integer class from its `cls` member, -1 without one."""
    if "cls" not in sample:
        return -1
    try:
        return int(sample["cls"].decode().strip())
    except ValueError as error:                                       # UnicodeDecodeError is a ValueError too
        raise BadSample("bad_label", shard.url, sample["__key__"], f"cls {sample['cls'][:20]!r} is not an "
                        f"integer") from error


def decode_image(sample: dict, shard: Shard):
    """The sample's image as an RGB PIL image (first of jpg, jpeg, png, webp), fully decoded."""
    from PIL import Image
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_image", shard.url, sample["__key__"], f"no image member ({'|'.join(IMAGE_EXTS)}); "
                        f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            return image.convert("RGB")
    except Exception as error:
        raise BadSample("unreadable_image", shard.url, sample["__key__"], f"cannot decode {ext} ({error})") from error


def parse_id(sample: dict, shard: Shard) -> int:
    """Global id of a raw sample: json `key` (int or digit string), else `__key__` as an integer; range-checked."""
    key = sample["__key__"]
    local, source = None, "__key__"
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as error:
            raise BadSample("bad_json", shard.url, key, f"unreadable json member ({error})") from error
        if isinstance(meta, dict) and "key" in meta:
            local, source = meta["key"], "json key"
    if local is None:
        local = key.rsplit("/", 1)[-1]
    if isinstance(local, str) and local.isascii() and local.isdigit():
        local = int(local)
    if not isinstance(local, int) or isinstance(local, bool):
        raise BadSample("bad_key", shard.url, key, f"{source} {local!r} is not an integer; global ids must be "
                        f"integers (img2dataset keys, or shards from `clip-glofnd make-shards`)")
    if not 0 <= local < shard.size:
        raise BadSample("id_out_of_range", shard.url, key, f"has id {local} outside [0, {shard.size}); pass "
                        f"num_samples > {local} or fix {SIZES_JSON} (clip-glofnd check-shards PATTERN)")
    return shard.offset + local


# ----------------------------------------------------------------------------------------------------------------------
# writing

class ShardWriter:
    """Writes samples into numbered tar shards of `shard_size` samples; deterministic bytes (mtime 0, sorted members).

    `name_format` gives shard file names from the shard index ("{:05d}.tar" as img2dataset; "{}.tar" for
    CLIP_benchmark). `counts` maps written shard file names to their sample counts.
    """

    def __init__(self, out_dir: str | Path, shard_size: int, name_format: str = "{:05d}.tar") -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.shard_size, self.name_format = Path(out_dir), shard_size, name_format
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""

    def write(self, key: str, members: dict[str, bytes | str]) -> None:
        """Add one sample: `members` maps extension ("png", "txt", "json", "cls") to its content."""
        if self._tar is None or self.counts[self._name] >= self.shard_size:
            self._open_next()
        for ext in sorted(members):
            data = members[ext].encode("utf-8") if isinstance(members[ext], str) else members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self.counts[self._name] += 1

    def _open_next(self) -> None:
        self.close()
        self._name = self.name_format.format(len(self.counts))
        self._tar = tarfile.open(self.out_dir / self._name, "w", format=tarfile.USTAR_FORMAT)
        self.counts[self._name] = 0

    def close(self) -> None:
        """Finish the current shard."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_sizes_json(out_dir: str | Path, counts: dict[str, int], num_samples: int) -> Path:
    """Write `sizes.json`: {shard file name: sample count, ..., "num_samples": id-space size (max id + 1)}."""
    path = Path(out_dir) / SIZES_JSON
    path.write_text(json.dumps({**counts, "num_samples": num_samples}, indent=1, sort_keys=True) + "\n")
    return path


def brace_pattern(out_dir: str | Path, counts: dict[str, int]) -> str:
    """The brace pattern `out_dir/{00000..00011}.tar` naming the shards in `counts` (img2dataset numbering)."""
    names = sorted(counts)
    stems = [Path(n).stem for n in names]
    if len(names) == 1:
        return str(Path(out_dir) / names[0])
    return f"{Path(out_dir)}/{{{stems[0]}..{stems[-1]}}}.tar"


def sample_members(image: bytes, image_ext: str, caption: str, gid: int, label: int | None = None,
                   **extra: object) -> dict[str, bytes | str]:
    """The tar members of one sample in img2dataset's layout: image, `txt`, `json` with integer `key`, `cls`."""
    meta = {"key": gid, "caption": caption, **({} if label is None else {"label": label}), **extra}
    members: dict[str, bytes | str] = {image_ext: image, "txt": caption, "json": json.dumps(meta, sort_keys=True)}
    if label is not None:
        members["cls"] = str(label)
    return members


# ----------------------------------------------------------------------------------------------------------------------
# digits

def digit_image_png(pixels, size: int = DIGITS_IMAGE_SIZE) -> bytes:
    """An 8x8 sklearn digit (values 0..16) as a `size` px RGB PNG: dark ink on white paper, bicubic upscale."""
    import numpy as np
    from PIL import Image
    grey = (255 - np.asarray(pixels, dtype=np.float64).reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
    image = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def digit_captions(label: int, rng, k: int) -> list[str]:
    """`k` distinct captions for a digit, drawn from DIGIT_CAPTIONS with `rng` (numpy Generator)."""
    picks = rng.choice(len(DIGIT_CAPTIONS), size=k, replace=False)
    return [DIGIT_CAPTIONS[i].format(d=label, w=DIGIT_WORDS[label]) for i in picks]


def split_digits(labels, seed: int, heldout: int = DIGITS_HELDOUT) -> tuple[list[int], list[int]]:
    """Stratified train / held-out split of sample indices, both in a seeded random order."""
    from sklearn.model_selection import train_test_split
    train, test = train_test_split(list(range(len(labels))), test_size=heldout, stratify=labels, random_state=seed)
    return [int(i) for i in train], [int(i) for i in test]


def write_clip_benchmark_dir(out_dir: Path, kind: str, samples: list[dict[str, bytes | str]], keys: list[str],
                             shard_size: int) -> None:
    """One data set in CLIP_benchmark's local `wds/` layout (read by clip_benchmark.datasets.builder.build_wds_dataset).

    `test/{0..N-1}.tar` + `test/nshards.txt`; `dataset_type.txt` says classification or retrieval; classification
    sets add `classnames.txt` and `zeroshot_classification_templates.txt` ({c} = class name, one per line).
    """
    with ShardWriter(out_dir / "test", shard_size, name_format="{}.tar") as writer:
        for key, members in zip(keys, samples):
            writer.write(key, members)
    (out_dir / "test" / "nshards.txt").write_text(f"{len(writer.counts)}\n")
    (out_dir / "dataset_type.txt").write_text(f"{kind}\n")
    if kind == "classification":
        (out_dir / "classnames.txt").write_text("".join(f"{w}\n" for w in DIGIT_WORDS))
        templates = "".join(f"{t}\n" for t in DIGIT_ZEROSHOT_TEMPLATES)
        (out_dir / "zeroshot_classification_templates.txt").write_text(templates)


def make_digits(out_dir: str | Path, seed: int = 0) -> dict:
    """Write scikit-learn's handwritten digits as WebDataset shards: a training set and CLIP_benchmark eval sets.

    Layout (data/README.md has the details):
      out_dir/train/{00000..00011}.tar  1,500 samples, 125 a shard: png (64 px RGB), txt (one caption), cls,
                                        json {"key": global id 0..1499, "caption", "label", "source_index"}
      out_dir/train/sizes.json          {"00000.tar": 125, ..., "num_samples": 1500}
      out_dir/wds/digits_cls/           297 held-out images, zero-shot classification (classnames, templates, cls)
      out_dir/wds/digits_ret/           the same 297 images, retrieval: txt = 5 captions, one per line
    The split is stratified; the sample order, captions and split depend only on `seed`; the bytes are reproducible.
    Returns a summary dict (paths, counts) that is also written to out_dir/digits.json.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    out_dir = Path(out_dir)
    digits = load_digits()
    train_idx, heldout_idx = split_digits(digits.target, seed)
    rng = np.random.default_rng(seed)
    per_shard = -(-len(train_idx) // DIGITS_TRAIN_SHARDS)
    with ShardWriter(out_dir / "train", per_shard) as writer:
        for gid, src in enumerate(train_idx):
            label = int(digits.target[src])
            writer.write(f"{gid:09d}", sample_members(digit_image_png(digits.images[src]), "png",
                                                      digit_captions(label, rng, 1)[0], gid, label, source_index=src))
    sizes = write_sizes_json(out_dir / "train", writer.counts, len(train_idx))
    heldout, keys = [], []
    for gid, src in enumerate(heldout_idx):
        label = int(digits.target[src])
        captions = "\n".join(digit_captions(label, rng, RETRIEVAL_CAPTIONS_PER_IMAGE))
        heldout.append(sample_members(digit_image_png(digits.images[src]), "png", captions, gid, label,
                                      source_index=src))
        keys.append(f"{gid:09d}")
    cls_dir, ret_dir = out_dir / "wds" / "digits_cls", out_dir / "wds" / "digits_ret"
    write_clip_benchmark_dir(cls_dir, "classification", heldout, keys, shard_size=75)
    write_clip_benchmark_dir(ret_dir, "retrieval", heldout, keys, shard_size=75)
    summary = {"train": brace_pattern(out_dir / "train", writer.counts), "sizes_json": str(sizes),
               "num_samples": len(train_idx), "train_shards": len(writer.counts), "heldout": len(heldout_idx),
               "zeroshot": [str(cls_dir)], "retrieval": [str(ret_dir)], "classnames": list(DIGIT_WORDS),
               "image_size": DIGITS_IMAGE_SIZE, "seed": seed}
    (out_dir / "digits.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("wrote %d training and %d held-out digits to %s", len(train_idx), len(heldout_idx), out_dir)
    return summary


def make_digits_main(argv: Sequence[str]) -> int:
    """`clip-glofnd make-digits OUT_DIR [--seed S]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd make-digits", description=make_digits.__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="output folder (created); train/ and wds/ go inside")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the sample order and the captions")
    ns = parser.parse_args(argv)
    summary = make_digits(ns.out_dir, seed=ns.seed)
    print(f"train: {summary['train']}  ({summary['num_samples']} samples, {summary['sizes_json']})")
    print(f"zero-shot: {summary['zeroshot'][0]}  retrieval: {summary['retrieval'][0]}  ({summary['heldout']} images)")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# make-shards: a folder of images + a CSV/TSV of (path, caption)

def read_captions(captions_file: str | Path, path_column: str = "path", caption_column: str = "caption"
                  ) -> list[tuple[str, str]]:
    """(image path, caption) rows of a CSV (or TSV, by extension .tsv/.tab); a header row naming the columns is
    optional: without one the first two columns are path and caption."""
    import csv
    captions_file = Path(captions_file)
    delimiter = "\t" if captions_file.suffix.lower() in (".tsv", ".tab") else ","
    with open(captions_file, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter=delimiter) if row]
    if not rows:
        raise UsageError(f"{captions_file}: no rows; expected {path_column}{delimiter}{caption_column} lines")
    columns = (0, 1)
    if path_column in rows[0] and caption_column in rows[0]:
        columns = (rows[0].index(path_column), rows[0].index(caption_column))
        rows = rows[1:]
    short = [i + 1 for i, row in enumerate(rows) if len(row) <= max(columns)]
    if short:
        raise UsageError(f"{captions_file}: rows {short[:5]} have fewer than {max(columns) + 1} columns "
                         f"(delimiter {delimiter!r}; a header row may name the columns {path_column!r}, "
                         f"{caption_column!r})")
    return [(row[columns[0]], row[columns[1]]) for row in rows]


def _image_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and extension if it is a readable jpg/png/webp; other formats re-encoded as PNG."""
    from PIL import Image
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt = (image.format or "").lower()
        if fmt in ("jpeg", "png", "webp"):
            return data, {"jpeg": "jpg"}.get(fmt, fmt)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue(), "png"


def make_shards(images_dir: str | Path, captions_file: str | Path, out_dir: str | Path, shard_size: int = 10000,
                skip_bad: bool = False, path_column: str = "path", caption_column: str = "caption") -> dict:
    """Pack images + captions into shards with dense global ids 0..n-1 (in the captions file's row order).

    Each sample: image bytes as they are (jpg/png/webp; other formats re-encoded to PNG), `txt` caption, `json`
    {"key": id, "caption", "path"}; plus out_dir/sizes.json. A missing or unreadable image or an empty caption is an
    error naming the row, or with `skip_bad` a logged skip (ids stay dense over the written samples).
    """
    from tqdm import tqdm
    rows = read_captions(captions_file, path_column, caption_column)
    out_dir, gid, skipped = Path(out_dir), 0, []
    with ShardWriter(out_dir, shard_size) as writer:
        for row, (rel, caption) in enumerate(tqdm(rows, desc="make-shards", unit="img", mininterval=2), start=1):
            try:
                if not caption.strip():
                    raise ValueError("empty caption")
                image, ext = _image_bytes(Path(images_dir) / rel)
            except (OSError, ValueError) as error:
                message = f"{captions_file}: row {row} ({rel!r}): {error}"
                if not skip_bad:
                    raise UsageError(f"{message}; fix the row or pass --skip-bad") from error
                logger.warning("skipping %s", message)
                skipped.append(row)
                continue
            writer.write(f"{gid:09d}", sample_members(image, ext, caption.strip(), gid, path=rel))
            gid += 1
    if gid == 0:
        raise UsageError(f"{captions_file}: no sample written ({len(skipped)} rows skipped)")
    sizes = write_sizes_json(out_dir, writer.counts, gid)
    return {"train": brace_pattern(out_dir, writer.counts), "sizes_json": str(sizes), "num_samples": gid,
            "shards": len(writer.counts), "skipped_rows": skipped}


def make_shards_main(argv: Sequence[str]) -> int:
    """`clip-glofnd make-shards IMAGES_DIR CAPTIONS OUT_DIR [--shard-size N]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd make-shards", description=make_shards.__doc__.splitlines()[0])
    parser.add_argument("images_dir", help="folder the image paths of the captions file are relative to")
    parser.add_argument("captions", help="CSV (or .tsv) with image path and caption per row; optional header")
    parser.add_argument("out_dir", help="output folder for {00000..}.tar and sizes.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (img2dataset's default)")
    parser.add_argument("--path-column", default="path", help="header name of the image path column")
    parser.add_argument("--caption-column", default="caption", help="header name of the caption column")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and log) rows with a missing or unreadable "
                        "image or an empty caption instead of stopping")
    ns = parser.parse_args(argv)
    if ns.shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {ns.shard_size}")
    summary = make_shards(ns.images_dir, ns.captions, ns.out_dir, ns.shard_size, ns.skip_bad, ns.path_column,
                          ns.caption_column)
    print(f"{summary['num_samples']} samples in {summary['shards']} shards: {summary['train']} "
          f"({summary['sizes_json']}; {len(summary['skipped_rows'])} rows skipped)")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# check-shards

EXAMPLES_PER_KIND = 3


@dataclass
class ShardReport:
    """What check_shards found: counts, id range, holes, duplicates, per-shard counts, problems."""

    pattern: str
    num_samples: int | None                       # declared id-space size (given or sizes.json), if any
    deep: bool = False                            # images and captions decoded too
    samples: int = 0
    min_id: int | None = None
    max_id: int | None = None
    holes: int = 0                                # ids in [0, num_samples or max id + 1) with no sample
    duplicates: int = 0                           # samples whose id was already seen
    hole_examples: list[list[int]] = field(default_factory=list)    # first few [start, end] ranges of missing ids
    duplicate_examples: list[int] = field(default_factory=list)
    per_shard: dict[str, int] = field(default_factory=dict)
    count_mismatch: dict[str, list[int | None]] = field(default_factory=dict)   # url -> [found, sizes.json]
    problems: dict[str, int] = field(default_factory=dict)      # kind -> samples (shard kinds: shards) with it
    problem_examples: list[str] = field(default_factory=list)   # the first few of each kind, naming shard and key

    @property
    def short_shards(self) -> list[str]:
        """Shards with fewer samples than sizes.json lists (training calls them truncated)."""
        return [url for url, (found, listed) in self.count_mismatch.items() if listed is not None and found < listed]

    @property
    def ok(self) -> bool:
        """No holes, duplicates, problems, or shards shorter than their sizes.json count."""
        return not (self.holes or self.duplicates or self.problems or self.short_shards)

    def format(self) -> str:
        """Human-readable report."""
        lines = [f"pattern: {self.pattern}", f"shards: {len(self.per_shard)}  samples: {self.samples}",
                 f"ids: {self.min_id}..{self.max_id}  num_samples (id space): {self.num_samples}",
                 f"holes: {self.holes} {self.hole_examples or ''}".rstrip(),
                 f"duplicates: {self.duplicates} {self.duplicate_examples or ''}".rstrip()]
        counts = sorted(self.per_shard.values())
        if counts:
            lines.append(f"per shard: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")
        lines += [f"count differs from {SIZES_JSON}: {url}: found {a}, listed {b}"
                  for url, (a, b) in list(self.count_mismatch.items())[:10]]
        empty = [url for url, n in self.per_shard.items() if n == 0]
        lines += [f"shards without samples: {len(empty)} {empty[:5]}"] if empty else []
        checked = "ids, images and captions" if self.deep else "ids only (--deep also decodes images and captions)"
        lines.append(f"checked: {checked}")
        lines += [f"problems: {self.problems}"] + [f"  {e}" for e in self.problem_examples] if self.problems else []
        lines.append("OK" if self.ok else "NOT OK")
        return "\n".join(lines)


def _hole_ranges(present, size: int, limit: int = 5) -> tuple[int, list[list[int]]]:
    """Number of ids in [0, size) absent from the sorted unique array `present`, and the first missing ranges."""
    import numpy as np
    inside = present[(present >= 0) & (present < size)]
    bounds = np.concatenate([[-1], inside, [size]])
    gaps = np.nonzero(np.diff(bounds) > 1)[0][:limit]
    return int(size - len(inside)), [[int(bounds[g] + 1), int(bounds[g + 1] - 1)] for g in gaps]


@dataclass
class _ShardCheck:
    """check_shards' findings in one shard (computed in a worker process with --workers)."""

    url: str
    found: int = 0
    ids: list[int] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, bad: BadSample) -> None:
        self.problems[bad.kind] = self.problems.get(bad.kind, 0) + 1
        examples = self.examples.setdefault(bad.kind, [])
        if len(examples) < EXAMPLES_PER_KIND:
            examples.append(str(bad))


def _check_shard(shard: Shard, deep: bool = False, caption_key: str = "txt") -> _ShardCheck:
    """Ids of one shard; with `deep` also decode every caption, cls label and image as training does."""
    caption_ext = () if caption_key.startswith("json:") else (caption_key,)
    wanted = (*IMAGE_EXTS, "json", "cls", *caption_ext) if deep else ("json",)
    check = _ShardCheck(shard.url)
    try:
        for sample in iter_samples(shard, wanted=wanted):
            check.found += 1
            reads = [lambda: check.ids.append(parse_id(sample, shard))]
            if deep:
                reads += [lambda: read_caption(sample, caption_key, shard), lambda: read_label(sample, shard),
                          lambda: decode_image(sample, shard)]
            for read in reads:
                try:
                    read()
                except BadSample as bad:
                    check.add(bad)
    except BadSample as bad:
        check.add(bad)
    return check


def _shard_checks(shards: list[Shard], deep: bool, caption_key: str, workers: int) -> Iterator[_ShardCheck]:
    """_check_shard over all shards in order, in `workers` processes (in this one for workers <= 1)."""
    import functools
    run = functools.partial(_check_shard, deep=deep, caption_key=caption_key)
    if workers <= 1:
        yield from map(run, shards)
        return
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(run, shards)


def check_shards(pattern: str, num_samples: int | None = None, deep: bool = False, caption_key: str = "txt",
                 workers: int = 1) -> ShardReport:
    """Read every sample's id in `pattern` (json `key`, else `__key__`) and report count, range, holes, duplicates.

    With `deep`, also decode every image (PIL, as training does) and caption (UTF-8, non-empty, under
    `caption_key`: a member extension or "json:FIELD") and cls label, and report bad ones by kind, shard and key.
    """
    import numpy as np
    from tqdm import tqdm
    try:
        shards, declared = resolve_shards(pattern, num_samples)
    except UsageError:
        shards, declared = [Shard(u, 0, 2**62, None) for urls in expand_sources(pattern) for u in urls], None
    report, ids = ShardReport(pattern, declared, deep=deep), []
    counts = [s.count for s in shards]
    bar = tqdm(total=sum(counts) if deep and None not in counts else None if deep else len(shards),
               desc="check-shards" + (" --deep" if deep else ""), unit="sample" if deep else "shard", mininterval=2)
    examples: dict[str, list[str]] = {}
    for shard, check in zip(shards, _shard_checks(shards, deep, caption_key, workers)):
        ids.append(np.asarray(check.ids, dtype=np.int64))
        for kind, n in check.problems.items():
            report.problems[kind] = report.problems.get(kind, 0) + n
            examples.setdefault(kind, [])
            examples[kind] += check.examples[kind][:EXAMPLES_PER_KIND - len(examples[kind])]
        report.per_shard[shard.url] = check.found
        if shard.count is not None and shard.count != check.found:
            report.count_mismatch[shard.url] = [check.found, shard.count]
        bar.update(check.found if deep else 1)
        bar.set_postfix(problems=sum(report.problems.values()), refresh=False)
    bar.close()
    report.problem_examples = [e for kind in examples for e in examples[kind]]
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    report.samples = int(sum(report.per_shard.values()))
    if len(all_ids):
        unique, counts = np.unique(all_ids, return_counts=True)
        report.min_id, report.max_id = int(unique[0]), int(unique[-1])
        report.duplicates = int((counts - 1).sum())
        report.duplicate_examples = [int(i) for i in unique[counts > 1][:5]]
        report.holes, report.hole_examples = _hole_ranges(unique, declared or report.max_id + 1)
    return report


def write_sizes_from_report(report: ShardReport, num_samples: int | None) -> Path:
    """Write sizes.json beside the shards of a one-folder local pattern from the counts check_shards found."""
    folders = {Path(_local_path(url) or "").parent for url in report.per_shard}
    if len(folders) != 1 or None in map(_local_path, report.per_shard):
        raise UsageError(f"--write-sizes needs local shards in one folder; {report.pattern!r} spans {len(folders)}")
    size = num_samples or report.num_samples or (report.max_id + 1 if report.max_id is not None else 0)
    counts = {url.rsplit("/", 1)[-1]: count for url, count in report.per_shard.items()}
    return write_sizes_json(folders.pop(), counts, size)


def check_shards_main(argv: Sequence[str]) -> int:
    """`clip-glofnd check-shards PATTERN [--num-samples N] [--allow-holes] [--write-sizes] [--deep] [--json]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd check-shards", description=check_shards.__doc__ + " Exit "
                                     "status 1 on holes, duplicate ids, unreadable keys, shards, images or "
                                     f"captions, or shards shorter than {SIZES_JSON} says.")
    parser.add_argument("pattern", help="brace pattern of shards, sources joined with ::")
    parser.add_argument("--num-samples", type=int, default=None, help="id-space size = max id + 1 (default: "
                        "sizes.json); CC3M 3318333, CC12M 12423374 (rows of the URL list)")
    parser.add_argument("--allow-holes", action="store_true", help="exit 0 despite holes (img2dataset downloads "
                        "have them: failed URLs keep their id); duplicates and unreadable keys still fail")
    parser.add_argument("--write-sizes", action="store_true", help="write sizes.json beside the shards from the "
                        "counts found (num_samples: --num-samples, else sizes.json's, else max id + 1)")
    parser.add_argument("--deep", action="store_true", help="also decode every image (PIL) and caption (UTF-8, "
                        "non-empty) and cls label, as training does; reads all bytes, so much slower")
    parser.add_argument("--caption-key", default="txt", help="with --deep: where captions are, as training's "
                        "--caption-key: a member extension (txt) or json:FIELD")
    parser.add_argument("--workers", type=int, default=1, help="processes reading shards in parallel")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    ns = parser.parse_args(argv)
    if ns.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {ns.workers}")
    report = check_shards(ns.pattern, ns.num_samples, deep=ns.deep, caption_key=ns.caption_key, workers=ns.workers)
    print(json.dumps({**report.__dict__, "ok": report.ok}, indent=1) if ns.json else report.format())
    if ns.write_sizes:
        print(f"wrote {write_sizes_from_report(report, ns.num_samples)}")
    bad = report.duplicates or report.problems or (report.short_shards and not ns.write_sizes)
    return 1 if bad or (report.holes and not ns.allow_holes) else 0
