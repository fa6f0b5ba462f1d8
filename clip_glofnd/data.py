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
  repeats and fewer than world_size * batch_size samples are left out;
- an id delivered twice in a rank's first pass is an error naming both places (or a counted `duplicate_id` skip);
- a sample's random augmentation is seeded by (seed, epoch, pass, id), and `TrainLoader.state_dict()` between two
  batches lets a new loader of the same epoch continue with the very same batches (a mid-epoch resume): the main
  process records, per worker role, how many shuffled samples it has received and whose item comes next in the
  DataLoader's round robin; the resumed workers re-read their shards up to there without decoding.

Batches are formed in the workers (k <= batch_size samples per item); the main process hands an item's slice on as it
is and joins two items only where a batch straddles them, which happens after a worker's last, partial item (from
then on the batches stay out of step with the items until the epoch ends) or an item shortened by dropped duplicate
ids; `TrainLoader.joined` counts those batches. With `pin_memory` (training on CUDA) the DataLoader pins every item in
its pinning thread and a joined batch is concatenated straight into pinned memory, so each Batch the trainer copies
with `non_blocking=True` is pinned. With `uint8` the workers stop before open_clip's ToTensor + Normalize and send
uint8 images (a quarter of the bytes through shared memory and over PCIe); the trainer normalises on the device with
`normalize_on_device(batch.images, *loader.mean_std)`, which gives ToTensor + Normalize's values.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from clip_glofnd.errors import UsageError
from clip_glofnd.seen import SeenIds
from clip_glofnd.data_diagnosis import id_places, no_sample_error, shortfall_message
from clip_glofnd.shards import SIZES_JSON, Shard, resolve_shards
from clip_glofnd.stream import ShardStream, StreamConfig, stable_seed

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One training batch; `ids` index the per-sample GloFND state."""

    images: Tensor            # [b, 3, H, W] float after the model's preprocess; uint8 from a uint8 loader
    texts: Tensor             # [b, ctx] long, tokenised by the model's tokenizer
    ids: Tensor               # [b] int64 global sample ids
    labels: Tensor | None     # [b] int64 when the shards carry `cls` (-1 where a sample lacks it), else None
    first_seen: Tensor | None = None   # [b] bool: first delivery of the id this epoch (False: a rank's repeat pass)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on `device`."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(move(self.images), move(self.texts), move(self.ids), move(self.labels), self.first_seen)


def normalize_on_device(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 images [b, 3, H, W] as float32 (x / 255 - mean) / std on their own device: the same operations as
    torchvision's ToTensor then Normalize, so the values equal the float loader's. mean / std: per channel (tensors on
    the images' device, made once, spare a host-to-device copy per call)."""
    x = images.to(torch.float32).div_(255)                                              # [b, 3, H, W]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)    # a device tensor: no copy
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s)


class ToUint8:
    """A PIL preprocess (open_clip's, up to its ToTensor) followed by the image as a uint8 [3, H, W] tensor."""

    def __init__(self, pil_transform: Callable) -> None:
        self.pil_transform = pil_transform

    def __call__(self, image: Any) -> Tensor:
        array = np.array(self.pil_transform(image), dtype=np.uint8)                     # [H, W, 3]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()                    # [3, H, W]


def split_normalize(preprocess: Callable) -> tuple[ToUint8, tuple[float, ...], tuple[float, ...]]:
    """(the preprocess producing uint8 images, mean, std) from a torchvision Compose ending in ToTensor, Normalize
    (open_clip's transforms); UsageError for any other preprocess."""
    from torchvision.transforms import Compose, Normalize, ToTensor
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        raise UsageError(f"uint8 images need a preprocess that ends in ToTensor, Normalize (open_clip's); got "
                         f"{type(preprocess).__name__} {[type(t).__name__ for t in steps]}")
    normalize = steps[-1]
    return (ToUint8(Compose(steps[:-2])), tuple(float(v) for v in normalize.mean),
            tuple(float(v) for v in normalize.std))


def _join(chunks: list[Tensor], pin: bool) -> Tensor:
    """The chunks as one tensor along dim 0, in pinned memory when `pin` (one copy at most: a single chunk sliced
    from a pinned item is returned as it is; several are concatenated straight into a pinned buffer)."""
    if len(chunks) == 1:
        return chunks[0].pin_memory() if pin and not chunks[0].is_pinned() else chunks[0]
    if not pin:
        return torch.cat(chunks)
    out = torch.empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]), dtype=chunks[0].dtype, pin_memory=True)
    return torch.cat(chunks, out=out)


