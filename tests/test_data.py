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
    elif kind == "bad_key":
        bad["json"] = json.dumps({"key": "five"})
    elif kind == "id_out_of_range":
        bad["json"] = json.dumps({"key": 8})
    elif kind == "bad_json":
        bad["json"] = "{not json"
    elif kind == "bad_label":
        bad["cls"] = "seven"
    write_tar(tmp_path / "00001.tar", good)
    return pattern, r"00001\.tar: sample '000000005'", kind


BAD_KINDS = ["unreadable_image", "missing_image", "missing_caption", "bad_key", "id_out_of_range", "bad_json",
             "bad_label", "truncated_shard"]


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
    assert run.skipped == Counter({skip_kind: 1})
    lost = [5, 6, 7] if kind == "truncated_shard" else [5]                  # a truncated shard loses its tail
    assert sorted(seen) == [g for g in range(8) if g not in lost]
    assert run.stats["unvisited"] == (3 if kind == "truncated_shard" else 0)     # what a truncated tail loses


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
    assert sorted(ids_of(list(run))) == [0, 1, 2, 3] and run.skipped == Counter({"unreadable_shard": 1})


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
