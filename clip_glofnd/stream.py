"""The loader workers' side of training data: a rank's shards -> validated samples -> shuffle buffer -> decoded ->
batches (clip_glofnd/data.py runs it in a DataLoader and batches what it yields in the main process).

Every sample's augmentation is seeded by (seed, epoch, pass, id), and every item names the worker role that made it
and how many shuffled samples that role had emitted: what lets a resumed worker skip delivered samples without
decoding them and still give the very same batches (the mid-epoch resume of data.py's module docstring).
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from clip_glofnd.shards import (SIZES_JSON, BadSample, Shard, decode_image, iter_samples, parse_id, read_caption,
                                read_label)

logger = logging.getLogger(__name__)



def stable_seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple (same value in every process, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class StreamConfig:
    """How the workers of one rank read, shuffle and batch their shards in one pass."""

    batch_size: int
    caption_key: str
    skip_bad_samples: bool
    shuffle_buffer: int
    seed: tuple
    resampled: bool
    rotation: int = 0         # resume: DataLoader worker i plays worker role (i + rotation) % workers
    skip: tuple = ()          # resume: per role, shuffled samples already delivered (not decoded again); -1: role done


def preprocess_seeded(preprocess: Callable, image, seed: int) -> Tensor:
    """preprocess(image) with torch's CPU and python's RNG seeded by `seed`, both restored afterwards.

    A sample's random augmentation (open_clip's RandomResizedCrop) then depends on (seed, epoch, pass, id) only, not
    on which worker decodes it or how many samples that worker decoded before: what makes a mid-epoch resume, which
    skips samples without decoding them, give the same images.
    """
    torch_state, python_state = torch.default_generator.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        return preprocess(image)
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(python_state)


def buffer_shuffle(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
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


class ShardStream(IterableDataset):
    """Runs in each loader worker: its shards -> validated samples -> shuffle buffer -> decoded -> batches.

    Yields dicts with images [k,3,H,W], texts [k,ctx], ids [k], labels [k] (k <= batch_size; only the last batch
    of a worker is partial), `skipped` (counts since the previous item) and `reads` (samples in each shard this
    worker finished reading since the previous item: a few ints per batch, for the epoch's shortfall check); the
    last item has `end=True` so counts made after the last batch still reach the main process. Every item names the
    worker role that made it and how many shuffled samples that role had emitted (the data position of a resume).
    """

    def __init__(self, shards: list[Shard], cfg: StreamConfig, preprocess: Callable, tokenizer: Callable) -> None:
        super().__init__()
        self.shards, self.cfg, self.preprocess, self.tokenizer = shards, cfg, preprocess, tokenizer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        roles = 1 if info is None else info.num_workers
        role = ((0 if info is None else info.id) + self.cfg.rotation) % roles
        start = self.cfg.skip[role] if self.cfg.skip else 0
        if start < 0:                                                     # resume: this role had ended
            return
        rng = random.Random(stable_seed(*self.cfg.seed, role))
        skipped: Counter = Counter()
        reads: Counter = Counter()                                      # shard url -> samples read, once finished
        if self.cfg.resampled:
            shards = iter(lambda: rng.choice(self.shards), None)        # with replacement, endless (OpenCLIP style)
        else:
            shards = iter(self.shards[role::roles])                      # webdataset's split_by_worker, by role
        samples = buffer_shuffle(self._raw(shards, skipped, reads), self.cfg.shuffle_buffer, rng)
        self._quiet = start > 0
        batch: list = []
        emitted = 0                                                       # shuffled samples taken from the buffer
        try:
            for sample in samples:
                emitted += 1
                if emitted <= start:                                      # delivered before the checkpoint
                    if emitted == start:                                  # its counts reached the main process
                        skipped.clear()
                        reads.clear()
                        self._quiet = False
                    continue
                item = self._decode(sample, skipped)
                if item is not None:
                    batch.append(item)
                if len(batch) == self.cfg.batch_size:
                    yield self._collate(batch, skipped, reads, role, emitted)
                    batch = []
        except BadSample as bad:              # strict mode: sent as data, the main process raises UsageError(message)
            yield {"end": True, "skipped": dict(skipped), "reads": dict(reads), "error": str(bad), "worker": role}
            return
        if batch:
            yield self._collate(batch, skipped, reads, role, emitted)
        yield {"end": True, "skipped": dict(skipped), "reads": dict(reads), "worker": role, "emitted": emitted}

    def _handle(self, bad: BadSample, skipped: Counter, lost: int = 1) -> None:
        """Raise `bad`, or (skip_bad_samples) count the `lost` samples under its kind and log it."""
        if not self.cfg.skip_bad_samples:
            raise bad
        skipped[bad.kind] += lost
        if not getattr(self, "_quiet", False):                           # quiet while a resume replays the stream
            logger.warning("skipping bad sample (%s): %s", bad.kind, bad)

    def _raw(self, shards, skipped: Counter, reads: Counter) -> Iterator[tuple[Shard, dict, int, str, int]]:
        """(shard, raw sample, id, caption, label) for every valid sample; bytes stay encoded for the buffer.

        A shard that breaks off counts as the samples sizes.json says it lost (1 where sizes.json has no count).
        """
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
                        yield (shard, sample, parse_id(sample, shard),
                               read_caption(sample, self.cfg.caption_key, shard), read_label(sample, shard))
                    except BadSample as bad:
                        self._handle(bad, skipped)
                if shard.count is not None and read < shard.count:
                    raise BadSample("truncated_shard", shard.url, key, f"ends after {read} samples but {SIZES_JSON} "
                                    f"says {shard.count}; re-download the shard or fix {SIZES_JSON}")
            except BadSample as bad:
                self._handle(bad, skipped, max(1, shard.count - read) if shard.count is not None else 1)
            reads[shard.url] += read

    def _decode(self, item: tuple, skipped: Counter) -> tuple | None:
        shard, sample, gid, caption, label = item
        try:
            image = preprocess_seeded(self.preprocess, decode_image(sample, shard),
                                      stable_seed(*self.cfg.seed, "augment", gid))
        except BadSample as bad:
            self._handle(bad, skipped)
            return None
        return image, caption, gid, label, f"{shard.url}: sample {sample['__key__']!r}"

    def _collate(self, batch: list[tuple], skipped: Counter, reads: Counter, role: int, emitted: int) -> dict:
        images, captions, ids, labels, sources = zip(*batch)
        out = {"images": torch.stack(images),                                # [k, 3, H, W]
               "texts": self.tokenizer(list(captions)),                      # [k, ctx]
               "ids": torch.tensor(ids, dtype=torch.int64),                  # [k]
               "labels": torch.tensor(labels, dtype=torch.int64),            # [k], -1 = no cls
               "sources": list(sources),                                     # [k] "shard: sample 'key'"
               "skipped": dict(skipped), "reads": dict(reads), "end": False, "worker": role, "emitted": emitted}
        skipped.clear()
        reads.clear()
        return out
