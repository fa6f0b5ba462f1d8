"""Where the per-sample state lives, and the rows of it that each step lends to the math.

The per-sample state is GloFND's λ, m, v (float32) and steps (int32) for image anchors and for text anchors, plus
SogCLR / FastCLIP's u_img, u_txt (float32): 40 B per sample (32 with CLIP). A step reads and writes only the rows of
its local anchors. Two flags place it (`--state-device`, `--state-sharding`):

- ``train`` + ``replicated`` (default): all n rows on the training device, inside the GloFND and loss objects; after
  the step, one all-gather of the rows every rank wrote (`distributed.sync_rows`).
- ``cpu`` + ``replicated``: all n rows in CPU memory, read with the loader's CPU ids; the b local rows go to the
  device in one packed copy from pinned memory before the step; after it the same all-gather, and the gathered rows
  come back in one non-blocking copy that the next fetch waits for before it writes them into the tables.
- ``by-id`` (on either device): rank r holds the rows of ids ≡ r (mod W), ceil(n / W) of them; a fixed-size
  all-to-all fetches the local anchors' rows from their owners (`distributed.exchange_rows` with b rows per peer:
  every owner answers every requester's b slots, the rows it does not own being filler, so no split size is read on
  the host); after the step the all-gather of the written rows, each owner keeping those it holds. Which rank needs
  which row follows from the gathered batch ids every rank already has, so no request travels. At world size 1 the
  one shard holds every row.

Nothing here reads the device in a step (the ids were validated where they entered, by the loader; a direct caller
that passes no CPU ids gets them range-checked with one read).

Outside the default placement the GloFND and loss objects the trainer calls hold *working rows*: --batch-size rows
on the training device. `fetch` writes the state of local anchor i's id into working row p_i, the first local
position holding that id (a repeated id is one row, as it is one row of the full table), and hands the math p as
its ids; `commit` writes the updated rows back to where they live. The math thus computes on exactly the numbers it
would read from the full table: a placement changes where rows are stored and how they travel, never a value. When
several ranks write the same id in one step, the lowest rank's row wins in every placement (as sync_rows).

Not prefetched: the next batch's rows are read at the start of its own step, after this step's rows were written,
so an id in two consecutive batches is never read stale. The rows are b × 40 B (40 KB at b = 1024).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from clip_glofnd import distributed
from clip_glofnd.distributed import DistInfo

logger = logging.getLogger(__name__)

DEVICES = ("train", "cpu")
SHARDINGS = ("replicated", "by-id")
Rows = dict[str, dict[str, Tensor]]            # holder name -> state key -> [R] rows


class Holder(Protocol):
    """GloFND or a loss: per-sample rows by id, and a state_dict (rows and any other state, e.g. FastCLIP's τ)."""

    def export_rows(self, ids: Tensor) -> dict[str, Tensor]: ...

    def import_rows(self, ids: Tensor, rows: dict[str, Tensor]) -> None: ...

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any: ...


def lends_rows(device: str, sharding: str) -> bool:
    """True when the GloFND / loss objects hold only the batch's rows (every placement but train + replicated)."""
    return device == "cpu" or sharding == "by-id"


def working_rows(num_samples: int, batch_size: int, device: str, sharding: str) -> int:
    """Size to build the GloFND / loss objects with: num_samples for the default placement, else the batch size."""
    return batch_size if lends_rows(device, sharding) else num_samples


def held_ids(num_samples: int, rank: int, world_size: int) -> Tensor:
    """Global ids of the rows shard `rank` of `world_size` holds, in table order: rank, rank + W, rank + 2W, ..."""
    return torch.arange(rank, num_samples, world_size)


class StateStore:
    """The per-sample tables of a run, placed per `device` / `sharding`, and the per-step lending of their rows.

    `holders` are the math objects by name ("fnd_img", "fnd_txt", "loss"), freshly built with
    `working_rows(...)` rows: their initial row values become the tables' initial values. Per step::

        math_ids = store.fetch(batch.ids, ids_all)     # [b] ids to give GloFND and the loss
        ...                                             # filter, loss, backward, optimizer step
        store.commit()                                  # rows back to their place; ranks agree
    """

    def __init__(self, holders: Mapping[str, Holder], num_samples: int, dist: DistInfo, *, device: str = "train",
                 sharding: str = "replicated", batch_size: int | None = None) -> None:
        if device not in DEVICES or sharding not in SHARDINGS:
            raise ValueError(f"StateStore: device must be one of {DEVICES} and sharding one of {SHARDINGS}, got "
                             f"{device!r}, {sharding!r}")
        self.holders, self.num_samples, self.dist = dict(holders), int(num_samples), dist
        self.device, self.sharding = device, sharding
        self.lends, self.sharded = lends_rows(device, sharding), sharding == "by-id"
        self.world = dist.world_size if self.sharded else 1                   # shards of the tables
        self.rank = dist.rank if self.sharded else 0
        self.batch_size = batch_size
        empty = torch.zeros(0, dtype=torch.long)
        self.keys = {name: tuple(sorted(holder.export_rows(empty))) for name, holder in self.holders.items()}
        self.tables: Rows = self._make_tables() if self.lends else {}
        self._step: Any = None                                                   # what commit() needs
        self._pending: Any = None                                                # a commit on its way to the host
        if self.sharded and dist.world_size == 1:
            logger.info("--state-sharding by-id at world size 1: the one shard holds every row")

    def _make_tables(self) -> Rows:
        """Tables of the rows this rank holds, filled with the fresh working rows' initial values."""
        where = torch.device("cpu") if self.device == "cpu" else self.dist.device
        size = len(range(self.rank, self.num_samples, self.world))
        first = torch.zeros(1, dtype=torch.long)
        tables: Rows = {}
        for name, holder in self.holders.items():
            row = holder.export_rows(first)                                       # [1] per key: initial values
            tables[name] = {key: row[key].to(where).expand(size, *row[key].shape[1:]).clone() for key in
                            self.keys[name]}
        return tables

    # ---------------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def fetch(self, ids: Tensor, ids_all: Tensor, cpu_ids: Tensor | None = None) -> Tensor:
        """The ids to give the math for this rank's anchors `ids` [b]: `ids` itself in the default placement, else
        the working-row positions [b] after the rows of `ids` were copied in. `ids_all` [W·b] is the gathered batch
        (every rank's ids, rank order; equal on all ranks), which says who needs which row.

        `cpu_ids`: the same ids on the CPU as the loader gave them, validated there: the trainer passes them, and then
        nothing here reads the device (CPU tables are indexed with them). Without them (a direct caller) the ids are
        range-checked first, with a host read."""
        if not self.lends:
            self._step = ids
            return ids
        if self.batch_size is not None and len(ids) > self.batch_size:
            raise ValueError(f"StateStore: a batch of {len(ids)} rows, but the working rows hold --batch-size "
                             f"{self.batch_size}")
        if cpu_ids is None:
            self._check_ids(ids_all)
            cpu_ids = ids.cpu()
        self._flush()
        positions = distributed.first_occurrence(ids)                            # [b] one working row per id
        if self.sharded:
            rows = self._fetch_by_id(ids, ids_all, cpu_ids)
        else:
            rows = self._read(cpu_ids if self.device == "cpu" else ids)
        for name, holder in self.holders.items():
            if self.keys[name]:
                holder.import_rows(positions, rows[name])
        self._step = (ids, positions)
        return positions

    @torch.no_grad()
    def commit(self) -> None:
        """Write the rows the step updated back where they live, so that every rank reads them next (module doc).

        One all-gather of (ids, rows) over ranks; with tables in CPU memory and a CUDA device the gathered rows come
        back with one non-blocking copy into pinned memory and are written when the tables are next used."""
        if self._step is None:
            raise RuntimeError("StateStore.commit() without a fetch() in this step")
        step, self._step = self._step, None
        if not self.lends:
            distributed.sync_rows(list(self.holders.values()), step, self.dist)
            return
        ids, positions = step
        fields = [self.holders[name].export_rows(positions)[key] for name, key in self._columns()]   # [b] each
        ids_all, *gathered = distributed.gather_rows([ids.to(torch.long), *fields], self.dist)         # [W·b]
        if self.device == "cpu" and ids_all.device.type != "cpu":
            packed = distributed.pack_rows([ids_all, *gathered])
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (event, host, [ids_all, *gathered])
            return
        self._write(ids_all, gathered)

    def discard(self) -> None:
        """Forget the step in flight without writing its rows back (a skipped step): lent rows never reach the
        tables; in the default placement the caller restores the rows it changed in place."""
        self._step = None

    def _flush(self) -> None:
        """Write a commit's rows that are still on their way to host memory (waits for that copy: the price of CPU
        tables on a GPU, one wait per step, at the next fetch)."""
        if self._pending is None:
            return
        event, host, like = self._pending
        self._pending = None
        event.synchronize()
        ids_all, *fields = distributed.unpack_rows(host, like)
        self._write(ids_all, fields)

    def _fetch_by_id(self, ids: Tensor, ids_all: Tensor, cpu_ids: Tensor) -> Rows:
        """Rows of `ids` from their owners in one all-to-all of fixed size: every owner answers every requester's b
        slots (the rows it does not own are filler the requester ignores), so no split size is read on the host.
        Which rank needs which row follows from the gathered ids every rank has: no request travels."""
        world, rank, b = self.dist.world_size, self.dist.rank, len(ids)
        on_cpu = self.device == "cpu"
        requested = distributed.all_gather_cpu(cpu_ids, self.dist) if on_cpu else ids_all      # [W·b]
        index = torch.where(requested % world == rank, requested // world, 0)                 # [W·b] own rows
        fields = [self.tables[name][key].index_select(0, index) for name, key in self._columns()]
        fields = self._to_device(fields)
        received = distributed.exchange_rows(fields, [b] * world, [b] * world, self.dist)     # [W·b] by owner
        owner, slot = ids % world, torch.arange(b, device=ids.device)                         # [b], [b]
        rows: Rows = {name: {} for name in self.holders}
        for (name, key), value in zip(self._columns(), received):
            rows[name][key] = value.view(world, b, *value.shape[1:])[owner, slot]              # [b] local order
        return rows

    def _read(self, ids: Tensor) -> Rows:
        """Rows of `ids` from the full tables, on the training device (one non-blocking copy from pinned memory when
        the tables are in CPU memory and training is on CUDA)."""
        fields = [self.tables[name][key].index_select(0, ids.to(self.tables[name][key].device))
                  for name, key in self._columns()]
        out: Rows = {name: {} for name in self.holders}
        for (name, key), value in zip(self._columns(), self._to_device(fields)):
            out[name][key] = value
        return out

    def _to_device(self, fields: list[Tensor]) -> list[Tensor]:
        """Rows read from CPU tables on the training device: packed, pinned, one non-blocking copy."""
        if not fields or fields[0].device == self.dist.device:
            return fields
        packed = distributed.pack_rows(fields)
        if self.dist.device.type == "cuda":
            packed = packed.pin_memory()
        return distributed.unpack_rows(packed.to(self.dist.device, non_blocking=True), fields)

    def _write(self, ids: Tensor, fields: list[Tensor]) -> None:
        """Write rows [R] of global `ids` [R] into the tables this rank holds: the ids it owns (all of them when
        replicated); for a repeated id the first occurrence wins. On the device without a host read: rows of other
        owners are aimed at the first owned row with that row's value (or rewrite row 0 with itself)."""
        first = distributed.first_occurrence(ids)                                 # [R]
        values = [value[first] for value in fields]                               # duplicates carry equal rows
        target = ids // self.world
        if self.world > 1:
            owned = ids % self.world == self.rank                                 # [R]
            has = owned.any()
            anchor = owned.int().argmax().view(1)                                 # first owned row (0 if none)
            target = torch.where(owned, target, torch.where(has, target.index_select(0, anchor), 0))
        for (name, key), value in zip(self._columns(), values):
            table = self.tables[name][key]
            value = value.to(table.device, table.dtype)
            if self.world > 1:
                keep = owned.to(table.device).view(-1, *[1] * (value.dim() - 1))
                fallback = torch.where(has.to(table.device), value.index_select(0, anchor.to(table.device)), table[:1])
                value = torch.where(keep, value, fallback)
            table[target.to(table.device)] = value

    def _check_ids(self, ids_all: Tensor) -> None:
        """ValueError (on every rank alike: ids_all is the same everywhere) for ids outside [0, num_samples); one host
        read (direct callers only: the trainer's ids were validated by the loader)."""
        bad = int(((ids_all < 0) | (ids_all >= self.num_samples)).sum())
        if bad:
            raise ValueError(f"StateStore: {bad} of {len(ids_all)} ids in the batch outside "
                             f"[0, {self.num_samples}); --num-samples (or sizes.json) must exceed every sample id")

    def _columns(self) -> Iterator[tuple[str, str]]:
        """(holder, key) of every per-sample column, in a fixed order (the order rows travel in)."""
        for name in self.holders:
            for key in self.keys[name]:
                yield name, key

    # -------------------------------------------------------------------------------------------- tables and files
    def table(self, name: str, key: str) -> Tensor:
        """Column `key` of holder `name` for the rows this rank holds (`self.held_ids()`): the live full table when
        replicated, this rank's shard when sharded."""
        if not self.lends:
            return self.holders[name].state_dict()[key]
        self._flush()
        return self.tables[name][key]

    def held_ids(self) -> Tensor:
        """Global ids of the rows this rank holds, in table order (all n when replicated)."""
        return held_ids(self.num_samples, self.rank, self.world)

    def held_rows(self) -> Rows:
        """Every per-sample column this rank holds ({holder: {key: [len(held_ids())]}}), live tensors."""
        return {name: {key: self.table(name, key) for key in self.keys[name]} for name in self.holders}

    @torch.no_grad()
    def load_rows(self, ids: Tensor, rows: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Write rows of global `ids` [R] (no repeats; e.g. a whole table or a checkpoint shard) into the tables;
        rows of ids another rank holds are skipped. `rows` gives every column of each holder it names."""
        for name, cols in rows.items():
            if name not in self.keys or sorted(cols) != sorted(self.keys[name]):
                expected = sorted(self.keys.get(name, ())) if name in self.keys else f"a holder of {list(self.keys)}"
                raise ValueError(f"per-sample state {name!r}: keys {sorted(cols)}, expected {expected}")
        ids = ids.to(torch.long)
        keep = ids % self.world == self.rank if self.world > 1 else None          # None: every row is this rank's
        for name, cols in rows.items():
            for key, value in cols.items():
                if value.shape[0] != ids.shape[0]:
                    raise ValueError(f"per-sample state {name}.{key}: {value.shape[0]} rows for {ids.shape[0]} ids")
                table = self.table(name, key)
                if keep is not None:
                    value = value[keep.to(value.device)]
                index = ids if keep is None else ids[keep] // self.world
                table[index.to(table.device)] = value.to(table.device, table.dtype)

    def views(self, rows_in_file: bool = True) -> dict[str, _View]:
        """What checkpoint.make_state / restore should see of each holder (`fnd_img=views["fnd_img"]`, ...): its
        state_dict with full-size rows, or without rows (`rows_in_file` False: sharded checkpoints keep them in
        shard files)."""
        return {name: _View(self, name, rows_in_file) for name in self.holders}


class _View:
    """One holder's state_dict as a checkpoint file has it: full tables of n rows (or none), plus its other state."""

    def __init__(self, store: StateStore, name: str, rows_in_file: bool) -> None:
        self.store, self.name, self.rows_in_file = store, name, rows_in_file
        self.holder, self.keys = store.holders[name], store.keys[name]

    def state_dict(self) -> dict[str, Any]:
        if not self.store.lends and self.rows_in_file:
            return dict(self.holder.state_dict())                                 # today's object, as it is
        own = {k: v for k, v in self.holder.state_dict().items() if k not in self.keys}
        if not self.rows_in_file:
            return own
        return {**own, **{key: self.store.table(self.name, key) for key in self.keys}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not self.store.lends and self.rows_in_file:
            self.holder.load_state_dict(state_dict)
            return
        if self.rows_in_file:
            self._load_full_rows(state_dict)
        own = {k: v for k, v in state_dict.items() if k not in self.keys}
        live = self.holder.state_dict()
        self.holder.load_state_dict({**own, **{key: live[key] for key in self.keys}})   # working rows unchanged

    def _load_full_rows(self, state_dict: Mapping[str, Any]) -> None:
        missing = [key for key in self.keys if key not in state_dict]
        if missing:
            raise ValueError(f"{self.name}: missing per-sample keys {missing}")
        sizes = {int(state_dict[key].shape[0]) for key in self.keys}
        if sizes and sizes != {self.store.num_samples}:
            raise ValueError(f"{self.name}: per-sample state for {sorted(sizes)} samples, this run has "
                             f"{self.store.num_samples} (--num-samples / sizes.json)")
        n = self.store.num_samples
        self.store.load_rows(torch.arange(n), {self.name: {key: state_dict[key] for key in self.keys}})
