#!/usr/bin/env python
"""Write scikit-learn's handwritten digits as WebDataset shards (same as `clip-glofnd make-digits OUT_DIR`).

Usage: python data/make_digits.py OUT_DIR [--seed S]      (see data/README.md for the layout)
"""
import sys

from clip_glofnd.digits import make_digits_main

if __name__ == "__main__":
    sys.exit(make_digits_main(sys.argv[1:]))
