"""Model creation and checkpoint loading: names, config paths, round trips, wrong architectures, tower locking."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clip_glofnd.errors import UsageError
from clip_glofnd.model import CONFIG_DIR, create_model, load_state_dict, resolve_model_name

TEXT_PARTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@pytest.fixture(scope="module")
def tiny():
    """(model, preprocess_train, preprocess_val, tokenizer) of clip-tiny, random init."""
    return create_model("clip-tiny")


def _small_config(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of clip-tiny's JSON under another name, with top-level / vision_cfg changes."""
    config = json.loads((CONFIG_DIR / "clip-tiny.json").read_text())
    config["vision_cfg"].update(changes.pop("vision_cfg", {}))
    config.update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_packaged_name_gives_the_configured_model(tiny) -> None:
    model, preprocess_train, preprocess_val, tokenizer = tiny
    assert model.text_projection.shape == (128, 64)                                  # text width 128 -> embed 64
    assert tokenizer(["a photo"]).shape == (1, 32)                                   # context length 32
    image = preprocess_val(__import__("PIL.Image").Image.new("RGB", (100, 80)))
    assert image.shape == (3, 64, 64)
    assert preprocess_train is not preprocess_val


def test_open_clip_name_and_json_path(tmp_path: Path) -> None:
    assert resolve_model_name("RN50") == "RN50"
    path = _small_config(tmp_path, "tiny-embed32", embed_dim=32)
    model, *_ = create_model(str(path))
    assert model.text_projection.shape == (128, 32)
    assert resolve_model_name(str(path)) == "tiny-embed32"                           # registering twice is fine


def test_config_shadowing_an_open_clip_name_is_refused(tmp_path: Path) -> None:
    path = _small_config(tmp_path, "RN50")
    with pytest.raises(UsageError, match="named 'RN50' already exists"):
        resolve_model_name(str(path))
    assert open_clip.get_model_config("RN50")["embed_dim"] == 1024                   # registry untouched


def test_unknown_model_lists_where_to_find_names(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown model 'ViT-Q-99'.*list_models\(\).*clip-tiny"):
        create_model("ViT-Q-99")
    with pytest.raises(UsageError, match="cannot read it as JSON"):
        create_model(str(Path(__file__)))                                            # a file, not a config
    (tmp_path / "half.json").write_text('{"embed_dim": 64}')
    with pytest.raises(UsageError, match="half.json: missing vision_cfg, text_cfg"):
        create_model(str(tmp_path / "half.json"))


@pytest.mark.parametrize("layout", ["ours", "ours_module_prefix", "bare_state_dict"])
def test_checkpoint_round_trip(tiny, tmp_path: Path, layout: str) -> None:
    """Weights shifted away from any random init come back exactly, whatever the file layout."""
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in tiny[0].state_dict().items()}
    if layout == "ours":
        payload = {"state_dict": state, "epoch": 3, "step": 10, "optimizer": {"state": {}, "param_groups": []},
                   "glofnd": {"img": {"lam": torch.ones(5)}}, "config": {"lr": 1e-3}}
    elif layout == "ours_module_prefix":
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    else:
        payload = state                                                              # plain OpenCLIP weights file
    torch.save(payload, tmp_path / "ckpt.pt")
    loaded, *_ = create_model("clip-tiny", str(tmp_path / "ckpt.pt"))
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    assert load_state_dict(tmp_path / "ckpt.pt").keys() == state.keys()


def test_checkpoint_of_another_architecture_names_file_and_keys(tmp_path: Path) -> None:
    wider, *_ = create_model(str(_small_config(tmp_path, "tiny-wide", embed_dim=96)))
    torch.save({"state_dict": wider.state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(UsageError, match=r"wide\.pt does not fit model 'clip-tiny': .*shape mismatches "
                                         r"\(.*\[128, 96\] vs model \[128, 64\]") as error:
        create_model("clip-tiny", str(tmp_path / "wide.pt"))
    assert "\n" not in str(error.value)
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(2), "head.bias": torch.zeros(1)}},
               tmp_path / "odd.pt")
    with pytest.raises(UsageError, match=r"odd\.pt does not fit .*missing keys.*1 unexpected keys \(head\.bias\)"):
        create_model("clip-tiny", str(tmp_path / "odd.pt"))


def test_unloadable_or_missing_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "rng": np.random.get_state()}, tmp_path / "numpy.pt")
    with pytest.raises(UsageError, match=r"numpy\.pt: torch\.load\(weights_only=True\) refused it: it holds a "
                                         r"numpy\S+ object") as error:
        create_model("clip-tiny", str(tmp_path / "numpy.pt"))
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match="checkpoint .*nope.pt not found"):
        create_model("clip-tiny", str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=r"junk\.pt: cannot load it as a torch checkpoint \(Unsupported operand"):
        create_model("clip-tiny", str(tmp_path / "junk.pt"))
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(UsageError, match=r"empty\.pt: holds no model weights"):
        create_model("clip-tiny", str(tmp_path / "empty.pt"))
    with pytest.raises(UsageError, match="unknown precision"):
        create_model("clip-tiny", precision="fp8")


@pytest.mark.parametrize("lock_image, lock_text", [(False, False), (True, False), (False, True), (True, True)])
def test_lock_flags_freeze_the_right_towers(lock_image: bool, lock_text: bool) -> None:
    model, *_ = create_model("clip-tiny", lock_image=lock_image, lock_text=lock_text)
    for name, param in model.named_parameters():
        frozen = (lock_image and name.startswith("visual.")) or (lock_text and name.startswith(TEXT_PARTS))
        assert param.requires_grad != frozen, name
    assert model.logit_scale.requires_grad                                           # temperature stays trainable


def test_train_mode_keeps_locked_towers_in_eval_mode() -> None:
    from clip_glofnd.model import train_mode
    model = create_model("clip-tiny", lock_image=True)[0]
    train_mode(model)
    assert not any(m.training for m in model.visual.modules())                 # locked: eval
    assert model.training and model.transformer.training and model.token_embedding.training
    assert all(m.training for m in train_mode(create_model("clip-tiny")[0].eval()).modules())   # nothing locked


def test_aug_cfg_reaches_open_clips_training_transform() -> None:
    """--aug-cfg scale='(1,1)' makes the training transform the evaluation one (square images: a crop of the whole
    area with another aspect ratio does not fit, so torchvision's RandomResizedCrop falls back to the whole image)."""
    from PIL import Image

    from clip_glofnd.model import parse_aug_cfg
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert parse_aug_cfg(["scale=(1,1)", "ratio=(1, 1)", "color_jitter=0.4"]) == {
        "scale": (1, 1), "ratio": (1, 1), "color_jitter": 0.4}
    _, train_none, val, _ = create_model("clip-tiny", aug_cfg=parse_aug_cfg(["scale=(1,1)"]))
    torch.testing.assert_close(train_none(image), val(image), rtol=0, atol=0)
    _, train_default, _, _ = create_model("clip-tiny")
    torch.manual_seed(0)
    assert not all(torch.equal(train_default(image), val(image)) for _ in range(5))     # random resized crops
    with pytest.raises(UsageError, match="unknown key 'scal'.*scale"):
        parse_aug_cfg(["scal=(1,1)"])
