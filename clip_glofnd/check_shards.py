"""`clip-glofnd check-shards PATTERN [--deep]`: count, id range, holes, duplicates and per-shard counts of a shard
pattern; `--deep` also decodes every image and caption as training does.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clip_glofnd.errors import UsageError
from clip_glofnd.shards import (IMAGE_EXTS, SIZES_JSON, BadSample, Shard, decode_image, expand_sources, iter_samples,
                                local_path, parse_id, read_caption, read_label, resolve_shards, write_sizes_json)


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
    folders = {Path(local_path(url) or "").parent for url in report.per_shard}
    if len(folders) != 1 or None in map(local_path, report.per_shard):
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
