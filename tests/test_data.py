"""clip_glofnd.data: global ids, rank x worker splitting, seeded shuffling, bad input, end-of-shard behaviour.

Shards here are written with plain `tarfile` (not our ShardWriter), so the loader is checked against an independent
writer. Each sample's image encodes its id (R + 256 G) and its caption is "sample ID", so a batch can be checked
for image / caption / id pairing without a model.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_glofnd.data import Batch, make_train_loader, resolve_num_samples
from clip_glofnd.errors import UsageError


def png(gid: int) -> bytes:
    """An 8x8 RGB PNG whose pixels encode gid (R = gid % 256, G = gid // 256)."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = gid % 256, gid // 256, 7
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(gid: int, key: str | None = None, json_key: object = "same", label: int | None = None) -> dict:
    """Members of one sample; json_key="same" writes {"key": gid}, None writes no json member."""
    members = {"__key__": key if key is not None else f"{gid:09d}", "png": png(gid), "txt": f"sample {gid}"}
    if json_key is not None:
        members["json"] = json.dumps({"key": gid if json_key == "same" else json_key, "caption": f"sample {gid}"})
    if label is not None:
        members["cls"] = str(label)
    return members


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for ext, data in members.items():
                if ext == "__key__":
                    continue
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{members['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_source(root: Path, shard_sizes: list[int], start: int = 0, num_samples: int | None = None,
                sizes_json: bool = True, **kw) -> tuple[str, list[list[int]]]:
    """Shards root/00000.tar.. with consecutive ids from `start`; returns the brace pattern and ids per shard."""
    root.mkdir(parents=True, exist_ok=True)
    ids, gid, counts = [], start, {}
    for i, size in enumerate(shard_sizes):
        ids.append(list(range(gid, gid + size)))
        write_tar(root / f"{i:05d}.tar", [sample(g, **kw) for g in ids[-1]])
        counts[f"{i:05d}.tar"], gid = size, gid + size
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps({**counts, "num_samples": num_samples or gid}))
    return f"{root}/{{00000..{len(shard_sizes) - 1:05d}}}.tar", ids


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()      # [3, 8, 8]


def tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[int(c.split()[-1])] for c in captions])          # [b, 1]


def loader(pattern: str, **kw):
    args = dict(preprocess=preprocess, tokenizer=tokenizer, batch_size=4, num_samples=None, workers=2)
    return make_train_loader(pattern, **{**args, **kw})


def ids_of(batches: list[Batch]) -> list[int]:
    return [i for b in batches for i in b.ids.tolist()]


def check_pairing(batch: Batch, offset: int = 0) -> None:
    """Image, caption and id of each row belong to the same sample."""
    local = batch.ids - offset
    torch.testing.assert_close(batch.images[:, 0, 0, 0] + 256 * batch.images[:, 1, 0, 0], local.float())
    torch.testing.assert_close(batch.texts[:, 0], local)


# ----------------------------------------------------------------------------------------------------------------------
# ids

@pytest.mark.parametrize("id_source", ["json int", "json digit string", "__key__"])
def test_ids_round_trip(tmp_path, id_source):
    kw = {"json int": {}, "json digit string": {}, "__key__": {"json_key": None}}[id_source]
    pattern, ids = make_source(tmp_path, [5, 6], **kw)
    if id_source == "json digit string":     # img2dataset writes "key": "000000012" and a __key__ that may differ
        write_tar(tmp_path / "00000.tar", [sample(g, key=f"x{g}", json_key=f"{g:09d}") for g in ids[0]])
    batches = list(loader(pattern))
    assert sorted(ids_of(batches)) == list(range(11))
    assert all(b.ids.dtype == torch.int64 and b.labels is None for b in batches)
    for b in batches:
        check_pairing(b)


