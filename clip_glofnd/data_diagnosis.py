"""What the training loader says when data are missing or wrong: where an id occurs, why a rank got no sample, which
shards fell short of what sizes.json (or the rank's share of the epoch) promised.

The shards are read again only on the way to an error or a warning, so the loader keeps no per-sample map all epoch.
"""
from __future__ import annotations

from collections import Counter

from clip_glofnd.errors import UsageError
from clip_glofnd.shards import (SIZES_JSON, BadSample, Shard, decode_image, iter_samples, missing_local_shards,
                                parse_id, read_caption, read_label)


def first_problem(shard: Shard, caption_key: str) -> str | None:
    """The first problem of a shard (read again in this process, only to explain an epoch without samples)."""
    try:
        for sample in iter_samples(shard):
            parse_id(sample, shard)
            read_caption(sample, caption_key, shard)
            read_label(sample, shard)
            decode_image(sample, shard)
    except BadSample as bad:
        return str(bad)
    return None


def no_sample_error(shards: list[Shard], skipped: Counter, caption_key: str) -> UsageError:
    """Why a rank's shards gave no valid sample, in one line: missing files, what was skipped, or empty tars."""
    n = len(shards)
    where = shards[0].url if n == 1 else f"{shards[0].url} … {shards[-1].url}"
    missing = missing_local_shards(shards)
    reasons = [f"{len(missing)} of {n} not found (first: {missing[0]}; a typo in the pattern?)"] if missing else []
    reasons += [f"skipped: {dict(skipped)}"] if skipped else []
    example = first_problem(shards[0], caption_key) if skipped and not missing else None
    first = f"; first: {example}" if example else ""
    return UsageError(f"no valid sample in this rank's {n} shard(s) ({where}): "
                      f"{'; '.join(reasons) or 'the tars are empty'}; check --train-data (`clip-glofnd "
                      f"check-shards PATTERN --deep` lists every problem){first}")


def shortfall_message(shards: list[Shard], reads: Counter, expected: int, *, exact: bool, samples_per_epoch: int,
                      rank: int) -> str | None:
    """After a complete first pass: a rank's samples read vs expected, naming the short shards; None if none.

    With per-shard counts in sizes.json every shard is compared with its count; without, the rank's total is
    compared with its share of samples_per_epoch and the shards that gave the fewest samples (or none) are named.
    """
    total = sum(reads.values())
    by_reads = sorted(shards, key=lambda s: reads[s.url])
    if None not in [s.count for s in shards]:
        short = sorted((s for s in shards if reads[s.url] < s.count), key=lambda s: reads[s.url] - s.count)
        names = [f"{s.url} {reads[s.url]} of {s.count}" for s in short]
        source = f"that {SIZES_JSON} lists for them"
        advice = f"re-download or rebuild them, or fix {SIZES_JSON}"
    else:
        per_shard = expected / len(shards)                              # no counts: shards assumed of even size
        empty = [s for s in by_reads if reads[s.url] == 0 and s.count != 0]
        if total >= expected and not empty:
            return None
        short = empty if total >= expected else [s for s in by_reads if reads[s.url] < per_shard]
        names = [f"{s.url} {reads[s.url] or 'none (empty)'}" for s in short]
        names[-1] += f" (about {per_shard:.0f} expected per shard)"
        source = (f"expected ({'its share of ' if exact else ''}{samples_per_epoch} samples per epoch "
                  f"from num_samples or --train-num-samples; {SIZES_JSON} has no per-shard counts)")
        advice = ("write the counts with `clip-glofnd check-shards PATTERN --write-sizes`"
                  + ("" if exact else f", or pass --train-num-samples {total} if the data set is that small"))
    if not short:
        return None
    missing = max(0, expected - total)
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return (f"data shortfall on rank {rank}: its {len(shards)} shards gave {total} samples, "
            f"{missing} ({missing / max(expected, 1):.1%}) fewer than the {expected} {source}; short shards: "
            f"{', '.join(names[:5])}{more}; {advice}")


def id_places(shards: list[Shard], gid: int, limit: int = 3) -> list[str]:
    """Where global id `gid` occurs in `shards` ("shard: sample 'key'", at most `limit`); reads only json members.

    For error messages about duplicate ids: a re-scan on error instead of a per-sample map kept all epoch.
    """
    places = []
    for shard in shards:
        try:
            for sample in iter_samples(shard, wanted={"json"}):
                try:
                    found = parse_id(sample, shard) == gid
                except BadSample:
                    continue
                if found:
                    places.append(f"{shard.url}: sample {sample['__key__']!r}")
                    if len(places) == limit:
                        return places
        except BadSample:
            continue
    return places
