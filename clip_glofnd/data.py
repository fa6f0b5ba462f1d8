"""Streaming image–text batches with global sample ids from WebDataset shards (DESIGN.md §2).

GloFND keeps one threshold λ per sample, indexed by a **global id**, so every batch carries `ids`: the integer
`key` of the sample's `json` member (img2dataset layout), else its `__key__` parsed as an integer. A wrong id
would silently corrupt another sample's λ, so a non-integer key or an id outside `[0, num_samples)` is an error
naming the shard and key (or, with `skip_bad_samples=True`, a counted and logged skip; never a silent drop).

Input patterns: brace patterns (`/data/cc3m/{00000..00331}.tar`), local paths or any URL webdataset opens
(`https://…`, `pipe:aws s3 cp … -`), several sources joined with `::`. Sources that share one `sizes.json` share
one id space; sources with different `sizes.json` files get consecutive id ranges (source k's ids are offset by
the `num_samples` of the sources before it).

`sizes.json` (beside the shards, written by `clip-glofnd make-shards` / `make-digits`, or by hand after
img2dataset) is OpenCLIP's per-shard count file plus one key: `{"00000.tar": 9854, …, "num_samples": 3318333}`;
`num_samples` is the size of the id space (max id + 1), not the number of samples present.

Epoch semantics (one `TrainLoader` = one epoch, shuffle seeded by (seed, epoch)):
- the shard list is shuffled by (seed, epoch), then split across ranks (shard i → rank i % world_size) and within a
  rank across loader workers (webdataset's `split_by_worker`); samples are shuffled in a per-worker buffer;
- world_size == 1: every sample once, the last partial batch kept;
- world_size > 1 (or `resampled`): every rank yields exactly `num_batches = samples_per_epoch // (world_size *
  batch_size)` full batches, so DDP never waits and gathers stay equal. A rank with more samples stops early (the
  rest are counted in `stats["unvisited"]`); a rank with fewer starts a second pass over its shards in a new order
  (counted in `stats["repeated"]`). With evenly sized shards and a shard count divisible by world_size nothing
  repeats and fewer than world_size * batch_size samples are left out.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_glofnd.errors import UsageError
from clip_glofnd.shards import SIZES_JSON, BadSample, Shard, iter_samples, parse_id, resolve_shards

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_KINDS = ("unreadable_shard", "truncated_shard")   # skip kinds that lose a whole shard (or its tail), not 1 sample


@dataclass
class Batch:
    """One training batch; `ids` index the per-sample GloFND state."""

    images: Tensor            # [b, 3, H, W] float, after the model's preprocess
    texts: Tensor             # [b, ctx] long, tokenised by the model's tokenizer
    ids: Tensor               # [b] int64 global sample ids
    labels: Tensor | None     # [b] int64 when the shards carry `cls` (-1 where a sample lacks it), else None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on `device`."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(move(self.images), move(self.texts), move(self.ids), move(self.labels))


def resolve_num_samples(pattern: str, num_samples: int | None) -> int:
    """Size of the id space of `pattern` (max id + 1): `num_samples` if given, else from the sizes.json files."""
    return resolve_shards(pattern, num_samples)[1]


# ----------------------------------------------------------------------------------------------------------------------
# worker side: tar -> validated samples -> shuffled -> decoded -> batches

def _seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple (same value in every process, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class _StreamConfig:
    batch_size: int
    caption_key: str
    skip_bad_samples: bool
    shuffle_buffer: int
    seed: tuple
    resampled: bool


def _caption(sample: dict, caption_key: str, shard: Shard) -> str:
    """Caption from the `txt` member (or another member), or from a json field with caption_key='json:FIELD'."""
    if caption_key.startswith("json:"):
        field_name = caption_key[len("json:"):]
        try:
            value = json.loads(sample["json"]).get(field_name) if "json" in sample else None
        except (ValueError, AttributeError):
            value = None
    else:
        value = sample.get(caption_key)
        value = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else None
    if not isinstance(value, str) or not value.strip():
        raise BadSample("missing_caption", shard.url, sample["__key__"],
                        f"no caption under {caption_key!r} (or it is empty); set caption_key "
                        f"(e.g. 'txt' or 'json:caption') or pass --skip-bad-samples")
    return value.strip()


def _label(sample: dict, shard: Shard) -> int:
    if "cls" not in sample:
        return -1
    try:
        return int(sample["cls"].decode().strip())
    except ValueError as error:
        raise BadSample("bad_label", shard.url, sample["__key__"], f"cls {sample['cls'][:20]!r} is not an "
                        f"integer") from error


def _image(sample: dict, shard: Shard):
    """The sample's image as an RGB PIL image (first of jpg, jpeg, png, webp)."""
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


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: hold up to `bufsize` items, emit a random one for each new item, then drain in random order."""
    buffer: list = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        i = rng.randrange(bufsize)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class _Stream(IterableDataset):
    """Runs in each loader worker: its shards -> validated samples -> shuffle buffer -> decoded -> batches.

    Yields dicts with images [k,3,H,W], texts [k,ctx], ids [k], labels [k] (k <= batch_size; only the last batch
    of a worker is partial) and `skipped` (counts since the previous item); the last item has `end=True` so
    skip counts made after the last batch still reach the main process.
    """

    def __init__(self, shards: list[Shard], cfg: _StreamConfig, preprocess: Callable, tokenizer: Callable) -> None:
        super().__init__()
        self.shards, self.cfg, self.preprocess, self.tokenizer = shards, cfg, preprocess, tokenizer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = random.Random(_seed(*self.cfg.seed, worker))
        skipped: Counter = Counter()
        if self.cfg.resampled:
            shards = iter(lambda: rng.choice(self.shards), None)        # with replacement, endless (OpenCLIP style)
        else:
            shards = wds.split_by_worker(self.shards)
        samples = self._raw(shards, skipped)
        samples = _shuffled(samples, self.cfg.shuffle_buffer, rng)
        batch: list = []
        try:
            for sample in samples:
                item = self._decode(sample, skipped)
                if item is not None:
                    batch.append(item)
                if len(batch) == self.cfg.batch_size:
                    yield self._collate(batch, skipped)
                    batch = []
        except BadSample as bad:              # strict mode: sent as data, the main process raises UsageError(message)
            yield {"end": True, "skipped": dict(skipped), "error": str(bad)}
            return
        if batch:
            yield self._collate(batch, skipped)
        yield {"end": True, "skipped": dict(skipped)}

    def _handle(self, bad: BadSample, skipped: Counter) -> None:
        if not self.cfg.skip_bad_samples:
            raise bad
        skipped[bad.kind] += 1
        logger.warning("skipping bad sample (%s): %s", bad.kind, bad)

    def _raw(self, shards, skipped: Counter) -> Iterator[tuple[Shard, dict, int, str, int]]:
        """(shard, raw sample, id, caption, label) for every valid sample; bytes stay encoded for the buffer."""
        empty_streak = 0
        for shard in shards:
            if empty_streak > max(100, 2 * len(self.shards)):            # resampled: do not spin on broken shards
                raise BadSample("unreadable_shard", shard.url, None, f"{empty_streak} shards in a row gave no sample")
            read, key = 0, None
            empty_streak += 1
            try:
                for sample in iter_samples(shard):
                    read, key = read + 1, sample["__key__"]
                    try:
                        empty_streak = 0
                        yield (shard, sample, parse_id(sample, shard), _caption(sample, self.cfg.caption_key, shard),
                               _label(sample, shard))
                    except BadSample as bad:
                        self._handle(bad, skipped)
                if shard.count is not None and read < shard.count:
                    raise BadSample("truncated_shard", shard.url, key, f"ends after {read} samples but {SIZES_JSON} "
                                    f"says {shard.count}; re-download the shard or fix {SIZES_JSON}")
            except BadSample as bad:
                self._handle(bad, skipped)

    def _decode(self, item: tuple, skipped: Counter) -> tuple | None:
        shard, sample, gid, caption, label = item
        try:
            image = self.preprocess(_image(sample, shard))
        except BadSample as bad:
            self._handle(bad, skipped)
            return None
        return image, caption, gid, label

    def _collate(self, batch: list[tuple], skipped: Counter) -> dict:
        images, captions, ids, labels = zip(*batch)
        out = {"images": torch.stack(images),                                # [k, 3, H, W]
               "texts": self.tokenizer(list(captions)),                      # [k, ctx]
               "ids": torch.tensor(ids, dtype=torch.int64),                  # [k]
               "labels": torch.tensor(labels, dtype=torch.int64),            # [k], -1 = no cls
               "skipped": dict(skipped), "end": False}
        skipped.clear()
        return out


# ----------------------------------------------------------------------------------------------------------------------
# main-process side

@dataclass
class TrainLoader:
    """One epoch of `Batch`es for one rank (build one per epoch; see the module docstring for the epoch rules).

    After iterating: `skipped` counts skipped bad samples by kind (only with skip_bad_samples=True): per sample
    unreadable_image, missing_image, missing_caption, bad_json, bad_key, id_out_of_range, bad_label; per shard
    unreadable_shard, truncated_shard (the shard's tail is lost; see "unvisited"). `stats` has "samples" (yielded
    by this rank), "batches", "repeated" (samples from a later pass that filled this rank's quota), "unvisited"
    (samples of this rank's shards never yielded; known when sizes.json has the shard counts), "passes".
    Both are logged at the end of the epoch when not empty.
    """

    shards: list[Shard]              # this rank's shards in this epoch's order (all shards when resampled)
    cfg: _StreamConfig
    preprocess: Callable
    tokenizer: Callable
    workers: int
    samples_per_epoch: int           # all ranks
    num_batches: int                 # this rank, this epoch (exact when `exact`, else the expected count)
    exact: bool                      # exactly num_batches full batches (world_size > 1 or resampled)
    sample_cap: int | None = None    # world_size 1: stop after this many samples (train_num_samples)
    skipped: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        self.skipped.clear()
        self.stats.clear()
        yield from self._batches()
        self._finish()

    def _loader(self, pass_index: int) -> DataLoader:
        """A DataLoader over this rank's shards; later passes (to fill a rank's quota) use a new shard order."""
        cfg = self.cfg if pass_index == 0 else replace(self.cfg, seed=(*self.cfg.seed, pass_index))
        shards = self.shards
        if pass_index > 0 and not cfg.resampled:
            shards = random.Random(_seed(*cfg.seed)).sample(shards, len(shards))
        workers = self.workers if cfg.resampled else min(self.workers, len(shards))
        return DataLoader(_Stream(shards, cfg, self.preprocess, self.tokenizer), batch_size=None, num_workers=workers,
                          generator=torch.Generator().manual_seed(_seed(*cfg.seed, "augment")))

    def _next_size(self) -> int:
        if self.sample_cap is None:
            return self.cfg.batch_size
        return min(self.cfg.batch_size, self.sample_cap - self.stats["samples"])

    def _items(self) -> Iterator[tuple[int, dict]]:
        """(pass index, worker item) over one pass, or as many as `exact` needs; a worker's error is raised here."""
        for pass_index in itertools.count():
            got = 0
            items = iter(self._loader(pass_index))
            try:
                for item in items:
                    self.skipped.update(item["skipped"])
                    if "error" in item:
                        raise UsageError(item["error"])
                    if not item["end"]:
                        got += len(item["ids"])
                        yield pass_index, item
            finally:
                del items                  # stop the workers now, not when a traceback holding them is collected
            self.stats["passes"] = pass_index + 1
            if not self.exact:
                return
            if got == 0:
                raise UsageError(f"no valid samples in this rank's {len(self.shards)} shards (first: "
                                 f"{self.shards[0].url}); skipped: {dict(self.skipped)}")

    def _batches(self) -> Iterator[Batch]:
        pending: list[dict] = []          # worker items not yet yielded (only a worker's last item is partial)
        for pass_index, item in self._items():
            self.stats["first_pass"] += 0 if pass_index else len(item["ids"])
            pending.append(item)
            while 0 < self._next_size() <= sum(len(p["ids"]) for p in pending):
                yield self._take(pending, self._next_size())
                if (self.exact and self.stats["batches"] == self.num_batches) or self._next_size() == 0:
                    return
        if pending:
            yield self._take(pending, sum(len(p["ids"]) for p in pending))

    def _take(self, pending: list[dict], n: int) -> Batch:
        """The first n pending samples as a Batch; the rest stay pending."""
        if len(pending) == 1 and len(pending[0]["ids"]) == n:
            head, rest = pending[0], None
        else:
            merged = {k: torch.cat([p[k] for p in pending]) for k in ("images", "texts", "ids", "labels")}
            head = {k: v[:n] for k, v in merged.items()}
            rest = {k: v[n:] for k, v in merged.items()}
        pending[:] = [rest] if rest is not None and len(rest["ids"]) else []
        self.stats["samples"] += n
        self.stats["batches"] += 1
        labels = head["labels"] if bool((head["labels"] >= 0).any()) else None
        return Batch(head["images"], head["texts"], head["ids"], labels)

    def _finish(self) -> None:
        first_pass = min(self.stats.pop("first_pass"), self.stats["samples"])   # pending is FIFO: first pass first
        self.stats["repeated"] = self.stats["samples"] - first_pass
        counts = [s.count for s in self.shards]
        if not self.cfg.resampled and None not in counts:
            bad = sum(n for kind, n in self.skipped.items() if kind not in SHARD_KINDS)
            self.stats["unvisited"] = max(0, sum(counts) - first_pass - bad)
        if self.skipped:
            logger.warning("skipped %d bad samples this epoch: %s", sum(self.skipped.values()), dict(self.skipped))
        if self.stats["repeated"] or self.stats["unvisited"] or self.stats["batches"] != self.num_batches:
            logger.info("epoch data (expected %d batches): %s", self.num_batches, dict(self.stats))


def make_train_loader(pattern: str, *, preprocess: Callable, tokenizer: Callable, batch_size: int,
                      num_samples: int | None, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                      workers: int = 1, caption_key: str = "txt", skip_bad_samples: bool = False,
                      resampled: bool = False, train_num_samples: int | None = None,
                      shuffle_buffer: int = 2000) -> TrainLoader:
    """Loader over `pattern` for one epoch on one rank; see the module docstring for splitting and epoch rules.

    Args:
        num_samples: size of the id space (max id + 1); None reads it from sizes.json (resolve_num_samples).
        train_num_samples: samples per epoch over all ranks (OpenCLIP's --train-num-samples); default: the shard
            counts from sizes.json, else num_samples. Required in practice with `resampled`.
        caption_key: a member extension ("txt") or "json:FIELD" for a field of the json member.
        shuffle_buffer: samples held (still encoded) per worker for shuffling.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0 or shuffle_buffer < 1:
        raise UsageError(f"need batch_size >= 1, workers >= 0, shuffle_buffer >= 1 and 0 <= rank < world_size; got "
                         f"{batch_size=}, {workers=}, {shuffle_buffer=}, {rank=}, {world_size=}")
    shards, _ = resolve_shards(pattern, num_samples)
    counts = [s.count for s in shards]
    if train_num_samples is not None:
        samples_per_epoch = train_num_samples
    elif None not in counts:
        samples_per_epoch = sum(counts)
    else:
        samples_per_epoch = resolve_num_samples(pattern, num_samples)
        logger.warning("no per-shard counts in %s for %s; assuming %d samples per epoch (pass train_num_samples)",
                       SIZES_JSON, pattern, samples_per_epoch)
    order = random.Random(_seed(seed, epoch, "shards")).sample(shards, len(shards))
    mine = order if resampled else order[rank::world_size]
    if len(shards) < world_size and not resampled:
        raise UsageError(f"{pattern!r} has {len(shards)} shards, fewer than world_size={world_size}; write smaller "
                         f"shards so that every rank gets at least one")
    exact = world_size > 1 or resampled
    num_batches = samples_per_epoch // (world_size * batch_size) if exact else math.ceil(samples_per_epoch / batch_size)
    if num_batches < 1:
        raise UsageError(f"{samples_per_epoch} samples per epoch give no full batch of {batch_size} on each of "
                         f"{world_size} ranks; lower --batch-size")
    cfg = _StreamConfig(batch_size, caption_key, skip_bad_samples, shuffle_buffer, (seed, epoch, rank), resampled)
    cap = train_num_samples if not exact else None
    return TrainLoader(mine, cfg, preprocess, tokenizer, workers, samples_per_epoch, num_batches, exact, cap)