def test_json_key_wins_over_dunder_key(tmp_path):
    write_tar(tmp_path / "00000.tar", [sample(g, key=f"{100 + g:09d}") for g in range(4)])
    assert sorted(ids_of(list(loader(str(tmp_path / "00000.tar"), num_samples=4)))) == [0, 1, 2, 3]


def test_labels_from_cls(tmp_path):
    pattern, _ = make_source(tmp_path, [6], label=3)
    batches = list(loader(pattern, workers=0))
    assert all(b.labels is not None and b.labels.tolist() == [3] * len(b) for b in batches)


def test_caption_from_json_field(tmp_path):
    write_tar(tmp_path / "00000.tar", [{k: v for k, v in sample(g).items() if k != "txt"} for g in range(5)])
    batches = list(loader(str(tmp_path / "00000.tar"), num_samples=5, caption_key="json:caption"))
    for b in batches:
        check_pairing(b)
    with pytest.raises(UsageError, match=r"00000\.tar: sample '000000000'.*no caption under 'txt'"):
        list(loader(str(tmp_path / "00000.tar"), num_samples=5, workers=0))


def test_resolve_num_samples(tmp_path):
    pattern, _ = make_source(tmp_path / "a", [3, 3], num_samples=10)
    assert resolve_num_samples(pattern, None) == 10
    assert resolve_num_samples(pattern, 7) == 7
    bare, _ = make_source(tmp_path / "b", [3], sizes_json=False)
    assert resolve_num_samples(bare, 3) == 3
    with pytest.raises(UsageError, match="sizes.json"):
        resolve_num_samples(bare, None)


def test_sources_with_separate_id_spaces_are_offset(tmp_path):
    a, ids_a = make_source(tmp_path / "a", [4, 4], num_samples=10)
    b, ids_b = make_source(tmp_path / "b", [3])
    assert resolve_num_samples(f"{a}::{b}", None) == 13
    got = sorted(ids_of(list(loader(f"{a}::{b}"))))
    assert got == sum(ids_a, []) + [10 + i for i in sum(ids_b, [])]
    with pytest.raises(UsageError, match="add up to 13"):
        resolve_num_samples(f"{a}::{b}", 12)


def test_sources_sharing_a_sizes_json_share_ids(tmp_path):
    make_source(tmp_path, [4, 4, 4])
    pattern = f"{tmp_path}/00000.tar::{tmp_path}/{{00001..00002}}.tar"
    assert resolve_num_samples(pattern, None) == 12
    assert sorted(ids_of(list(loader(pattern)))) == list(range(12))


# ----------------------------------------------------------------------------------------------------------------------
# splitting across ranks and workers, epochs

def run_ranks(pattern: str, world_size: int, **kw) -> list:
    return [loader(pattern, rank=r, world_size=world_size, **kw) for r in range(world_size)]


def test_every_id_once_per_epoch_2_ranks_x_2_workers(tmp_path):
    pattern, ids = make_source(tmp_path, [12] * 8)
    ranks = run_ranks(pattern, 2, workers=2, batch_size=8)
    per_rank = [list(r) for r in ranks]
    assert [len(b) for b in per_rank] == [6, 6] == [r.num_batches for r in ranks]
    assert all(len(b) == 8 for batches in per_rank for b in batches)
    seen = ids_of(per_rank[0]) + ids_of(per_rank[1])
    assert sorted(seen) == list(range(96))                                 # every id exactly once, no overlap
    assert all(r.stats["repeated"] == 0 and r.stats["unvisited"] == 0 for r in ranks)
    for b in per_rank[0]:
        check_pairing(b)


def test_one_rank_keeps_last_partial_batch(tmp_path):
    pattern, _ = make_source(tmp_path, [7, 7, 7])
    batches = list(loader(pattern, workers=2, batch_size=4))
    assert sorted(ids_of(batches)) == list(range(21))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 1]                  # one partial batch, at the end


