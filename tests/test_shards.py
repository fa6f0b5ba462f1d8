"""clip_glofnd.shards: the digits data set, make-shards, check-shards; read back with plain tarfile."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_glofnd import cli
from clip_glofnd.errors import UsageError
from clip_glofnd.check_shards import check_shards, check_shards_main
from clip_glofnd.digits import DIGIT_WORDS, make_digits, split_digits
from clip_glofnd.make_shards import make_shards
from clip_glofnd.shards import ShardWriter, brace_pattern, write_sizes_json


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard, with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_dir(folder: Path) -> dict[str, dict[str, bytes]]:
    return {k: v for shard in sorted(folder.glob("*.tar")) for k, v in read_tar(shard).items()}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "digits.json"}


# ----------------------------------------------------------------------------------------------------------------------
# digits

def test_digits_training_shards(digits_dir):
    summary = json.loads((digits_dir / "digits.json").read_text())
    assert summary["train"] == f"{digits_dir}/train/{{00000..00011}}.tar" and summary["num_samples"] == 1500
    sizes = json.loads((digits_dir / "train" / "sizes.json").read_text())
    assert sizes == {**{f"{i:05d}.tar": 125 for i in range(12)}, "num_samples": 1500}
    samples = read_dir(digits_dir / "train")
    metas = {key: json.loads(s["json"]) for key, s in samples.items()}
    assert sorted(m["key"] for m in metas.values()) == list(range(1500))             # dense global ids
    for key, s in samples.items():
        label = int(s["cls"])
        assert set(s) == {"png", "txt", "json", "cls"} and key == f"{metas[key]['key']:09d}"
        assert metas[key]["label"] == label and metas[key]["caption"] == s["txt"].decode()
        assert str(label) in s["txt"].decode() or DIGIT_WORDS[label] in s["txt"].decode()
    assert len({s["txt"] for s in samples.values()}) > 50                           # several templates and wordings
    image = Image.open(io.BytesIO(samples["000000000"]["png"]))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_digits_split_is_stratified_and_disjoint(digits_dir):
    from sklearn.datasets import load_digits
    target = load_digits().target
    train = [json.loads(s["json"]) for s in read_dir(digits_dir / "train").values()]
    held = [json.loads(s["json"]) for s in read_dir(digits_dir / "wds" / "digits_cls" / "test").values()]
    sources = [m["source_index"] for m in train + held]
    assert len(held) == 297 and sorted(sources) == list(range(1797))                 # every digit used exactly once
    assert all(target[m["source_index"]] == m["label"] for m in train + held)        # labels are sklearn's
    held_counts, all_counts = Counter(m["label"] for m in held), Counter(target.tolist())
    assert all(abs(held_counts[c] - 297 * all_counts[c] / 1797) <= 1 for c in range(10))


@pytest.mark.parametrize("name, kind", [("digits_cls", "classification"), ("digits_ret", "retrieval")])
def test_digits_clip_benchmark_layout(digits_dir, name, kind):
    """The files CLIP_benchmark 1.6.2's build_wds_dataset reads: test/nshards.txt, test/{0..n-1}.tar, ..."""
    root = digits_dir / "wds" / name
    nshards = int((root / "test" / "nshards.txt").read_text())
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == sorted(f"{i}.tar" for i in range(nshards))
    assert (root / "dataset_type.txt").read_text().strip() == kind
    samples = read_dir(root / "test")
    assert len(samples) == 297 and all("png" in s for s in samples.values())
    if kind == "classification":
        classnames = (root / "classnames.txt").read_text().splitlines()
        templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert classnames == list(DIGIT_WORDS) and len(templates) >= 2
        assert all(t.format(c="seven") != t for t in templates)                       # CLIP_benchmark fills {c}
        assert sorted({int(s["cls"]) for s in samples.values()}) == list(range(10))
    else:
        for s in samples.values():
            captions = s["txt"].decode().splitlines()
            assert len(captions) == 5 == len(set(captions))


