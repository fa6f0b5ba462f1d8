"""clip_glofnd: CLIP training on WebDataset shards with GloFND false-negative discovery.

GloFND (Balmaseda, Wang, Lin, Yang, ICML 2025, arXiv 2502.20612) learns one similarity threshold per
image anchor and per text anchor; negatives above it are dropped from the contrastive loss.
Importing this package is cheap: torch and open_clip load only when a submodule that needs them is imported.
"""

__version__ = "0.1.0"