def test_more_workers_than_shards(tmp_path):
    pattern, _ = make_source(tmp_path, [5, 5])
    assert sorted(ids_of(list(loader(pattern, workers=4)))) == list(range(10))


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    pattern, ids = make_source(tmp_path, [10] * 6)
    order = {(seed, epoch): ids_of(list(loader(pattern, seed=seed, epoch=epoch)))
             for seed, epoch in [(0, 0), (0, 1), (1, 0)]}
    assert ids_of(list(loader(pattern, seed=0, epoch=0))) == order[0, 0]    # reproducible
    assert order[0, 0] != order[0, 1] and order[0, 0] != order[1, 0]
    assert sorted(order[0, 0]) == sorted(order[0, 1]) == sorted(order[1, 0]) == list(range(60))
    shard_orders = {epoch: [s.url for s in loader(pattern, epoch=epoch).shards] for epoch in range(4)}
    assert len({tuple(v) for v in shard_orders.values()}) > 1                # shard order changes with the epoch


def test_uneven_shards_equal_batches_on_every_rank(tmp_path):
    """Uneven shards: every rank yields exactly num_batches full batches; repeats and unvisited samples counted."""
    sizes = [20, 5, 5, 5, 3]
    pattern, ids = make_source(tmp_path, sizes)
    ranks = run_ranks(pattern, 2, batch_size=4, workers=2)
    assert all(r.num_batches == sum(sizes) // 8 for r in ranks)
    for r in ranks:
        batches = list(r)
        assert len(batches) == r.num_batches and all(len(b) == 4 for b in batches)
        shard_ids = {g for s in r.shards for g in ids[int(Path(s.url).stem)]}
        seen = Counter(ids_of(batches))
        assert set(seen) <= shard_ids                                      # a rank only reads its own shards
        assert r.stats["samples"] == 4 * r.num_batches
        first_pass = r.stats["samples"] - r.stats["repeated"]
        assert first_pass + r.stats["unvisited"] == len(shard_ids)         # every sample of the rank accounted for
        assert sum(seen.values()) - len(seen) <= r.stats["repeated"]
        quota = 4 * r.num_batches
        assert r.stats["repeated"] == max(0, quota - len(shard_ids))               # a short rank makes a 2nd pass
        assert r.stats["unvisited"] == max(0, len(shard_ids) - quota)              # a long rank stops early
    assert sum(r.stats["repeated"] for r in ranks) > 0 and sum(r.stats["unvisited"] for r in ranks) > 0


def test_world_size_with_fewer_shards_is_an_error(tmp_path):
    pattern, _ = make_source(tmp_path, [40])
    with pytest.raises(UsageError, match="fewer than world_size=2"):
        loader(pattern, rank=0, world_size=2)


def test_train_num_samples_caps_one_rank_epoch(tmp_path):
    pattern, _ = make_source(tmp_path, [10, 10])
    batches = list(loader(pattern, train_num_samples=9, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 1]
    assert len(set(ids_of(batches))) == 9


def test_resampled_gives_exact_batches_and_is_reproducible(tmp_path):
    pattern, _ = make_source(tmp_path, [6, 6, 6])
    runs = [loader(pattern, resampled=True, train_num_samples=40, batch_size=4, shuffle_buffer=20) for _ in range(2)]
    out = [ids_of(list(r)) for r in runs]
    assert runs[0].num_batches == 10 and len(out[0]) == 40 and out[0] == out[1]
    assert set(out[0]) <= set(range(18))


# ----------------------------------------------------------------------------------------------------------------------
# end of shard (webdataset 0.2.86 groups tar members across shard boundaries; we restart at every shard)

def test_same_key_at_shard_boundary_is_two_samples(tmp_path):
    write_tar(tmp_path / "00000.tar", [sample(0), sample(1, key="k")])
    write_tar(tmp_path / "00001.tar", [sample(2, key="k"), sample(3)])
    pattern = f"{tmp_path}/{{00000..00001}}.tar"
    assert sorted(ids_of(list(loader(pattern, num_samples=4, workers=0)))) == [0, 1, 2, 3]


def test_pinned_webdataset_merges_across_shards(tmp_path):
    """Why we group members ourselves: webdataset 0.2.86's group_by_keys does not reset at a shard boundary."""
    wds = pytest.importorskip("webdataset")
    if wds.__version__ != "0.2.86":
        pytest.skip(f"documents webdataset 0.2.86, found {wds.__version__}")
    write_tar(tmp_path / "00000.tar", [{"__key__": "k", "txt": "a"}])
    write_tar(tmp_path / "00001.tar", [{"__key__": "k", "cls": "1"}])
    samples = list(wds.WebDataset(f"{tmp_path}/{{00000..00001}}.tar", shardshuffle=False))
    assert len(samples) == 1 and {"txt", "cls"} <= set(samples[0])          # two shards' members in one sample


def test_empty_shard(tmp_path):
    pattern, _ = make_source(tmp_path, [3, 3])
    write_tar(tmp_path / "00001.tar", [])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 0, "num_samples": 6}))
    assert sorted(ids_of(list(loader(pattern)))) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------------------
