"""What `clip-glofnd train` will open, checked before any work (and by --dry-run): stdlib only, no torch.

A missing evaluation set used to surface after the first epoch had trained, an unknown --model only when the model
was built; here every path and name is checked in well under a second: the model name (open_clip's config folder,
read without importing open_clip, plus our packaged configs and JSON files), --pretrained, every local training
shard, --zeroshot-data / --retrieval-data, --eval-suite's data sets, --resume, that --logs can be written, and that
--report-to's packages are installed (first).
Relative paths resolve against the current folder, as the run will.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clip_glofnd.config import TrainConfig
from clip_glofnd.errors import UsageError
from clip_glofnd.report import check_installed


def check_run(cfg: TrainConfig) -> None:
    """UsageError naming the flag and path of the first thing the run could not open."""
    from clip_glofnd.evaluate import open_datasets
    from clip_glofnd.model import is_local
    check_installed(cfg.run.reporters)                                  # --report-to's packages
    check_model(cfg.model.model)
    if cfg.model.pretrained is not None:
        _named("--pretrained", is_local, cfg.model.pretrained)         # a path-like value must be an existing file
    check_train_data(cfg.data.train_data, cfg.data.num_samples)
    _named("--zeroshot-data", open_datasets, zeroshot_data=cfg.run.zeroshot_data)
    _named("--retrieval-data", open_datasets, retrieval_data=cfg.run.retrieval_data)
    open_datasets(cfg.run.zeroshot_data, cfg.run.retrieval_data)        # no two sets with one name
    if cfg.run.eval_suite:
        from clip_glofnd.suite import check_suite
        check_suite(cfg.run.eval_suite, cfg.run.eval_dataset_root)       # every data set of the suite found
    if cfg.run.resume not in (None, "latest") and not Path(cfg.run.resume).is_file():
        raise UsageError(f"--resume {cfg.run.resume}: no such checkpoint file (or pass --resume latest)")
    check_writable(cfg.run.logs, "--logs")


def _named(flag: str, check: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """check(*args, **kwargs), its UsageError prefixed with the flag it is about."""
    try:
        check(*args, **kwargs)
    except UsageError as error:
        raise UsageError(f"{flag}: {error}") from None


def model_names() -> set[str]:
    """open_clip's architecture names (its model_configs/*.json, found without importing it) and ours."""
    from clip_glofnd.model import packaged_models
    names = set(packaged_models())
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        names.update(path.stem for path in (Path(folder) / "model_configs").glob("*.json"))
    return names


def check_model(model: str) -> None:
    """UsageError for a --model that is neither an open_clip / packaged name, a hub reference nor a JSON file."""
    path = Path(model)
    if model.startswith(("hf-hub:", "local-dir:")) or model in model_names() or path.is_file():
        return
    if path.suffix == ".json" or os.sep in model:
        raise UsageError(f"--model {model}: model config file not found")
    from clip_glofnd.model import packaged_models
    raise UsageError(f"unknown model {model!r}: use an open_clip architecture (list them with `python -c 'import "
                     f"open_clip; print(open_clip.list_models())'`), one of ours ({', '.join(packaged_models())}) or "
                     f"a path to a JSON config")


def check_train_data(pattern: str, num_samples: int | None) -> None:
    """Every local shard of --train-data exists, and the id space is known (sizes.json or --num-samples)."""
    from clip_glofnd.shards import expand_sources, local_path, resolve_shards
    urls = [url for source in expand_sources(pattern) for url in source]
    missing = [url for url in urls if (path := local_path(url)) is not None and not Path(path).is_file()]
    if missing:
        raise UsageError(f"--train-data: {len(missing)} of {len(urls)} shards not found (first: "
                         f"{Path(local_path(missing[0])).absolute()})")
    resolve_shards(pattern, num_samples)


def check_writable(folder: str, flag: str) -> None:
    """`folder` can be created or written: its nearest existing ancestor is a writable directory."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: cannot write in {existing}; pass a writable {flag}")