def test_clip_benchmark_reads_digits(digits_dir):
    """Only where clip_benchmark is installed (not a dependency): its own wds reader on our layout."""
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    import torchvision.transforms as T
    cls = builder.build_dataset("wds/digits_cls", root=str(digits_dir / "wds" / "digits_cls"), transform=T.ToTensor(),
                                split="test", download=False, task="zeroshot_classification")
    ret = builder.build_dataset("wds/digits_ret", root=str(digits_dir / "wds" / "digits_ret"), transform=T.ToTensor(),
                                split="test", download=False, task="zeroshot_retrieval")
    assert cls.classes == list(DIGIT_WORDS) and len(list(cls)) == 297
    assert all(len(texts) == 5 for _, texts in ret)


def test_digits_are_reproducible(digits_dir, tmp_path):
    from sklearn.datasets import load_digits
    make_digits(tmp_path / "again", seed=0)
    assert tree_digest(tmp_path / "again") == tree_digest(digits_dir)                 # byte-identical
    target = load_digits().target
    assert split_digits(target, seed=1) != split_digits(target, seed=0)               # the seed matters


# ----------------------------------------------------------------------------------------------------------------------
# writer, make-shards

def test_shard_writer_is_deterministic(tmp_path):
    for out in ("a", "b"):
        with ShardWriter(tmp_path / out, shard_size=2) as writer:
            for i in range(3):
                writer.write(f"{i:09d}", {"txt": f"c{i}", "json": json.dumps({"key": i})})
    assert writer.counts == {"00000.tar": 2, "00001.tar": 1}
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    with tarfile.open(tmp_path / "a" / "00000.tar") as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """4 images (jpg, png, bmp, png) named by colour, in a sub-folder."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name, value in [("a.jpg", 10), ("b.png", 20), ("sub/c.bmp", 30), ("d.png", 40)]:
        Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(root / name)
    return root


def write_captions(path: Path, rows: list[tuple[str, str]], header: bool, delimiter: str) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerows(([("path", "caption")] if header else []) + rows)
    return path


ROWS = [("a.jpg", "a red, round thing"), ("b.png", "two"), ("sub/c.bmp", "three"), ("d.png", "four")]


@pytest.mark.parametrize("header, suffix", [(True, ".csv"), (False, ".tsv")])
def test_make_shards(tmp_path, image_folder, header, suffix):
    captions = write_captions(tmp_path / f"captions{suffix}", ROWS, header, "\t" if suffix == ".tsv" else ",")
    summary = make_shards(image_folder, captions, tmp_path / "out", shard_size=3)
    assert summary["num_samples"] == 4 and summary["train"] == f"{tmp_path}/out/{{00000..00001}}.tar"
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1,
                                                                         "num_samples": 4}
    samples = read_dir(tmp_path / "out")
    for gid, (rel, caption) in enumerate(ROWS):                                      # id = row order
        s = samples[f"{gid:09d}"]
        assert json.loads(s["json"]) == {"key": gid, "caption": caption, "path": rel}
        assert s["txt"].decode() == caption
        ext = {"a.jpg": "jpg", "sub/c.bmp": "png"}.get(rel, "png")
        assert set(s) == {ext, "txt", "json"}
        if rel != "sub/c.bmp":
            assert s[ext] == (image_folder / rel).read_bytes()                        # bytes kept as they are
        assert np.asarray(Image.open(io.BytesIO(s[ext])))[0, 0, 0] in range(8 * (gid + 1), 12 * (gid + 1) + 1)
    assert check_shards(summary["train"]).ok


def test_make_shards_bad_rows(tmp_path, image_folder):
    rows = ROWS[:2] + [("missing.png", "gone"), ("d.png", " ")]
    captions = write_captions(tmp_path / "c.csv", rows, True, ",")
    with pytest.raises(UsageError, match=r"row 3 \('missing.png'\)"):
        make_shards(image_folder, captions, tmp_path / "out")
    summary = make_shards(image_folder, captions, tmp_path / "out2", skip_bad=True)
    assert summary["num_samples"] == 2 and summary["skipped_rows"] == [3, 4]
    assert sorted(json.loads(s["json"])["key"] for s in read_dir(tmp_path / "out2").values()) == [0, 1]


def test_make_shards_cli(tmp_path, image_folder, capsys):
    captions = write_captions(tmp_path / "c.csv", ROWS, True, ",")
    assert cli.main(["make-shards", str(image_folder), str(captions), str(tmp_path / "out"), "--shard-size", "2"]) == 0
    assert "4 samples in 2 shards" in capsys.readouterr().out
    assert cli.main(["make-shards", str(image_folder), str(captions), str(tmp_path / "o"), "--shard-size", "0"]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# check-shards

def id_shard(path: Path, ids: list, keys: list[str] | None = None) -> None:
    with ShardWriter(path.parent, shard_size=10**6, name_format=path.name) as writer:
        for i, gid in enumerate(ids):
            writer.write(keys[i] if keys else f"{i:09d}", {"txt": "x", "json": json.dumps({"key": gid})})


def test_check_shards_counts_holes_duplicates(tmp_path, capsys):
    id_shard(tmp_path / "00000.tar", [0, 1, 2, 3])
    id_shard(tmp_path / "00001.tar", [3, 7, 8])
    write_sizes_json(tmp_path, {"00000.tar": 4, "00001.tar": 2}, num_samples=10)
    pattern = f"{tmp_path}/{{00000..00001}}.tar"
    report = check_shards(pattern)
    assert (report.samples, report.min_id, report.max_id, report.num_samples) == (7, 0, 8, 10)
    assert (report.holes, report.hole_examples) == (4, [[4, 6], [9, 9]])
    assert (report.duplicates, report.duplicate_examples) == (1, [3])
    assert report.per_shard == {f"{tmp_path}/00000.tar": 4, f"{tmp_path}/00001.tar": 3}
    assert report.count_mismatch == {f"{tmp_path}/00001.tar": [3, 2]} and not report.ok
    assert check_shards_main([pattern]) == 1 and "duplicates: 1 [3]" in capsys.readouterr().out
    assert check_shards_main([pattern, "--allow-holes"]) == 1                         # duplicates still fail


def test_check_shards_ok_and_allow_holes(tmp_path, capsys):
    id_shard(tmp_path / "00000.tar", [0, 1, 3], keys=["a", "b", "c"])               # ids from json key, not __key__
    write_sizes_json(tmp_path, {"00000.tar": 3}, num_samples=4)
    shard = str(tmp_path / "00000.tar")
    assert check_shards_main([shard]) == 1
    capsys.readouterr()
    assert check_shards_main([shard, "--allow-holes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hole_examples"] == [[2, 2]]
    report = check_shards(shard, num_samples=3)
    assert report.problems == {"id_out_of_range": 1} and report.holes == 1
    id_shard(tmp_path / "00000.tar", [0, 1, 2, 3])
    assert check_shards_main([shard]) == 0


def test_check_shards_writes_sizes(tmp_path):
    id_shard(tmp_path / "00000.tar", [0, 1, 2])
    id_shard(tmp_path / "00001.tar", [4])
    pattern = f"{tmp_path}/{{00000..00001}}.tar"
    assert check_shards_main([pattern, "--write-sizes", "--num-samples", "6", "--allow-holes"]) == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1, "num_samples": 6}
    assert check_shards(pattern).holes == 2                                          # ids 3 and 5, from sizes.json


def test_check_shards_bad_keys_and_truncation(tmp_path):
    id_shard(tmp_path / "00000.tar", [0, "x1", 2])
    id_shard(tmp_path / "00001.tar", [3, 4, 5])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:512 * 5 + 100])
    report = check_shards(f"{tmp_path}/{{00000..00001}}.tar", num_samples=6)
    assert report.problems == {"bad_key": 1, "truncated_shard": 1} and not report.ok
    assert any("sample '000000001'" in e and "'x1' is not an integer" in e for e in report.problem_examples)


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def deep_shards(root: Path) -> str:
    """Two shards whose ids are all fine, with one bad image, caption or label each in samples 1..5 of 00001.tar."""
    bad = {1: {"png": b"\x89PNG\r\n\x1a\n truncated"}, 2: {"txt": "caf\xe9".encode("latin-1")}, 3: {"txt": "  "},
           4: {"cls": "seven"}, 5: {"png": None}}
    with ShardWriter(root, shard_size=4) as writer:
        for gid in range(8):
            members = {"png": png_bytes(gid), "txt": f"caption {gid}", "cls": str(gid % 2),
                       "json": json.dumps({"key": gid, "caption": f"caption {gid}"}), **bad.get(gid, {})}
            writer.write(f"{gid:09d}", {ext: data for ext, data in members.items() if data is not None})
    write_sizes_json(root, writer.counts, num_samples=8)
    return brace_pattern(root, writer.counts)


def test_check_shards_deep_decodes_images_and_captions(tmp_path, capsys):
    pattern = deep_shards(tmp_path)
    assert check_shards(pattern).ok                                                   # ids alone are fine
    report = check_shards(pattern, deep=True)
    assert report.problems == {"unreadable_image": 1, "non_utf8_caption": 1, "missing_caption": 1,
                               "bad_label": 1, "missing_image": 1} and not report.ok
    where = {"unreadable_image": 1, "non_utf8_caption": 2, "missing_caption": 3, "bad_label": 4, "missing_image": 5}
    for kind, gid in where.items():                                                  # shard and key named per kind
        shard = f"{tmp_path}/0000{gid // 4}.tar"
        assert sum(e.startswith(f"{shard}: sample '{gid:09d}'") for e in report.problem_examples) == 1, kind
    assert check_shards_main([pattern, "--deep"]) == 1
    out = capsys.readouterr().out
    assert "checked: ids, images and captions" in out and "txt member is not UTF-8" in out and "NOT OK" in out
    assert check_shards(pattern, deep=True, workers=2).__dict__ == report.__dict__   # same report in 2 processes


def test_check_shards_deep_caption_key(tmp_path):
    with ShardWriter(tmp_path, shard_size=10) as writer:
        for gid in range(3):
            writer.write(f"{gid:09d}", {"png": png_bytes(gid), "json": json.dumps({"key": gid, "caption": f"c{gid}"})})
    write_sizes_json(tmp_path, writer.counts, num_samples=3)
    shard = str(tmp_path / "00000.tar")
    assert check_shards(shard, deep=True).problems == {"missing_caption": 3}
    assert check_shards(shard, deep=True, caption_key="json:caption").ok
    assert check_shards_main([shard, "--deep", "--caption-key", "json:caption"]) == 0


@pytest.mark.parametrize("fault, kind, message", [
    ("empty file", "unreadable_shard", r"00001\.tar: not a tar archive: an empty file;"),
    ("garbage", "unreadable_shard", r"00001\.tar: not a tar archive: 600 bytes starting b'garbagegarbagega';"),
    ("archive of shards", "unreadable_shard", r"00001\.tar: holds the archive 'inner/00000\.tar', not samples"),
    ("cut at a header", None, None),
])
def test_check_shards_broken_shards(tmp_path, fault, kind, message):
    id_shard(tmp_path / "00000.tar", [0, 1, 2])
    id_shard(tmp_path / "00001.tar", [3, 4, 5])
    write_sizes_json(tmp_path, {"00000.tar": 3, "00001.tar": 3}, num_samples=6)
    broken = tmp_path / "00001.tar"
    if fault == "empty file":
        broken.write_bytes(b"")
    elif fault == "garbage":
        broken.write_bytes((b"garbage" * 100)[:600])
    elif fault == "archive of shards":
        (tmp_path / "inner").mkdir()
        id_shard(tmp_path / "inner" / "00000.tar", [3, 4, 5])
        broken.unlink()
        with tarfile.open(broken, "w") as tar:
            tar.add(tmp_path / "inner" / "00000.tar", arcname="inner/00000.tar")
    else:                                                    # the tar ends cleanly after 1 of its 3 samples
        with tarfile.open(broken) as tar:
            offset = tar.getmembers()[2].offset             # 2 members (txt, json) per sample
        broken.write_bytes(broken.read_bytes()[:offset])
    report = check_shards(f"{tmp_path}/{{00000..00001}}.tar")
    assert not report.ok and check_shards_main([f"{tmp_path}/{{00000..00001}}.tar", "--allow-holes"]) == 1
    if kind is None:
        assert report.problems == {} and report.short_shards == [str(broken)]       # not OK: shorter than listed
        assert report.count_mismatch == {str(broken): [1, 3]}
        return
    assert report.problems == {kind: 1} and report.per_shard[str(broken)] == 0
    [example] = report.problem_examples
    assert re.search(message, example) and "\n" not in example


def test_import_is_cheap():
    code = "import sys, clip_glofnd.shards; print(sorted({'torch', 'webdataset', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