# bad input: an error naming shard and key, or a counted skip

def corrupt(tmp_path: Path, kind: str) -> tuple[str, str, str]:
    """Shard 00001.tar with one bad sample of `kind`; returns the pattern, the error regex and the skip kind."""
    pattern, _ = make_source(tmp_path, [4, 4])
    good = [sample(g) for g in range(4, 8)]
    bad = good[1]
    if kind == "truncated_shard":
        write_tar(tmp_path / "00001.tar", good)
        data = (tmp_path / "00001.tar").read_bytes()
        (tmp_path / "00001.tar").write_bytes(data[:2 * 512 * 4 + 700])      # cut inside the second sample
        return pattern, r"00001\.tar: sample '000000005'.*truncated", kind
    if kind == "unreadable_image":
        bad["png"] = b"not a png"
    elif kind == "missing_image":
        del bad["png"]
    elif kind == "missing_caption":
        del bad["txt"]
    elif kind == "non_utf8_caption":
        bad["txt"] = "café".encode("latin-1")                               # b"caf\xe9": not UTF-8
    elif kind == "bad_key":
        bad["json"] = json.dumps({"key": "five"})
    elif kind == "id_out_of_range":
        bad["json"] = json.dumps({"key": 8})
    elif kind == "bad_json":
        bad["json"] = "{not json"
    elif kind == "bad_label":
        bad["cls"] = "seven"
    write_tar(tmp_path / "00001.tar", good)
    detail = {"non_utf8_caption": ": txt member is not UTF-8"}.get(kind, "")
    return pattern, r"00001\.tar: sample '000000005'" + detail, kind


