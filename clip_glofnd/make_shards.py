"""`clip-glofnd make-shards IMAGES_DIR CAPTIONS OUT_DIR`: a folder of images + a CSV/TSV (path, caption) as shards
with dense global ids, in img2dataset's layout (clip_glofnd/shards.py) with a sizes.json.
"""
from __future__ import annotations

import argparse
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from clip_glofnd.errors import UsageError
from clip_glofnd.shards import ShardWriter, brace_pattern, sample_members, write_sizes_json

logger = logging.getLogger(__name__)


def read_captions(captions_file: str | Path, path_column: str = "path", caption_column: str = "caption"
                  ) -> list[tuple[str, str]]:
    """(image path, caption) rows of a CSV (or TSV, by extension .tsv/.tab); a header row naming the columns is
    optional: without one the first two columns are path and caption."""
    import csv
    captions_file = Path(captions_file)
    delimiter = "\t" if captions_file.suffix.lower() in (".tsv", ".tab") else ","
    with open(captions_file, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter=delimiter) if row]
    if not rows:
        raise UsageError(f"{captions_file}: no rows; expected {path_column}{delimiter}{caption_column} lines")
    columns = (0, 1)
    if path_column in rows[0] and caption_column in rows[0]:
        columns = (rows[0].index(path_column), rows[0].index(caption_column))
        rows = rows[1:]
    short = [i + 1 for i, row in enumerate(rows) if len(row) <= max(columns)]
    if short:
        raise UsageError(f"{captions_file}: rows {short[:5]} have fewer than {max(columns) + 1} columns "
                         f"(delimiter {delimiter!r}; a header row may name the columns {path_column!r}, "
                         f"{caption_column!r})")
    return [(row[columns[0]], row[columns[1]]) for row in rows]


def _image_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and extension if it is a readable jpg/png/webp; other formats re-encoded as PNG."""
    from PIL import Image
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt = (image.format or "").lower()
        if fmt in ("jpeg", "png", "webp"):
            return data, {"jpeg": "jpg"}.get(fmt, fmt)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue(), "png"


def make_shards(images_dir: str | Path, captions_file: str | Path, out_dir: str | Path, shard_size: int = 10000,
                skip_bad: bool = False, path_column: str = "path", caption_column: str = "caption") -> dict:
    """Pack images + captions into shards with dense global ids 0..n-1 (in the captions file's row order).

    Each sample: image bytes as they are (jpg/png/webp; other formats re-encoded to PNG), `txt` caption, `json`
    {"key": id, "caption", "path"}; plus out_dir/sizes.json. A missing or unreadable image or an empty caption is an
    error naming the row, or with `skip_bad` a logged skip (ids stay dense over the written samples).
    """
    from tqdm import tqdm
    rows = read_captions(captions_file, path_column, caption_column)
    out_dir, gid, skipped = Path(out_dir), 0, []
    with ShardWriter(out_dir, shard_size) as writer:
        for row, (rel, caption) in enumerate(tqdm(rows, desc="make-shards", unit="img", mininterval=2), start=1):
            try:
                if not caption.strip():
                    raise ValueError("empty caption")
                image, ext = _image_bytes(Path(images_dir) / rel)
            except (OSError, ValueError) as error:
                message = f"{captions_file}: row {row} ({rel!r}): {error}"
                if not skip_bad:
                    raise UsageError(f"{message}; fix the row or pass --skip-bad") from error
                logger.warning("skipping %s", message)
                skipped.append(row)
                continue
            writer.write(f"{gid:09d}", sample_members(image, ext, caption.strip(), gid, path=rel))
            gid += 1
    if gid == 0:
        raise UsageError(f"{captions_file}: no sample written ({len(skipped)} rows skipped)")
    sizes = write_sizes_json(out_dir, writer.counts, gid)
    return {"train": brace_pattern(out_dir, writer.counts), "sizes_json": str(sizes), "num_samples": gid,
            "shards": len(writer.counts), "skipped_rows": skipped}


def make_shards_main(argv: Sequence[str]) -> int:
    """`clip-glofnd make-shards IMAGES_DIR CAPTIONS OUT_DIR [--shard-size N]`."""
    parser = argparse.ArgumentParser(prog="clip-glofnd make-shards", description=make_shards.__doc__.splitlines()[0])
    parser.add_argument("images_dir", help="folder the image paths of the captions file are relative to")
    parser.add_argument("captions", help="CSV (or .tsv) with image path and caption per row; optional header")
    parser.add_argument("out_dir", help="output folder for {00000..}.tar and sizes.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (img2dataset's default)")
    parser.add_argument("--path-column", default="path", help="header name of the image path column")
    parser.add_argument("--caption-column", default="caption", help="header name of the caption column")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and log) rows with a missing or unreadable "
                        "image or an empty caption instead of stopping")
    ns = parser.parse_args(argv)
    if ns.shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {ns.shard_size}")
    summary = make_shards(ns.images_dir, ns.captions, ns.out_dir, ns.shard_size, ns.skip_bad, ns.path_column,
                          ns.caption_column)
    print(f"{summary['num_samples']} samples in {summary['shards']} shards: {summary['train']} "
          f"({summary['sizes_json']}; {len(summary['skipped_rows'])} rows skipped)")
    return 0