def resolve_num_samples(pattern: str, num_samples: int | None) -> int:
    """Size of the id space of `pattern` (max id + 1): `num_samples` if given, else from the sizes.json files."""
    return resolve_shards(pattern, num_samples)[1]


# ----------------------------------------------------------------------------------------------------------------------
# main-process side (the workers' side, shards -> batches, is clip_glofnd/stream.py)

@dataclass
class _Arrival:
    """A worker item waiting in the main process to be batched, with the loader's position from just before it came
    (a checkpoint taken while it waits rewinds to that point) and the ids it marked as seen."""

    item: dict
    before: dict
    marked: Tensor
    pass_index: int


_TENSORS = ("images", "texts", "ids", "labels")


@dataclass
class TrainLoader:
    """One epoch of `Batch`es for one rank (build one per epoch; see the module docstring for the epoch rules).

    After iterating: `skipped` counts the first pass's skipped bad samples by kind (with skip_bad_samples): per sample
    unreadable_image, missing_image, missing_caption, non_utf8_caption, bad_json, bad_key, id_out_of_range,
    bad_label, duplicate_id; per shard unreadable_shard, truncated_shard, counted as the samples the shard lost per
    sizes.json (1 where it has no count). `stats` has "samples" (yielded by this rank), "batches", "repeated"
    (samples from a later pass that filled this rank's quota), "unvisited" (samples of this rank's shards neither
    yielded nor skipped; known when sizes.json has the shard counts), "passes". `reads` has the samples read from
    each shard in the first pass. All are logged at the end of the epoch when not empty, with a WARNING when the
    first pass read fewer samples than expected (data_diagnosis.shortfall_message).

    An id delivered twice in the first pass (the same id in two shards, or twice in one) is an error naming both
    places, or with skip_bad_samples a dropped and counted `duplicate_id` (`seen`: one bit per id). `state_dict()`
    between two batches and `load_state_dict()` on a new loader of the same epoch continue with the same batches.
    """

    shards: list[Shard]              # this rank's shards in this epoch's order (all shards when resampled)
    cfg: StreamConfig
    preprocess: Callable
    tokenizer: Callable
    workers: int
    samples_per_epoch: int           # all ranks
    num_batches: int                 # this rank, this epoch (exact when `exact`, else the expected count)
    exact: bool                      # exactly num_batches full batches (world_size > 1 or resampled)
    sample_cap: int | None = None    # world_size 1: stop after this many samples (train_num_samples)
    expected_samples: int | None = None   # in this rank's shards: sizes.json counts, else its share; None: resampled
    seen: SeenIds | None = None      # ids delivered in the first pass (None: resampled, repeats are expected)
    skipped: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)
    reads: Counter = field(default_factory=Counter)   # shard url -> samples read in the first pass (finished shards)
    pin_memory: bool = False         # batches in pinned memory (training on CUDA, copied with non_blocking=True)
    mean_std: tuple | None = None    # uint8 loader: (mean, std) for normalize_on_device; None: float images

    def __post_init__(self) -> None:
        self.joined = 0                   # batches of this iteration joined from two or more worker items
        self._resume: dict | None = None
        self._pending: list[_Arrival] = []
        self._offset = 0                  # samples of _pending[0] already yielded
        self._pos: dict = {}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        self._begin()
        yield from self._batches()
        self._finish()

    # ------------------------------------------------------------------------------------------- position / resume
    def state_dict(self) -> dict:
        """Where this epoch stands, between two batches: enough to rebuild the next batches exactly.

        Worker items received but not yet batched are not saved: the position is the one from before the first of
        them arrived, and the resumed workers deliver those items again (their first `drop` samples were batched
        already). Per worker role: shuffled samples delivered so far, which the resumed worker skips without decoding.
        """
        if self._pending:
            base, drop = self._pending[0].before, self._offset
        else:
            base, drop = self._snapshot(), 0
        seen = None
        if self.seen is not None:
            seen = SeenIds(self.seen.num_samples)
            seen.bits.copy_(self.seen.bits)
            for arrival in self._pending:
                seen.remove(arrival.marked)
            seen = seen.state_dict()
        return {"fingerprint": self._fingerprint(), "position": base, "drop": drop, "seen": seen,
                "samples": self.stats["samples"], "batches": self.stats["batches"]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a loader of the same epoch; UsageError naming what differs otherwise."""
        ours, theirs = self._fingerprint(), state["fingerprint"]
        changed = [f"{key} {ours.get(key)} (checkpoint: {theirs.get(key)})" for key in sorted(set(ours) | set(theirs))
                   if ours.get(key) != theirs.get(key)]
        if changed:
            raise UsageError(f"the checkpoint's data position is for another data order: {'; '.join(changed)}; resume "
                             f"with the same --train-data, --batch-size, --workers, --train-num-samples, --seed and "
                             f"number of processes, or from an end-of-epoch checkpoint (epoch_N.pt)")
        self._resume = state

    def _fingerprint(self) -> dict:
        """What fixes the order of this rank's samples (a resumed loader must match it)."""
        urls = hashlib.sha256("\n".join(s.url for s in self.shards).encode()).hexdigest()[:16]
        return {"shards": urls, "seed": list(self.cfg.seed), "batch_size": self.cfg.batch_size,
                "workers": self._roles(self.shards), "num_batches": self.num_batches, "sample_cap": self.sample_cap,
                "resampled": self.cfg.resampled}

    def _snapshot(self) -> dict:
        """The arrival-side state: pass, per-role progress, round-robin cursor and the counters kept at arrival."""
        return {**self._pos, "emitted": list(self._pos["emitted"]), "skipped": dict(self.skipped),
                "reads": dict(self.reads), "first_pass": self.stats["first_pass"], "passes": self.stats["passes"]}

    def _begin(self) -> None:
        """Fresh epoch state, or the state loaded with load_state_dict."""
        self.skipped.clear()
        self.stats.clear()
        self.reads.clear()
        self._pending, self._offset, self.joined = [], 0, 0
        self._pos = {"pass_index": 0, "emitted": [0] * self._roles(self.shards), "next_role": 0, "got": 0}
        if self.seen is not None:
            self.seen.clear()
        state, self._resume = self._resume, None
        if state is None:
            return
        position = {**state["position"], "emitted": list(state["position"]["emitted"])}     # the state stays as given
        self.skipped.update(position.pop("skipped"))
        self.reads.update(position.pop("reads"))
        self.stats.update(first_pass=position.pop("first_pass"), passes=position.pop("passes"),
                          samples=state["samples"], batches=state["batches"])
        self._pos, self._offset = position, state["drop"]
        if self.seen is not None and state["seen"] is not None:
            self.seen.load_state_dict(state["seen"])

    def _roles(self, shards: list[Shard]) -> int:
        """Worker roles of a pass: DataLoader workers (at most one per shard), 1 without workers."""
        return max(1, self.workers if self.cfg.resampled else min(self.workers, len(shards)))

    # -------------------------------------------------------------------------------------------------- streaming
    def _loader(self, pass_index: int) -> DataLoader:
        """A DataLoader over this rank's shards; later passes (to fill a rank's quota) use a new shard order; inside a
        resumed pass the workers take their roles from the round-robin cursor and skip what was delivered."""
        cfg = self.cfg if pass_index == 0 else replace(self.cfg, seed=(*self.cfg.seed, pass_index))
        shards = self.shards
        if pass_index > 0 and not cfg.resampled:
            shards = random.Random(stable_seed(*cfg.seed)).sample(shards, len(shards))
        if self._pos["next_role"] or any(self._pos["emitted"]):
            cfg = replace(cfg, rotation=self._pos["next_role"], skip=tuple(self._pos["emitted"]))
        workers = self.workers if cfg.resampled else min(self.workers, len(shards))
        stream = ShardStream(shards, cfg, self.preprocess, self.tokenizer)
        return DataLoader(stream, batch_size=None, num_workers=workers,
                          generator=torch.Generator().manual_seed(stable_seed(*cfg.seed, "augment")),
                          pin_memory=self.pin_memory)

    def _next_size(self) -> int:
        if self.sample_cap is None:
            return self.cfg.batch_size
        return min(self.cfg.batch_size, self.sample_cap - self.stats["samples"])

    def _items(self) -> Iterator[_Arrival]:
        """Worker items of one pass, or of as many as `exact` needs, as arrivals; a worker's error is raised here."""
        while True:
            pass_index = self._pos["pass_index"]
            items = iter(self._loader(pass_index))
            try:
                for item in items:
                    arrival = self._arrive(pass_index, item)
                    if arrival is not None:
                        yield arrival
            finally:
                del items                  # stop the workers now, not when a traceback holding them is collected
            self.stats["passes"] = pass_index + 1
            if self._pos["got"] == 0:
                raise no_sample_error(self.shards, self.skipped, self.cfg.caption_key)
            if not self.exact:
                return
            self._pos = {"pass_index": pass_index + 1, "emitted": [0] * len(self._pos["emitted"]), "next_role": 0,
                         "got": 0}

    def _arrive(self, pass_index: int, item: dict) -> _Arrival | None:
        """Account for one worker item (position, counts, duplicate ids); the arrival to batch, if any."""
        before = self._snapshot()
        if pass_index == 0:                    # later passes re-read the same shards: count each sample once
            self.skipped.update(item["skipped"])
            self.reads.update(item["reads"])
        if "error" in item:
            raise UsageError(item["error"])
        role = item["worker"]
        self._pos["emitted"][role] = -1 if item["end"] else item["emitted"]
        self._pos["next_role"] = (role + 1) % len(self._pos["emitted"])
        if item["end"]:
            return None
        marked = torch.zeros(0, dtype=torch.int64)
        if pass_index == 0 and self.seen is not None:
            item, marked = self._drop_duplicates(item)
        self._pos["got"] += len(item["ids"])
        self.stats["first_pass"] += 0 if pass_index else len(item["ids"])
        return _Arrival(item, before, marked, pass_index) if len(item["ids"]) else None

    def _drop_duplicates(self, item: dict) -> tuple[dict, Tensor]:
        """Mark the item's ids as seen; a repeated id is an error naming both places, or dropped and counted."""
        repeated = self.seen.add(item["ids"])                                          # [k] bool
        if not bool(repeated.any()):
            return item, item["ids"]
        for k in repeated.nonzero().flatten().tolist():
            gid, here = int(item["ids"][k]), item["sources"][k]
            if not self.cfg.skip_bad_samples:
                earlier = next((p for p in id_places(self.shards, gid) if p != here), "an earlier sample")
                raise UsageError(f"id {gid} comes twice in this epoch: {earlier} and {here}; fix the ids (clip-glofnd "
                                 f"check-shards PATTERN lists duplicates) or pass --skip-bad-samples")
            self.skipped["duplicate_id"] += 1
            logger.warning("skipping bad sample (duplicate_id): %s: id %d was delivered earlier this epoch", here, gid)
        keep = ~repeated
        item = {**item, **{key: item[key][keep] for key in _TENSORS},
                "sources": [s for s, k in zip(item["sources"], keep.tolist()) if k]}
        return item, item["ids"]

    def _batches(self) -> Iterator[Batch]:
        for arrival in self._items():
            self._pending.append(arrival)
            while 0 < self._next_size() <= self._pending_count():
                yield self._take(self._next_size())
                if (self.exact and self.stats["batches"] == self.num_batches) or self._next_size() == 0:
                    return
        if self._pending:
            yield self._take(self._pending_count())

    def _pending_count(self) -> int:
        return sum(len(a.item["ids"]) for a in self._pending) - self._offset

    def _take(self, n: int) -> Batch:
        """The first n pending samples as a Batch (first in, first out); the rest stay pending."""
        chunks: list[dict] = []
        first_seen: list[Tensor] = []
        while n:
            head = self._pending[0]
            k = min(n, len(head.item["ids"]) - self._offset)
            chunks.append({key: head.item[key][self._offset:self._offset + k] for key in _TENSORS})
            first_seen.append(torch.full((k,), head.pass_index == 0))
            n, self._offset = n - k, self._offset + k
            if self._offset == len(head.item["ids"]):
                self._pending.pop(0)
                self._offset = 0
        batch = {key: _join([c[key] for c in chunks], self.pin_memory) for key in _TENSORS}
        self.joined += len(chunks) > 1
        self.stats["samples"] += len(batch["ids"])
        self.stats["batches"] += 1
        labels = batch["labels"] if bool((batch["labels"] >= 0).any()) else None
        return Batch(batch["images"], batch["texts"], batch["ids"], labels,
                     torch.cat(first_seen) if self.seen is not None else None)

    def _finish(self) -> None:
        first_pass = min(self.stats.pop("first_pass", 0), self.stats["samples"])   # pending is FIFO: first pass first
        self.stats["repeated"] = self.stats["samples"] - first_pass
        counts = [s.count for s in self.shards]
        if not self.cfg.resampled and None not in counts:
            self.stats["unvisited"] = max(0, sum(counts) - first_pass - sum(self.skipped.values()))
        if self.skipped:
            logger.warning("skipped %d bad samples this epoch: %s", sum(self.skipped.values()), dict(self.skipped))
        shortfall = None
        if self.stats["passes"] and self.expected_samples is not None:
            shortfall = shortfall_message(self.shards, self.reads, self.expected_samples, exact=self.exact,
                                          samples_per_epoch=self.samples_per_epoch, rank=self.cfg.seed[2])
        if shortfall:
            logger.warning("%s", shortfall)
        if self.stats["repeated"] or self.stats["unvisited"] or self.stats["batches"] != self.num_batches:
            logger.info("epoch data (expected %d batches): %s", self.num_batches, dict(self.stats))


def make_train_loader(pattern: str, *, preprocess: Callable, tokenizer: Callable, batch_size: int,
                      num_samples: int | None, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                      workers: int = 1, caption_key: str = "txt", skip_bad_samples: bool = False,
                      resampled: bool = False, train_num_samples: int | None = None,
                      shuffle_buffer: int = 2000, pin_memory: bool = False, uint8: bool = False) -> TrainLoader:
    """Loader over `pattern` for one epoch on one rank; see the module docstring for splitting and epoch rules.

    Args:
        num_samples: size of the id space (max id + 1); None reads it from sizes.json (resolve_num_samples).
        train_num_samples: samples per epoch over all ranks (OpenCLIP's --train-num-samples); default: the shard
            counts from sizes.json, else num_samples. Required in practice with `resampled`.
        caption_key: a member extension ("txt") or "json:FIELD" for a field of the json member.
        shuffle_buffer: samples held (still encoded) per worker for shuffling.
        pin_memory: batches in pinned memory, for `Batch.to(cuda, non_blocking=True)`; ignored (with a warning)
            without CUDA.
        uint8: workers send uint8 images (`preprocess` minus its ToTensor, Normalize); the trainer normalises them
            with `normalize_on_device(batch.images, *loader.mean_std)`.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0 or shuffle_buffer < 1:
        raise UsageError(f"need batch_size >= 1, workers >= 0, shuffle_buffer >= 1 and 0 <= rank < world_size; got "
                         f"{batch_size=}, {workers=}, {shuffle_buffer=}, {rank=}, {world_size=}")
    shards, id_space = resolve_shards(pattern, num_samples)
    counts = [s.count for s in shards]
    if train_num_samples is not None:
        samples_per_epoch = train_num_samples
    elif None not in counts:
        samples_per_epoch = sum(counts)
    else:
        samples_per_epoch = resolve_num_samples(pattern, num_samples)
        logger.warning("no per-shard counts in %s for %s; assuming %d samples per epoch (pass train_num_samples)",
                       SIZES_JSON, pattern, samples_per_epoch)
    order = random.Random(stable_seed(seed, epoch, "shards")).sample(shards, len(shards))
    mine = order if resampled else order[rank::world_size]
    if len(shards) < world_size and not resampled:
        raise UsageError(f"{pattern!r} has {len(shards)} shards, fewer than world_size={world_size}; write smaller "
                         f"shards so that every rank gets at least one")
    exact = world_size > 1 or resampled
    num_batches = samples_per_epoch // (world_size * batch_size) if exact else math.ceil(samples_per_epoch / batch_size)
    if num_batches < 1:
        raise UsageError(f"{samples_per_epoch} samples per epoch give no full batch of {batch_size} on each of "
                         f"{world_size} ranks; lower --batch-size")
    cfg = StreamConfig(batch_size, caption_key, skip_bad_samples, shuffle_buffer, (seed, epoch, rank), resampled)
    cap = train_num_samples if not exact else None
    mine_counts = [s.count for s in mine]
    expected = (None if resampled else sum(mine_counts) if None not in mine_counts
                else round(samples_per_epoch * len(mine) / len(shards)))      # shards are assumed of even size
    if pin_memory and not torch.cuda.is_available():
        logger.warning("pin_memory needs CUDA, which is not available: batches are not pinned")
        pin_memory = False
    mean_std = None
    if uint8:
        preprocess, mean, std = split_normalize(preprocess)
        mean_std = (mean, std)
    return TrainLoader(mine, cfg, preprocess, tokenizer, workers, samples_per_epoch, num_batches, exact, cap, expected,
                       seen=None if resampled else SeenIds(id_space), pin_memory=pin_memory,
                       mean_std=mean_std)