BAD_KINDS = ["unreadable_image", "missing_image", "missing_caption", "non_utf8_caption", "bad_key",
             "id_out_of_range", "bad_json", "bad_label", "truncated_shard"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_sample_is_an_error_naming_shard_and_key(tmp_path, kind):
    pattern, message, _ = corrupt(tmp_path, kind)
    with pytest.raises(UsageError, match=message):
        list(loader(pattern, workers=1))                                    # raised in a worker, re-raised here


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_sample_is_skipped_and_counted(tmp_path, kind):
    pattern, _, skip_kind = corrupt(tmp_path, kind)
    run = loader(pattern, skip_bad_samples=True)
    seen = ids_of(list(run))
    lost = [5, 6, 7] if kind == "truncated_shard" else [5]                  # a truncated shard loses its tail
    assert run.skipped == Counter({skip_kind: len(lost)})                   # counted as the samples lost, not 1
    assert sorted(seen) == [g for g in range(8) if g not in lost]
    assert run.stats["unvisited"] == 0                                      # every sample yielded or skipped


def test_shard_shorter_than_sizes_json_is_truncated(tmp_path):
    pattern, _ = make_source(tmp_path, [4, 4])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": 5, "num_samples": 9}))
    with pytest.raises(UsageError, match=r"00001\.tar: sample '000000007': ends after 4 samples but sizes.json"):
        list(loader(pattern))
    run = loader(pattern, skip_bad_samples=True)
    assert sorted(ids_of(list(run))) == list(range(8)) and run.skipped == Counter({"truncated_shard": 1})


def test_missing_shard(tmp_path):
    pattern, _ = make_source(tmp_path, [4, 4])
    (tmp_path / "00001.tar").unlink()
    with pytest.raises(UsageError, match=r"00001\.tar: cannot open shard"):
        list(loader(pattern))
    run = loader(pattern, skip_bad_samples=True)
    assert sorted(ids_of(list(run))) == [0, 1, 2, 3] and run.skipped == Counter({"unreadable_shard": 4})


def test_caption_bytes_are_never_replaced(tmp_path):
    """The same non-UTF-8 bytes that fail in json fail in txt: no caption with U+FFFD reaches the tokenizer."""
    write_tar(tmp_path / "00000.tar", [{**sample(0), "txt": b"sample \xff0"}, sample(1)])
    with pytest.raises(UsageError, match=r"00000\.tar: sample '000000000': txt member is not UTF-8"):
        list(loader(str(tmp_path / "00000.tar"), num_samples=2, workers=0))
    write_tar(tmp_path / "00000.tar", [{**sample(0), "json": b'{"key": 0, "caption": "\xff"}'}, sample(1)])
    with pytest.raises(UsageError, match=r"00000\.tar: sample '000000000': unreadable json"):
        list(loader(str(tmp_path / "00000.tar"), num_samples=2, workers=0, caption_key="json:caption"))


# ----------------------------------------------------------------------------------------------------------------------
# no readable shard at all: one line naming the shards and what was skipped (never a traceback)

def unreadable_source(root: Path, fault: str) -> str:
    """Two shards that give no sample because of `fault`; returns their pattern."""
    root.mkdir(parents=True, exist_ok=True)
    if fault == "typo":
        return f"{root}/typo/{{00000..00001}}.tar"
    if fault == "tgz":                                          # an archive of a shard folder instead of the shards
        make_source(root / "shards", [3])
        for name in ("a.tgz", "b.tgz"):
            with tarfile.open(root / name, "w:gz") as tgz:
                tgz.add(root / "shards", arcname="shards")
        return f"{root}/{{a,b}}.tgz"
    if fault == "garbage":
        (root / "00000.tar").write_bytes(b"<html>404 Not Found</html>" * 40)
        (root / "00001.tar").write_bytes(b"")
    else:                                                       # "empty": valid tars without members
        write_tar(root / "00000.tar", [])
        write_tar(root / "00001.tar", [])
    return f"{root}/{{00000..00001}}.tar"


NO_SAMPLE = {  # fault -> (strict error, what the skip error says)
    "typo": (r"typo/0000[01]\.tar: cannot open shard \(.*No such file.*\); check the shard pattern",
             r"not found \(first: \S+/typo/0000[01]\.tar; a typo in the pattern\?\); skipped: \{'unreadable_shard': "),
    "tgz": (r"[ab]\.tgz: holds the archive 'shards/00000\.tar', not samples: is it an archive of shards\?",
            r"skipped: \{'unreadable_shard': \d\}.*; first: \S+[ab]\.tgz: holds the archive"),
    "garbage": (r"0000[01]\.tar: not a tar archive: (an empty file|1040 bytes starting b'<html>404 Not Fo')",
                r"skipped: \{'unreadable_shard': \d\}.*; first: \S+0000[01]\.tar: not a tar archive"),
    "empty": (r"no valid sample in this rank's \d shard\(s\) \(\S+0000[01]\.tar.*\): the tars are empty", None),
}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("fault", list(NO_SAMPLE))
def test_no_readable_shard_is_one_clear_line(tmp_path, fault, skip, world_size):
    pattern = unreadable_source(tmp_path, fault)
    strict, skipped = NO_SAMPLE[fault]
    message = skipped if skip and skipped else strict
    if skip and skipped:
        message = r"^no valid sample in this rank's \d shard\(s\) \(\S+( … \S+)?\): .*" + message
    for rank in range(world_size):
        run = loader(pattern, num_samples=16, rank=rank, world_size=world_size, workers=1, skip_bad_samples=skip)
        with pytest.raises(UsageError, match=message) as error:
            list(run)
        assert "\n" not in str(error.value)                                 # one line for the CLI's error print


# ----------------------------------------------------------------------------------------------------------------------
# samples lost without an error: tars cut at a header boundary, empty tars; the epoch's shortfall is a WARNING

def cut_after(path: Path, samples: int, members_per_sample: int = 3) -> None:
    """Cut a tar exactly before the header of sample `samples` (tarfile then reads a shorter tar, no error)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[samples * members_per_sample].offset
    path.write_bytes(path.read_bytes()[:offset])


def short_source(root: Path, per_shard_counts: bool) -> str:
    """4 shards of 4 samples; 00001.tar cut after 1 sample, 00002.tar an empty tar."""
    pattern, _ = make_source(root, [4, 4, 4, 4])
    cut_after(root / "00001.tar", 1)
    write_tar(root / "00002.tar", [])
    if not per_shard_counts:
        (root / "sizes.json").write_text(json.dumps({"num_samples": 16}))
    return pattern


def shortfall_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "shortfall" in r.getMessage()]


def test_short_epoch_without_shard_counts_warns(tmp_path, caplog):
    pattern = short_source(tmp_path, per_shard_counts=False)
    run = loader(pattern)
    assert sorted(ids_of(list(run))) == [0, 1, 2, 3, 4, 12, 13, 14, 15] and not run.skipped    # no error: silent
    assert run.reads == {f"{tmp_path}/{i:05d}.tar": n for i, n in enumerate([4, 1, 0, 4])}   # sent by the workers
    [warning] = shortfall_warnings(caplog)
    assert "its 4 shards gave 9 samples, 7 (43.8%) fewer than the 16 expected" in warning
    assert f"{tmp_path}/00002.tar none (empty), {tmp_path}/00001.tar 1 (about 4 expected per shard)" in warning
    assert "--train-num-samples 9" in warning


def test_short_epoch_warns_on_the_short_rank(tmp_path, caplog):
    pattern = short_source(tmp_path, per_shard_counts=False)
    reads = {f"{tmp_path}/{i:05d}.tar": n for i, n in enumerate([4, 1, 0, 4])}
    for rank in range(2):
        caplog.clear()
        run = loader(pattern, rank=rank, world_size=2, workers=0)         # a short rank makes many passes
        assert len(list(run)) == run.num_batches == 2                      # exact batches even so (2nd pass)
        total = sum(reads[s.url] for s in run.shards)
        warnings = shortfall_warnings(caplog)
        assert len(warnings) == (total < 8)                                 # 8 = this rank's share of 16
        if warnings:
            assert f"gave {total} samples, {8 - total} " in warnings[0] and "fewer than the 8 expected" in warnings[0]
            assert all(s.url in warnings[0] for s in run.shards if reads[s.url] < 4)


def test_short_epoch_with_shard_counts_names_each_short_shard(tmp_path, caplog):
    pattern = short_source(tmp_path, per_shard_counts=True)
    with pytest.raises(UsageError, match=r"00002\.tar: ends after 0 samples but sizes.json says 4"):
        list(loader(pattern, workers=0))
    caplog.clear()
    run = loader(pattern, skip_bad_samples=True)
    assert len(ids_of(list(run))) == 9
    assert run.skipped == Counter({"truncated_shard": 3 + 4})               # the samples lost, not 2 (shards)
    assert run.stats["unvisited"] == 0
    [warning] = shortfall_warnings(caplog)
    assert "gave 9 samples, 7 (43.8%) fewer than the 16 that sizes.json lists for them" in warning
    assert f"short shards: {tmp_path}/00002.tar 0 of 4, {tmp_path}/00001.tar 1 of 4;" in warning


def test_full_epoch_does_not_warn(tmp_path, caplog):
    pattern, _ = make_source(tmp_path, [4, 4, 4])
    (tmp_path / "sizes.json").write_text(json.dumps({"num_samples": 12}))
    assert len(ids_of(list(loader(pattern)))) == 12
    assert not shortfall_warnings(caplog)


# ----------------------------------------------------------------------------------------------------------------------
# the digits data set through open_clip's preprocess and tokenizer

@pytest.fixture(scope="module")
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    config = Path(__file__).parents[1] / "clip_glofnd" / "model_configs" / "clip-tiny.json"
    open_clip.add_model_config(str(config))
    _, preprocess_train, _ = open_clip.create_model_and_transforms("clip-tiny")
    return preprocess_train, open_clip.get_tokenizer("clip-tiny")


def test_digits_through_open_clip(digits_dir, tiny_clip):
    summary = json.loads((digits_dir / "digits.json").read_text())
    preprocess_train, clip_tokenizer = tiny_clip
    num_samples = resolve_num_samples(summary["train"], None)
    run = make_train_loader(summary["train"], preprocess=preprocess_train, tokenizer=clip_tokenizer, batch_size=256,
                            num_samples=num_samples, workers=2)
    batches = list(run)
    assert num_samples == 1500 and len(batches) == run.num_batches == 6
    assert sorted(ids_of(batches)) == list(range(1500))
    b = batches[0]
    assert b.images.shape == (256, 3, 64, 64) and b.images.dtype == torch.float32
    assert b.texts.shape == (256, 32) and b.texts.dtype == torch.long
    truth = {}                                                             # id -> label, read with plain tarfile
    for shard in sorted((digits_dir / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    truth[meta["key"]] = meta["label"]
    for b in batches:
        assert b.labels.tolist() == [truth[i] for i in b.ids.tolist()]


# ----------------------------------------------------------------------------------------------------------------------
# duplicate ids within an epoch (one bit per id in the main process)

def test_duplicate_id_across_shards_is_an_error_naming_both_places(tmp_path):
    pattern, _ = make_source(tmp_path, [4, 4])
    write_tar(tmp_path / "00001.tar", [sample(g) for g in (4, 5, 2, 7)])              # id 2 is also in 00000.tar
    with pytest.raises(UsageError, match=r"id 2 comes twice.*0000[01]\.tar: sample '000000002' and "
                                         r".*0000[01]\.tar: sample '000000002'") as error:
        list(loader(pattern, workers=2))
    assert "00000.tar" in str(error.value) and "00001.tar" in str(error.value)


def test_duplicate_id_is_dropped_and_counted_when_skipping(tmp_path):
    pattern, _ = make_source(tmp_path, [4, 4])
    write_tar(tmp_path / "00001.tar", [sample(g) for g in (4, 5, 2, 2)])              # twice in one shard, once more
    run = loader(pattern, workers=2, skip_bad_samples=True)
    got = ids_of(list(run))
    assert sorted(got) == [0, 1, 2, 3, 4, 5] and run.skipped["duplicate_id"] == 2
    assert run.stats["unvisited"] == 0                                               # 8 = 6 trained + 2 counted


def test_repeat_pass_of_a_short_rank_is_not_a_duplicate(tmp_path):
    pattern, _ = make_source(tmp_path, [20, 4])                                       # rank 1 must repeat samples
    ranks = run_ranks(pattern, 2, batch_size=4, workers=1, shuffle_buffer=2)
    short = next(r for r in ranks if len(r.shards[0].url) and r.shards[0].count == 4)
    batches = list(short)
    assert short.stats["repeated"] > 0 and not short.skipped
    first_seen = torch.cat([b.first_seen for b in batches])
    assert int((~first_seen).sum()) == short.stats["repeated"]                        # repeats flagged, not dropped


# ----------------------------------------------------------------------------------------------------------------------
# resume inside an epoch: state_dict() after k batches + a new loader == the uninterrupted epoch

def noisy_preprocess(image: Image.Image) -> torch.Tensor:
    """preprocess() plus a random channel: stands for open_clip's random crop (consumes the worker's RNG)."""
    return torch.cat([preprocess(image), torch.rand(1, 8, 8)])                        # [4, 8, 8]


def epoch_from(make, k: int | None) -> tuple[list[Batch], tuple[Counter, Counter, Counter]]:
    """All batches of an epoch, straight (k None) or split after k batches through state_dict/load_state_dict, and
    the loader's counters (stats, skipped, reads) at its end."""
    first = make()
    if k is None:
        return list(first), (first.stats, first.skipped, first.reads)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    it.close()
    second, third = make(), make()
    second.load_state_dict(state)
    rest = list(second)
    third.load_state_dict(state)                                                        # the state is not used up
    assert ids_of(list(third)) == ids_of(rest)
    return head + rest, (second.stats, second.skipped, second.reads)


