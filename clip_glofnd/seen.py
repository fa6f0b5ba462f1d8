"""Which global ids an epoch has already delivered: one bit per id (n/8 bytes; 1.6 MB for CC12M's 12.4 M ids).

A sample id that comes twice in one epoch means the same id sits in two places of the data (two shards, or twice in
one): both would update the same λ row and the same u row, so the loader stops (or, with --skip-bad-samples, drops
and counts the repeat) instead of training on it. Pure tensor code on the CPU; no I/O, no torch.distributed.
"""
from __future__ import annotations

import torch
from torch import Tensor


class SeenIds:
    """A bitmap over [0, num_samples): `add` marks ids and reports which of them were there already."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = int(num_samples)
        self.bits = torch.zeros((self.num_samples + 7) // 8, dtype=torch.uint8)      # [ceil(n / 8)]

    def contains(self, ids: Tensor) -> Tensor:
        """bool [k]: id already marked (ids int64 [k] in [0, num_samples))."""
        ids = ids.to("cpu", torch.long)
        return (self.bits[ids >> 3] >> (ids & 7).to(torch.uint8)) & 1 == 1

    def add(self, ids: Tensor) -> Tensor:
        """Mark `ids` [k]; returns bool [k]: True where the id was marked before or occurs earlier in `ids`."""
        ids = ids.to("cpu", torch.long)
        repeated = self.contains(ids) | _later_occurrence(ids)                       # [k]
        new = ids[~repeated]                                                          # distinct, unmarked ids
        bit = torch.ones_like(new, dtype=torch.uint8) << (new & 7).to(torch.uint8)   # [k'] one bit each
        self.bits.index_put_((new >> 3,), bit, accumulate=True)                      # distinct unset bits: + == |
        return repeated

    def remove(self, ids: Tensor) -> None:
        """Unmark `ids` (each marked, distinct); the inverse of an `add` that returned no repeat for them."""
        ids = ids.to("cpu", torch.long)
        bit = torch.ones_like(ids, dtype=torch.uint8) << (ids & 7).to(torch.uint8)
        minus_bit = (256 - bit.to(torch.int16)).to(torch.uint8)                       # -bit modulo 256
        self.bits.index_put_((ids >> 3,), minus_bit, accumulate=True)

    def count(self) -> int:
        """Number of marked ids."""
        return int(_POPCOUNT[self.bits.long()].sum())

    def clear(self) -> None:
        """Unmark everything (a new epoch)."""
        self.bits.zero_()

    def state_dict(self) -> dict[str, Tensor | int]:
        """{"num_samples", "bits"} (a copy)."""
        return {"num_samples": self.num_samples, "bits": self.bits.clone()}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore `state_dict()` output; ValueError for another num_samples."""
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"SeenIds: state for {state['num_samples']} ids, this one has {self.num_samples}")
        self.bits.copy_(state["bits"])


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)   # [256] bits set per byte


def _later_occurrence(ids: Tensor) -> Tensor:
    """bool [k]: True where the same id occurs at an earlier position of `ids`."""
    if ids.numel() < 2:
        return torch.zeros_like(ids, dtype=torch.bool)
    sorted_ids, order = torch.sort(ids, stable=True)                                 # equal ids keep their order
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[1:] = sorted_ids[1:] == sorted_ids[:-1]
    return torch.zeros_like(repeat).scatter_(0, order, repeat)
