"""WebDataset shards with global sample ids (the data contract of DESIGN.md §2): reading them, and writing them.

Shards follow img2dataset's layout: per sample `KEY.{png|jpg}`, `KEY.txt` (caption), `KEY.json` with the integer
`key` (the global id), optional `KEY.cls`. A `sizes.json` beside the shards maps shard file name -> sample count
(OpenCLIP reads that) and holds `num_samples` = size of the id space (max id + 1). Shards written here are
byte-identical for the same inputs and seed (fixed tar metadata, sorted members).

The commands that build and check shards live in their own modules, each `main(argv) -> int` parsing its flags
before importing anything heavy: clip_glofnd/digits.py (`clip-glofnd make-digits`), clip_glofnd/make_shards.py
(`clip-glofnd make-shards`) and clip_glofnd/check_shards.py (`clip-glofnd check-shards`).
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from clip_glofnd.errors import UsageError

SIZES_JSON = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ARCHIVE_EXTS = ("tar", "tgz", "tar.gz", "zip")      # a member with one of these: an archive of shards


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


def local_path(url: str) -> str | None:
    """The file path of a local shard (plain path or file: URL), None for a remote URL or pipe:."""
    path = url[len("file:"):] if url.startswith("file:") else url
    return None if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path) and not re.match(r"^[a-zA-Z]:[\\/]", path) else path


def _sizes_path(url: str) -> Path | None:
    """The sizes.json beside a local shard, if it exists."""
    path = local_path(url)
    candidate = Path(path).parent / SIZES_JSON if path else None
    return candidate.resolve() if candidate is not None and candidate.is_file() else None


def missing_local_shards(shards: Sequence[Shard]) -> list[str]:
    """URLs of local shards whose file does not exist (remote ones are not checked)."""
    return [s.url for s in shards if (path := local_path(s.url)) is not None and not Path(path).exists()]


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
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    import webdataset as wds
    return wds.gopen(url, "rb")


def _not_a_tar(shard: Shard, error: Exception) -> BadSample:
    """One line for a file that tarfile cannot open (tarfile's own message spans lines, one per compression)."""
    path = local_path(shard.url)
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
