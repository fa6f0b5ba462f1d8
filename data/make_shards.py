#!/usr/bin/env python
"""Pack a folder of images + a CSV/TSV of (path, caption) into WebDataset shards with dense global ids.

Same as `clip-glofnd make-shards IMAGES_DIR CAPTIONS OUT_DIR [--shard-size N]`; see data/README.md.
"""
import sys

from clip_glofnd.make_shards import make_shards_main

if __name__ == "__main__":
    sys.exit(make_shards_main(sys.argv[1:]))