@pytest.mark.parametrize("case", ["1 rank, 3 workers, uneven shards, bad samples skipped",
                                  "short rank of 2, repeat pass", "no workers"])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path, case):
    """Split points k: the same ids, images (random augmentation included), first-seen flags, counters."""
    sizes, kw = [9, 5, 7, 3, 6], dict(batch_size=4, workers=3, shuffle_buffer=3, preprocess=noisy_preprocess)
    if case == "short rank of 2, repeat pass":
        sizes, kw = [12, 4, 5, 12], {**kw, "world_size": 2, "workers": 2}
    elif case == "no workers":
        kw["workers"] = 0
    pattern, _ = make_source(tmp_path, sizes)
    if case.endswith("bad samples skipped"):
        bad = [sample(g) for g in range(9, 14)]
        bad[2]["png"], bad[4]["json"] = b"not a png", json.dumps({"key": 2})           # unreadable; duplicate id 2
        write_tar(tmp_path / "00001.tar", bad)
        kw["skip_bad_samples"] = True
    if "world_size" in kw:                                                             # the rank with 4 + 5 samples
        kw["rank"] = min(range(2), key=lambda r: sum(s.count for s in loader(pattern, rank=r, **kw).shards))
    make = lambda: loader(pattern, **kw)                                               # noqa: E731
    straight, counters = epoch_from(make, None)
    assert "repeat" not in case or counters[0]["repeated"] > 0
    assert "skipped" not in case or counters[1] == {"unreadable_image": 1, "duplicate_id": 1}
    for k in sorted({1, 2, len(straight) // 2, len(straight) - 2, len(straight) - 1} - {0}):
        resumed, counters_k = epoch_from(make, k)
        assert ids_of(resumed) == ids_of(straight), k
        for a, b in zip(resumed, straight):
            assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts), k
            assert torch.equal(a.first_seen, b.first_seen), k
        assert counters_k == counters, k


def test_resume_refuses_another_data_order(tmp_path):
    pattern, _ = make_source(tmp_path, [6, 6])
    first = loader(pattern, workers=2)
    it = iter(first)
    next(it)
    state = first.state_dict()
    it.close()
    with pytest.raises(UsageError, match=r"workers 1 \(checkpoint: 2\)"):
        loader(pattern, workers=1).load_state_dict(state)
    with pytest.raises(UsageError, match="batch_size 3"):
        loader(pattern, workers=2, batch_size=3).load_state_dict(state)
